//! Pods started, and removed, all at once: the stress run's parallel part and `cri_bench`'s
//! P4/P3 figures.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use crate::cri::{self, Cri};

/// What starting pods at once gave.
pub struct Started {
    /// Every pod RunPodSandbox made (also those whose container then failed: remove them).
    pub pods: Vec<String>,
    /// Milliseconds from the first call until the last pod's container ran.
    pub ready_ms: f64,
    /// The last failure, if any pod or container did not start.
    pub failure: Option<anyhow::Error>,
}

/// Starts the pods `names` of `handler` at once, each with a container running `sleep 3600`
/// (CRI logs under `logs/<name>`).
pub async fn start_at_once(cri: &Cri, handler: &str, names: Vec<String>, logs: &Path) -> Started {
    let t = Instant::now();
    let mut starts = tokio::task::JoinSet::new();
    for name in names {
        let (mut cri, handler, logs) = (cri.clone(), handler.to_string(), logs.join(&name));
        starts.spawn(async move {
            let config = cri::pod_config(&name, &logs, HashMap::new());
            let pod = cri.run_pod(&handler, &config).await?;
            let sleeper = cri::container_config("s", &["sleep", "3600"]);
            let started = cri.create_start(&pod, &config, sleeper).await.map(|_| ());
            Ok::<_, tonic::Status>((pod, started))
        });
    }
    let mut out = Started {
        pods: Vec::new(),
        ready_ms: 0.0,
        failure: None,
    };
    while let Some(done) = starts.join_next().await {
        match done {
            Ok(Ok((pod, started))) => {
                if let Err(e) = started {
                    out.failure = Some(anyhow::anyhow!("{handler}: a container of pod {pod}: {e}"));
                }
                out.pods.push(pod);
            }
            Ok(Err(e)) => out.failure = Some(anyhow::anyhow!("{handler}: a pod: {e}")),
            Err(e) => out.failure = Some(anyhow::anyhow!("{handler}: a start: {e}")),
        }
    }
    out.ready_ms = t.elapsed().as_secs_f64() * 1000.0;
    out
}

/// Stops and removes `pods` at once; the first failure.
pub async fn remove_at_once(cri: &Cri, pods: Vec<String>) -> Option<anyhow::Error> {
    let mut removals = tokio::task::JoinSet::new();
    for pod in pods {
        let mut cri = cri.clone();
        removals.spawn(async move { cri.remove_pod(&pod).await.map_err(|e| (pod, e)) });
    }
    let mut failure = None;
    while let Some(done) = removals.join_next().await {
        match done {
            Ok(Err((pod, e))) => {
                failure.get_or_insert(anyhow::anyhow!("removing pod {pod}: {e}"));
            }
            Err(e) => {
                failure.get_or_insert(anyhow::anyhow!("a removal: {e}"));
            }
            Ok(Ok(())) => {}
        }
    }
    failure
}
