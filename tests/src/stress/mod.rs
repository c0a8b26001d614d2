//! Pods under load through CRI, with the leak audit after every step: `cargo xtask stress`
//! (full sizes, `src/bin/stress.rs`) and `tests/stress.rs` (the small sizes CI runs).
//!
//! - cycles: N pods one after another, each RunPodSandbox, two containers (each logs a line and
//!   sleeps), ExecSync `echo`, the containers' CRI logs read back, StopPodSandbox,
//!   RemovePodSandbox; the audit after each; p50/p99 of every call, and the drift of
//!   containerd's memory and descriptors and of the cycle's time (first tenth vs last tenth).
//! - parallel: N pods started at once, each with a container; the time until all are ready
//!   and the host memory per pod (PSS of every process in the pods' cgroups plus their shims,
//!   guest RAM left out), all removed, the audit; per handler, in one run.
//! - soak: pods created and removed continuously by a number of workers for a while; each
//!   minute's cycles, containerd's memory and descriptors and the host's available memory, the
//!   audit at the end.
//!
//! The audit's baseline is taken after one warm-up cycle per handler: the first pod of a
//! network makes its bridge, its IPAM directory and containerd's namespace directories, which
//! stay.

mod at_once;
mod memory;
mod report;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_cri::v1::ExecSyncRequest;

use crate::audit::{Audit, Scope};
use crate::containerd::{PANGOLIN_HANDLER, RUNC_HANDLER};
use crate::cri::{self, Cri};
use crate::cri_pods::CriFixture;

pub use at_once::{remove_at_once, start_at_once, Started};
pub use memory::pods_pss_kib;
pub use report::{quantile, Calls, CycleReport, ParallelReport, Report, SoakReport, SoakSample};

/// What to run; zero skips a part.
#[derive(Debug, Clone)]
pub struct Sizes {
    /// Sequential pod cycles per handler.
    pub cycles: usize,
    /// Pods started at once, per handler.
    pub parallel: usize,
    /// How long to soak (zero: no soak).
    pub soak: Duration,
    /// Workers of the soak.
    pub soak_workers: usize,
    /// CRI runtime handlers (`pangolin`, `runc`), in the order they run.
    pub handlers: Vec<String>,
    /// The audit covers host-wide resources too (nothing else makes pods meanwhile).
    pub whole_host: bool,
}

/// A stress run's private containerd, network and audit scope.
pub struct Stress {
    fixture: CriFixture,
    scope: Scope,
    logs: PathBuf,
    rt: tokio::runtime::Runtime,
}

impl Stress {
    /// Sets up a private CRI containerd with a bridge network `tag` (1-255, apart from other
    /// tests').
    pub fn new(name: &str, tag: u8, whole_host: bool) -> Stress {
        let fixture = CriFixture::new(name, tag);
        let scope = crate::pods_scope(&fixture.env, &fixture.ctrd, whole_host);
        let logs = fixture.env.dir.join("logs");
        Stress {
            fixture,
            scope,
            logs,
            rt: crate::cri_pods::runtime(),
        }
    }

    /// Runs `sizes`; fails at the first failed call or leak, naming it.
    pub fn run(&self, sizes: &Sizes) -> Result<Report> {
        let mut report = Report::default();
        let socket = self.fixture.ctrd.socket.clone();
        self.rt.block_on(async {
            let mut cri = Cri::connect(&socket).await?;
            for handler in &sizes.handlers {
                // Warm-up: what the first pod of a network leaves for good.
                let mut warm = Calls::default();
                cycle(
                    &mut cri,
                    handler,
                    &format!("warm-{handler}"),
                    &self.logs,
                    &mut warm,
                )
                .await
                .context("warm-up cycle")?;
            }
            // The warm-up's teardown finishes before the baseline.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let baseline = Audit::take(&self.scope);
            report.audited = baseline
                .entries
                .iter()
                .map(|(k, v)| (*k, v.len()))
                .collect();
            for k in baseline.counts.keys() {
                report.audited.insert(k, 1);
            }
            for handler in &sizes.handlers {
                if sizes.cycles > 0 {
                    let part = self
                        .cycles(&mut cri, handler, sizes.cycles, &baseline)
                        .await?;
                    // Printed as each part ends: a later part's failure keeps these figures.
                    let shown = Report {
                        cycles: vec![part.clone()],
                        ..Report::default()
                    };
                    eprint!("{}", shown.render());
                    report.cycles.push(part);
                }
            }
            for handler in &sizes.handlers {
                if sizes.parallel > 0 {
                    report.parallel.push(
                        self.parallel(&cri, handler, sizes.parallel, &baseline)
                            .await?,
                    );
                }
            }
            if !sizes.soak.is_zero() {
                let handler = sizes
                    .handlers
                    .first()
                    .map_or(PANGOLIN_HANDLER, String::as_str);
                report.soak = Some(
                    self.soak(&cri, handler, sizes.soak, sizes.soak_workers, &baseline)
                        .await?,
                );
            }
            Ok::<_, anyhow::Error>(())
        })?;
        Ok(report)
    }

