//! Pod and container lifecycle: a pod is ready until stopped; a container's exit code, reason,
//! start and finish times and output reach CRI; StopContainer sends SIGTERM and, after the grace period, SIGKILL.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use k8s_cri::v1::{
    ContainerState, ContainerStatus, ContainerStatusRequest, LinuxContainerConfig,
    LinuxContainerResources, PodSandboxState, PodSandboxStatusRequest, ReopenContainerLogRequest,
    StopContainerRequest, StopPodSandboxRequest,
};

use crate::support::Case;

async fn container_status(c: &mut Case, id: &str) -> Result<ContainerStatus> {
    c.cri
        .runtime
        .container_status(ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        })
        .await
        .context("ContainerStatus")?
        .into_inner()
        .status
        .context("ContainerStatus without a status")
}

/// The status once the container exited (within 60 s).
async fn exited(c: &mut Case, id: &str) -> Result<ContainerStatus> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = container_status(c, id).await?;
        if status.state == ContainerState::ContainerExited as i32 {
            return Ok(status);
        }
        if Instant::now() > deadline {
            bail!("{id} did not exit: {status:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn pod_state(c: &mut Case, pod: &str) -> Result<i32> {
    Ok(c.cri
        .runtime
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.into(),
            verbose: false,
        })
        .await
        .context("PodSandboxStatus")?
        .into_inner()
        .status
        .context("PodSandboxStatus without a status")?
        .state)
}

pub async fn a_pod_is_ready_until_it_is_stopped(c: &mut Case) -> Result<()> {
    let (pod, _) = c.pod("ready").await?;
    ensure!(
        pod_state(c, &pod).await? == PodSandboxState::SandboxReady as i32,
        "not ready"
    );
    c.cri
        .runtime
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .context("StopPodSandbox")?;
    ensure!(
        pod_state(c, &pod).await? == PodSandboxState::SandboxNotready as i32,
        "still ready after StopPodSandbox"
    );
    Ok(())
}

pub async fn a_containers_exit_code_and_times_are_reported(c: &mut Case) -> Result<()> {
    let (pod, pod_config) = c.pod("exitcode").await?;
    let id = c
        .run(
            &pod,
            &pod_config,
            c.container_config("exit7", &["sh", "-c", "exit 7"]),
        )
        .await?;
    let status = exited(c, &id).await?;
    ensure!(
        status.exit_code == 7,
        "exit code {} (want 7)",
        status.exit_code
    );
    // Both times are reported; their order is not: containerd stamps started_at when its
    // StartContainer returns, which for a process this quick is after it finished (runc too).
    ensure!(
        status.started_at > 0 && status.finished_at > 0,
        "times: started {} finished {}",
        status.started_at,
        status.finished_at
    );
    ensure!(
        status.reason == "Error",
        "reason {:?} (want Error)",
        status.reason
    );
    Ok(())
}

/// A container that outgrows its memory limit is killed by the OOM killer: it exits 137 with
/// the reason `OOMKilled` (in the guest's cgroup on pangolin, the host's on runc).
pub async fn a_container_over_its_memory_limit_is_oom_killed(c: &mut Case) -> Result<()> {
    let (pod, pod_config) = c.pod("oom").await?;
    // `tail` of an endless line keeps all of it.
    let mut config = c.container_config("hungry", &["tail", "/dev/zero"]);
    config.linux = Some(LinuxContainerConfig {
        resources: Some(LinuxContainerResources {
            memory_limit_in_bytes: 32 << 20,
            ..Default::default()
        }),
        ..config.linux.unwrap_or_default()
    });
    let id = c.run(&pod, &pod_config, config).await?;
    let status = exited(c, &id).await?;
    ensure!(
        status.exit_code == 137 && status.reason == "OOMKilled",
        "exit code {} reason {:?} (want 137, OOMKilled)",
        status.exit_code,
        status.reason
    );
    Ok(())
}

pub async fn a_containers_output_reaches_its_log_by_stream(c: &mut Case) -> Result<()> {
    let (pod, pod_config) = c.pod("logs").await?;
    let log_dir = pod_config.log_directory.clone();
    let script = "echo to-stdout; echo to-stderr >&2";
    let id = c
        .run(
            &pod,
            &pod_config,
            c.container_config("talker", &["sh", "-c", script]),
        )
        .await?;
    exited(c, &id).await?;
    let lines = pangolin_e2e::cri::parse_log(&std::path::Path::new(&log_dir).join("talker.log"))?;
    for want in [("stdout", "to-stdout"), ("stderr", "to-stderr")] {
        ensure!(
            lines.iter().any(|(s, t)| (s.as_str(), t.as_str()) == want),
            "{want:?} not in the log: {lines:?}"
        );
    }
    Ok(())
}

