//! Runtime info: Version names the runtime and the CRI API version, and Status reports the
//! runtime and its network ready. Asked once per handler's case: the answers are containerd's,
//! and must not change with the handler a node also has.

use anyhow::{ensure, Context, Result};
use k8s_cri::v1::{StatusRequest, VersionRequest};

use crate::support::Case;

/// Version names containerd and the CRI API version `v1`.
pub async fn version_names_the_runtime_and_the_cri_api(c: &mut Case) -> Result<()> {
    let v = c
        .cri
        .runtime
        .version(VersionRequest {
            version: "v1".into(),
        })
        .await
        .context("Version")?
        .into_inner();
    ensure!(
        v.runtime_name == "containerd",
        "runtime_name {:?}",
        v.runtime_name
    );
    ensure!(!v.runtime_version.is_empty(), "no runtime_version: {v:?}");
    ensure!(
        v.runtime_api_version == "v1",
        "runtime_api_version {:?}",
        v.runtime_api_version
    );
    Ok(())
}

/// Status reports the conditions RuntimeReady and NetworkReady, both true.
pub async fn status_reports_the_runtime_and_its_network_ready(c: &mut Case) -> Result<()> {
    let status = c
        .cri
        .runtime
        .status(StatusRequest { verbose: false })
        .await
        .context("Status")?
        .into_inner()
        .status
        .context("Status without a status")?;
    for want in ["RuntimeReady", "NetworkReady"] {
        let condition = status.conditions.iter().find(|cond| cond.r#type == want);
        ensure!(
            condition.is_some_and(|cond| cond.status),
            "{want} not true: {:?}",
            status.conditions
        );
    }
    Ok(())
}