    async fn cycles(
        &self,
        cri: &mut Cri,
        handler: &str,
        n: usize,
        baseline: &Audit,
    ) -> Result<CycleReport> {
        let mut r = CycleReport {
            handler: handler.into(),
            ..CycleReport::default()
        };
        for i in 0..n {
            let t = Instant::now();
            cycle(
                cri,
                handler,
                &format!("c{i}-{handler}"),
                &self.logs,
                &mut r.calls,
            )
            .await
            .with_context(|| format!("{handler} cycle {i}"))?;
            r.cycle_ms.push(t.elapsed().as_secs_f64() * 1000.0);
            self.audit(baseline)
                .await
                .with_context(|| format!("after {handler} cycle {i}"))?;
            let (rss, fds) = memory::containerd_figures(self.scope.containerd_pid);
            r.containerd_rss_kib.push(rss);
            r.containerd_fds.push(fds);
            if (i + 1) % (n / 20).max(1) == 0 || i + 1 == n {
                let last = r.cycle_ms.last().copied().unwrap_or_default();
                eprintln!(
                    "stress: {handler} cycle {}/{n} ({last:.0} ms, audit clean), containerd \
                     {rss} KiB RSS, {fds} fds",
                    i + 1
                );
            }
        }
        Ok(r)
    }

    async fn parallel(
        &self,
        cri: &Cri,
        handler: &str,
        n: usize,
        baseline: &Audit,
    ) -> Result<ParallelReport> {
        eprintln!("stress: {handler}: starting {n} pods at once");
        let names = (0..n).map(|i| format!("p{i}-{handler}")).collect();
        let started = start_at_once(cri, handler, names, &self.logs).await;
        let all_ready_ms = started.ready_ms;
        eprintln!(
            "stress: {handler}: {} of {n} pods ready after {all_ready_ms:.0} ms",
            started.pods.len()
        );
        let by_process = memory::pods_pss_kib(&self.fixture.ctrd.dir);
        let removed = remove_at_once(cri, started.pods).await;
        if let Some(e) = started.failure.or(removed) {
            return Err(e);
        }
        let by_process = by_process?;
        let pss: u64 = by_process.values().sum();
        self.audit(baseline)
            .await
            .with_context(|| format!("after {n} parallel {handler} pods"))?;
        Ok(ParallelReport {
            handler: handler.into(),
            pods: n,
            all_ready_ms,
            pss_per_pod_kib: pss as f64 / n as f64,
            pss_per_pod_by_process: by_process
                .into_iter()
                .map(|(k, v)| (k, v as f64 / n as f64))
                .collect(),
        })
    }