/// A container writes 300,000 numbered lines on stdout and 1,000 on stderr as fast as it can:
/// every line reaches the CRI log whole, in order, on its stream, and the container still
/// answers an ExecSync afterwards.
pub async fn a_flood_of_output_reaches_its_log_whole_and_in_order(c: &mut Case) -> Result<()> {
    const LINES: usize = 300_000;
    let (pod, pod_config) = c.pod("flood").await?;
    let log = std::path::Path::new(&pod_config.log_directory).join("flood.log");
    let script = format!("seq 1 {LINES}; seq 1 1000 >&2; exec sleep 600");
    let id = c
        .run(
            &pod,
            &pod_config,
            c.container_config("flood", &["sh", "-c", &script]),
        )
        .await?;
    let deadline = Instant::now() + pangolin_e2e::patience(Duration::from_secs(120));
    let lines = loop {
        let lines = pangolin_e2e::cri::parse_log(&log).unwrap_or_default();
        // Each stream reaches the log through its own pipe and copier: stderr's last line
        // says nothing of stdout's (runc's lost the race by 12,352 lines once), so wait for
        // both.
        let count = |stream: &str| lines.iter().filter(|(s, _)| s == stream).count();
        if count("stdout") >= LINES && count("stderr") >= 1000 {
            break lines;
        }
        ensure!(
            Instant::now() < deadline,
            "the log holds {} lines after the bound",
            lines.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for (stream, count) in [("stdout", LINES), ("stderr", 1000)] {
        let got: Vec<&str> = lines
            .iter()
            .filter(|(s, _)| s == stream)
            .map(|(_, t)| t.as_str())
            .collect();
        ensure!(
            got.len() == count,
            "{stream}: {} lines, not {count}",
            got.len()
        );
        if let Some((i, line)) = got
            .iter()
            .enumerate()
            .find(|(i, line)| **line != (i + 1).to_string())
        {
            bail!("{stream} line {} is {line:?}", i + 1);
        }
    }
    ensure!(
        c.exec_ok(&id, &["echo", "alive"]).await?.trim() == "alive",
        "the container answers after the flood"
    );
    Ok(())
}

/// StopContainer with a 1 s grace period: a process that ends on SIGTERM exits 143 at once; one
/// that ignores it is killed (137) after the grace period.
pub async fn stop_sends_sigterm_then_sigkill_after_the_grace_period(c: &mut Case) -> Result<()> {
    let (pod, pod_config) = c.pod("stop").await?;
    let polite = c
        .run(
            &pod,
            &pod_config,
            c.container_config("polite", &["sleep", "3600"]),
        )
        .await?;
    let script = "trap '' TERM; touch /tmp/armed; while :; do sleep 1; done";
    let stubborn = c
        .run(
            &pod,
            &pod_config,
            c.container_config("stubborn", &["sh", "-c", script]),
        )
        .await?;
    // Stop only once the shell ignores SIGTERM (a stop that wins the race to the trap would
    // end it with 143).
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.exec(&stubborn, &["test", "-e", "/tmp/armed"]).await?.code != 0 {
        if Instant::now() > deadline {
            bail!("the stubborn shell never set its trap");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (id, want) in [(polite, 143), (stubborn, 137)] {
        let asked = Instant::now();
        c.cri
            .runtime
            .stop_container(StopContainerRequest {
                container_id: id.clone(),
                timeout: 1,
            })
            .await
            .context("StopContainer")?;
        let status = exited(c, &id).await?;
        ensure!(
            status.exit_code == want,
            "{id}: exit code {} (want {want}) after {:?}",
            status.exit_code,
            asked.elapsed()
        );
    }
    Ok(())
}

/// ReopenContainerLog: after the log file was moved away (as log rotation does), the
/// container's later output goes to a fresh file at its log path.
pub async fn reopen_container_log_starts_a_fresh_file_at_the_log_path(c: &mut Case) -> Result<()> {
    let (pod, pod_config) = c.pod("reopen").await?;
    let log = std::path::Path::new(&pod_config.log_directory).join("ticker.log");
    let script = "i=0; while true; do i=$((i+1)); echo tick-$i; sleep 0.1; done";
    let id = c
        .run(
            &pod,
            &pod_config,
            c.container_config("ticker", &["sh", "-c", script]),
        )
        .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0) == 0 {
        ensure!(
            Instant::now() < deadline,
            "nothing reached {}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rotated = log.with_extension("log.1");
    std::fs::rename(&log, &rotated).context("rotating the log")?;
    c.cri
        .runtime
        .reopen_container_log(ReopenContainerLogRequest {
            container_id: id.clone(),
        })
        .await
        .context("ReopenContainerLog")?;
    loop {
        let fresh = pangolin_e2e::cri::parse_log(&log).unwrap_or_default();
        if fresh
            .iter()
            .any(|(s, t)| s == "stdout" && t.starts_with("tick-"))
        {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no output in the reopened {}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let old = pangolin_e2e::cri::parse_log(&rotated)?;
    ensure!(!old.is_empty(), "the rotated file lost its lines");
    Ok(())
}
