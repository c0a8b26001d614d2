//! Containers: ContainerStatus keeps what a container was created with through its states,
//! ListContainers filters, a container is removed in any state, ExecSync honours its timeout,
//! stats report the container, and UpdateContainerResources changes what the container sees.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use k8s_cri::v1::{
    ContainerFilter, ContainerState, ContainerStateValue, ContainerStatsFilter,
    ContainerStatsRequest, ContainerStatus, ContainerStatusRequest, ExecSyncRequest,
    LinuxContainerResources, ListContainerStatsRequest, ListContainersRequest,
    RemoveContainerRequest, StopContainerRequest, UpdateContainerResourcesRequest,
};

use crate::support::{Case, CASE_LABEL};

async fn status(c: &mut Case, id: &str) -> Result<ContainerStatus> {
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

async fn stop(c: &mut Case, id: &str) -> Result<()> {
    c.cri
        .runtime
        .stop_container(StopContainerRequest {
            container_id: id.into(),
            timeout: 0,
        })
        .await
        .with_context(|| format!("StopContainer {id}"))?;
    Ok(())
}

async fn remove(c: &mut Case, id: &str) -> Result<()> {
    c.cri
        .runtime
        .remove_container(RemoveContainerRequest {
            container_id: id.into(),
        })
        .await
        .with_context(|| format!("RemoveContainer {id}"))?;
    Ok(())
}

async fn listed(c: &mut Case, filter: ContainerFilter) -> Result<Vec<String>> {
    let mut ids: Vec<String> = c
        .cri
        .runtime
        .list_containers(ListContainersRequest {
            filter: Some(filter),
        })
        .await
        .context("ListContainers")?
        .into_inner()
        .containers
        .into_iter()
        .map(|c| c.id)
        .collect();
    ids.sort();
    Ok(ids)
}

/// ContainerStatus keeps the container's metadata, labels, annotations and image, and its
/// state goes CREATED, RUNNING, EXITED.
pub async fn a_containers_status_keeps_what_it_was_created_with_through_its_states(
    c: &mut Case,
) -> Result<()> {
    let (pod, pod_config) = c.pod("cstatus").await?;
    let mut config = c.container_config("kept", &["sleep", "3600"]);
    config.labels.insert("role".into(), "sleeper".into());
    config.annotations = HashMap::from([("pangolin.test/note".into(), "kept".into())]);
    let id = c.create(&pod, &pod_config, config.clone()).await?;
    let created = status(c, &id).await?;
    ensure!(
        created.state == ContainerState::ContainerCreated as i32,
        "created: {created:?}"
    );
    ensure!(
        created.metadata == config.metadata,
        "metadata {:?}",
        created.metadata
    );
    ensure!(
        created.labels == config.labels,
        "labels {:?}",
        created.labels
    );
    ensure!(
        created
            .annotations
            .get("pangolin.test/note")
            .map(String::as_str)
            == Some("kept"),
        "annotations {:?}",
        created.annotations
    );
    ensure!(created.image == config.image, "image {:?}", created.image);
    c.start(&id).await?;
    let running = status(c, &id).await?;
    ensure!(
        running.state == ContainerState::ContainerRunning as i32,
        "running: {running:?}"
    );
    ensure!(running.started_at > 0, "no start time: {running:?}");
    stop(c, &id).await?;
    let exited = status(c, &id).await?;
    ensure!(
        exited.state == ContainerState::ContainerExited as i32,
        "exited: {exited:?}"
    );
    Ok(())
}

/// ListContainers filters by id, by state, by pod and by label selector.
pub async fn list_containers_filters_by_id_state_pod_and_labels(c: &mut Case) -> Result<()> {
    let (pod, pod_config) = c.pod("clist").await?;
    let mut first = c.container_config("first", &["sleep", "3600"]);
    first.labels.insert("which".into(), "first".into());
    let a = c.run(&pod, &pod_config, first.clone()).await?;
    let mut second = c.container_config("second", &["sleep", "3600"]);
    second.labels.insert("which".into(), "second".into());
    let b = c.create(&pod, &pod_config, second).await?;
    let case = first.labels.get(CASE_LABEL).cloned().unwrap_or_default();
    let mine = HashMap::from([(CASE_LABEL.to_string(), case)]);
    let mut both = vec![a.clone(), b.clone()];
    both.sort();
    let by_id = listed(
        c,
        ContainerFilter {
            id: a.clone(),
            ..Default::default()
        },
    )
    .await?;
    ensure!(by_id == [a.clone()], "by id: {by_id:?}");
    let by_pod = listed(
        c,
        ContainerFilter {
            pod_sandbox_id: pod.clone(),
            ..Default::default()
        },
    )
    .await?;
    ensure!(by_pod == both, "by pod: {by_pod:?}");
    let created = listed(
        c,
        ContainerFilter {
            state: Some(ContainerStateValue {
                state: ContainerState::ContainerCreated as i32,
            }),
            label_selector: mine.clone(),
            ..Default::default()
        },
    )
    .await?;
    ensure!(created == [b.clone()], "created: {created:?}");
    let mut selector = mine;
    selector.insert("which".into(), "first".into());
    let labelled = listed(
        c,
        ContainerFilter {
            label_selector: selector,
            ..Default::default()
        },
    )
    .await?;
    ensure!(labelled == [a], "which=first: {labelled:?}");
    Ok(())
}

/// RemoveContainer removes a container that was only created, one that runs (stopped first,
/// at once) and one that exited; none is listed afterwards.
pub async fn a_container_is_removed_created_running_or_exited(c: &mut Case) -> Result<()> {
    let (pod, pod_config) = c.pod("cremove").await?;
    let created = c
        .create(
            &pod,
            &pod_config,
            c.container_config("created", &["sleep", "3600"]),
        )
        .await?;
    let running = c
        .run(
            &pod,
            &pod_config,
            c.container_config("running", &["sleep", "3600"]),
        )
        .await?;
    let exited = c
        .run(
            &pod,
            &pod_config,
            c.container_config("exited", &["sleep", "3600"]),
        )
        .await?;
    stop(c, &exited).await?;
    for id in [&created, &running, &exited] {
        remove(c, id).await?;
    }
    let left = listed(
        c,
        ContainerFilter {
            pod_sandbox_id: pod,
            ..Default::default()
        },
    )
    .await?;
    ensure!(left.is_empty(), "still listed: {left:?}");
    Ok(())
}

/// ExecSync of a command that runs past its timeout ends with an error when the timeout
/// passes, not when the command ends.
pub async fn exec_sync_past_its_timeout_ends_with_an_error(c: &mut Case) -> Result<()> {
    let (pod, pod_config) = c.pod("ctimeout").await?;
    let id = c
        .run(
            &pod,
            &pod_config,
            c.container_config("sleeper", &["sleep", "3600"]),
        )
        .await?;
    let t = std::time::Instant::now();
    let answer = c
        .cri
        .runtime
        .exec_sync(ExecSyncRequest {
            container_id: id.clone(),
            cmd: vec!["sleep".into(), "30".into()],
            timeout: 2,
        })
        .await;
    let took = t.elapsed();
    ensure!(
        answer.is_err(),
        "ExecSync past its timeout answered {answer:?}"
    );
    ensure!(
        took < Duration::from_secs(20),
        "ExecSync took {took:?} for a 2 s timeout"
    );
    // The container is still served afterwards.
    let out = c.exec_ok(&id, &["echo", "after"]).await?;
    ensure!(out.trim() == "after", "after the timeout: {out:?}");
    Ok(())
}

/// ContainerStats reports the container's memory working set and CPU usage, and
/// ListContainerStats filtered by pod lists exactly that pod's containers.
pub async fn container_stats_report_memory_and_cpu_and_list_by_pod(c: &mut Case) -> Result<()> {
    let (pod, pod_config) = c.pod("cstats").await?;
    let id = c
        .run(
            &pod,
            &pod_config,
            c.container_config("measured", &["sleep", "3600"]),
        )
        .await?;
    c.exec_ok(
        &id,
        &[
            "sh",
            "-c",
            "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done",
        ],
    )
    .await?;
    let stats = c
        .cri
        .runtime
        .container_stats(ContainerStatsRequest {
            container_id: id.clone(),
        })
        .await
        .context("ContainerStats")?
        .into_inner()
        .stats
        .context("ContainerStats without stats")?;
    ensure!(
        stats.attributes.as_ref().is_some_and(|a| a.id == id),
        "attributes {:?}",
        stats.attributes
    );
    let memory = stats
        .memory
        .as_ref()
        .and_then(|m| m.working_set_bytes.as_ref())
        .map(|v| v.value);
    ensure!(memory.is_some_and(|v| v > 0), "memory {:?}", stats.memory);
    let cpu = stats
        .cpu
        .as_ref()
        .and_then(|c| c.usage_core_nano_seconds.as_ref())
        .map(|v| v.value);
    ensure!(cpu.is_some_and(|v| v > 0), "cpu {:?}", stats.cpu);
    let listed: Vec<String> = c
        .cri
        .runtime
        .list_container_stats(ListContainerStatsRequest {
            filter: Some(ContainerStatsFilter {
                pod_sandbox_id: pod,
                ..Default::default()
            }),
        })
        .await
        .context("ListContainerStats")?
        .into_inner()
        .stats
        .into_iter()
        .filter_map(|s| s.attributes.map(|a| a.id))
        .collect();
    ensure!(listed == [id], "ListContainerStats by pod: {listed:?}");
    Ok(())
}

/// UpdateContainerResources changes the memory limit the running container sees in its
/// cgroup (`memory.max` on cgroup v2, `memory.limit_in_bytes` on v1).
pub async fn update_container_resources_changes_the_limit_the_container_sees(
    c: &mut Case,
) -> Result<()> {
    const LIMIT: i64 = 96 * 1024 * 1024;
    let (pod, pod_config) = c.pod("cupdate").await?;
    let id = c
        .run(
            &pod,
            &pod_config,
            c.container_config("limited", &["sleep", "3600"]),
        )
        .await?;
    c.cri
        .runtime
        .update_container_resources(UpdateContainerResourcesRequest {
            container_id: id.clone(),
            linux: Some(LinuxContainerResources {
                memory_limit_in_bytes: LIMIT,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .context("UpdateContainerResources")?;
    // cgroup v2 (pangolin's guest) or v1 (this host's, for runc).
    let read = "cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes";
    let max = c.exec_ok(&id, &["sh", "-c", read]).await?;
    ensure!(
        max.trim() == LIMIT.to_string(),
        "memory.max {max:?}, want {LIMIT}"
    );
    Ok(())
}