    async fn soak(
        &self,
        cri: &Cri,
        handler: &str,
        length: Duration,
        workers: usize,
        baseline: &Audit,
    ) -> Result<SoakReport> {
        let started = Instant::now();
        let end = started + length;
        let done_cycles = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let samples = std::sync::Arc::new(std::sync::Mutex::new(Vec::<SoakSample>::new()));
        let ticker = {
            let (done_cycles, samples) = (done_cycles.clone(), samples.clone());
            let (handler, containerd) = (handler.to_string(), self.scope.containerd_pid);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(60));
                tick.tick().await;
                let mut before = 0;
                loop {
                    tick.tick().await;
                    let done = done_cycles.load(std::sync::atomic::Ordering::Relaxed);
                    let (rss, fds) = memory::containerd_figures(containerd);
                    let sample = SoakSample {
                        cycles: done - before,
                        containerd_rss_kib: rss,
                        containerd_fds: fds,
                        host_available_mib: memory::host_available_mib(),
                    };
                    before = done;
                    eprintln!(
                        "stress: soak {handler}: {:.0} of {:.0} min, {done} cycles ({} in the last \
                         minute), containerd {rss} KiB RSS, {fds} fds, host {} MiB available",
                        started.elapsed().as_secs_f64() / 60.0,
                        length.as_secs_f64() / 60.0,
                        sample.cycles,
                        sample.host_available_mib
                    );
                    if let Ok(mut s) = samples.lock() {
                        s.push(sample);
                    }
                }
            })
        };
        let mut set = tokio::task::JoinSet::new();
        for w in 0..workers.max(1) {
            let (mut cri, handler, logs) = (cri.clone(), handler.to_string(), self.logs.clone());
            let done_cycles = done_cycles.clone();
            set.spawn(async move {
                let mut calls = Calls::default();
                let mut n = 0;
                while Instant::now() < end {
                    cycle(&mut cri, &handler, &format!("s{w}-{n}"), &logs, &mut calls)
                        .await
                        .with_context(|| format!("soak worker {w}, cycle {n}"))?;
                    n += 1;
                    done_cycles.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok::<_, anyhow::Error>((n, calls))
            });
        }
        let mut report = SoakReport {
            workers: workers.max(1),
            minutes: length.as_secs_f64() / 60.0,
            ..SoakReport::default()
        };
        let joined = async {
            let mut all = Vec::new();
            while let Some(done) = set.join_next().await {
                all.push(done.context("a soak worker")??);
            }
            Ok::<_, anyhow::Error>(all)
        }
        .await;
        ticker.abort();
        report.per_minute = samples.lock().map(|s| s.clone()).unwrap_or_default();
        for (n, calls) in joined? {
            report.cycles += n;
            for (k, v) in calls.0 {
                report.calls.0.entry(k).or_default().extend(v);
            }
        }
        self.audit(baseline).await.context("after the soak")?;
        Ok(report)
    }

    /// Waits (up to 30 s) for the host to be back at `baseline`; the leaks otherwise.
    async fn audit(&self, baseline: &Audit) -> Result<()> {
        let deadline = Instant::now() + crate::patience(Duration::from_secs(30));
        loop {
            let leaks = Audit::take(&self.scope).leaks_since(baseline);
            if leaks.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("left on the host:\n  {}", leaks.join("\n  "));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Removes whatever pods are left and runs the usual end-of-test checks.
    pub fn finish(self) {
        let left = self
            .rt
            .block_on(cri::remove_all_pods(&self.fixture.ctrd.socket));
        assert!(left.is_empty(), "pods left: {left:?}");
        let CriFixture { env, net, ctrd } = self.fixture;
        crate::finish_containerd(ctrd, env);
        drop(net);
    }
}

/// One pod cycle (see the module docs).
async fn cycle(
    cri: &mut Cri,
    handler: &str,
    name: &str,
    logs: &Path,
    calls: &mut Calls,
) -> Result<()> {
    let log_dir = logs.join(name);
    let config = cri::pod_config(name, &log_dir, HashMap::new());
    let pod = calls
        .time("RunPodSandbox", cri.run_pod(handler, &config))
        .await?;
    let mut containers = Vec::new();
    for c in ["a", "b"] {
        let line = format!("{c}-{name}");
        let spec =
            cri::container_config(c, &["sh", "-c", &format!("echo {line}; exec sleep 3600")]);
        let id = calls
            .time(
                "CreateContainer",
                cri.runtime
                    .create_container(k8s_cri::v1::CreateContainerRequest {
                        pod_sandbox_id: pod.clone(),
                        config: Some(spec),
                        sandbox_config: Some(config.clone()),
                    }),
            )
            .await?
            .into_inner()
            .container_id;
        calls
            .time(
                "StartContainer",
                cri.runtime
                    .start_container(k8s_cri::v1::StartContainerRequest {
                        container_id: id.clone(),
                    }),
            )
            .await?;
        containers.push((id, line, log_dir.join(format!("{c}.log"))));
    }
    let exec = calls
        .time(
            "ExecSync",
            cri.runtime.exec_sync(ExecSyncRequest {
                container_id: containers[0].0.clone(),
                cmd: vec!["echo".into(), "hi".into()],
                timeout: 60,
            }),
        )
        .await?
        .into_inner();
    if exec.exit_code != 0 || exec.stdout != b"hi\n" {
        bail!(
            "ExecSync echo in {name}: exit {}, stdout {:?}",
            exec.exit_code,
            String::from_utf8_lossy(&exec.stdout)
        );
    }
    for (_, line, path) in &containers {
        let deadline = Instant::now() + crate::patience(Duration::from_secs(20));
        loop {
            let lines = cri::parse_log(path).unwrap_or_default();
            if lines.iter().any(|(_, text)| text == line) {
                break;
            }
            if Instant::now() > deadline {
                bail!("{} never got {line:?}: {lines:?}", path.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    calls
        .time(
            "StopPodSandbox",
            cri.runtime
                .stop_pod_sandbox(k8s_cri::v1::StopPodSandboxRequest {
                    pod_sandbox_id: pod.clone(),
                }),
        )
        .await?;
    calls
        .time(
            "RemovePodSandbox",
            cri.runtime
                .remove_pod_sandbox(k8s_cri::v1::RemovePodSandboxRequest {
                    pod_sandbox_id: pod,
                }),
        )
        .await?;
    let _ = std::fs::remove_dir_all(&log_dir);
    Ok(())
}

/// The handlers by their names on the command line.
pub fn handler_names(list: &str) -> Result<Vec<String>> {
    list.split(',')
        .map(|h| match h {
            "pangolin" => Ok(PANGOLIN_HANDLER.to_string()),
            "runc" => Ok(RUNC_HANDLER.to_string()),
            other => bail!("--handlers: unknown handler {other:?} (pangolin, runc)"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handlers_are_named_or_refused() {
        assert_eq!(handler_names("runc").expect("runc"), [RUNC_HANDLER]);
        assert!(handler_names("kata").is_err());
    }
}
