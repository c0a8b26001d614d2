//! Security context beyond identity and seccomp (`security.rs`): a read-only root filesystem,
//! the masked and read-only `/proc` paths containerd fills in, and privileged containers.

use anyhow::{ensure, Result};
use k8s_cri::v1::{LinuxPodSandboxConfig, LinuxSandboxSecurityContext};

use crate::support::{security, Case};

/// With `readonly_rootfs` a write to `/` fails with EROFS, while the container's tmpfs
/// (`/dev/shm`) still takes writes.
pub async fn a_read_only_rootfs_refuses_writes_but_its_tmpfs_takes_them(
    c: &mut Case,
) -> Result<()> {
    let (pod, pod_config) = c.pod("rofs").await?;
    let mut config = c.container_config("readonly", &["sleep", "3600"]);
    security(&mut config).readonly_rootfs = true;
    let id = c.run(&pod, &pod_config, config).await?;
    let refused = c.exec(&id, &["touch", "/written"]).await?;
    ensure!(
        refused.code != 0 && refused.stderr.contains("Read-only file system"),
        "a write to / on a read-only rootfs: {refused:?}"
    );
    c.exec_ok(&id, &["touch", "/dev/shm/written"]).await?;
    Ok(())
}

/// The kubelet's default masked paths (`DefaultProcMount`).
const KUBELET_MASKED: &[&str] = &[
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
];

/// The kubelet's default read-only paths.
const KUBELET_READONLY: &[&str] = &[
    "/proc/asound",
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The kubelet's default masked paths read as empty (`/proc/timer_list`, ...;
/// `/sys/firmware` an empty directory) and its read-only paths are read-only (`/proc/sys`).
pub async fn the_kubelets_masked_and_read_only_proc_paths_are_in_effect(
    c: &mut Case,
) -> Result<()> {
    let (pod, pod_config) = c.pod("masked").await?;
    let mut config = c.container_config("masked", &["sleep", "3600"]);
    // What the kubelet sends for the Default proc mount (containerd applies the request's
    // lists, and none without them).
    let context = security(&mut config);
    context.masked_paths = KUBELET_MASKED.iter().map(ToString::to_string).collect();
    context.readonly_paths = KUBELET_READONLY.iter().map(ToString::to_string).collect();
    let id = c.run(&pod, &pod_config, config).await?;
    // Those of the masked files this kernel has (none has all of them).
    let sizes = "for f in /proc/kcore /proc/keys /proc/timer_list /proc/sched_debug /proc/latency_stats; do [ -e $f ] && echo \"$f $(wc -c < $f)\"; done; true";
    let masked = c.exec_ok(&id, &["sh", "-c", sizes]).await?;
    ensure!(!masked.trim().is_empty(), "none of the masked files exists");
    for line in masked.lines() {
        ensure!(line.ends_with(" 0"), "not masked (bytes read): {line}");
    }
    let firmware = c.exec_ok(&id, &["ls", "-A", "/sys/firmware"]).await?;
    ensure!(
        firmware.trim().is_empty(),
        "/sys/firmware is not masked: {firmware:?}"
    );
    let refused = c
        .exec(&id, &["sh", "-c", "echo pgn > /proc/sys/kernel/domainname"])
        .await?;
    ensure!(
        refused.code != 0 && refused.stderr.contains("Read-only file system"),
        "a write to /proc/sys: {refused:?}"
    );
    Ok(())
}

/// A privileged container (in a privileged pod) has every capability of its bounding set in
/// effect and may write `/proc/sys`.
pub async fn a_privileged_container_has_every_capability_and_a_writable_proc_sys(
    c: &mut Case,
) -> Result<()> {
    let mut pod_config = c.pod_config("privileged");
    pod_config
        .linux
        .get_or_insert_with(LinuxPodSandboxConfig::default)
        .security_context
        .get_or_insert_with(LinuxSandboxSecurityContext::default)
        .privileged = true;
    let pod = c.run_pod(&pod_config).await?;
    let mut config = c.container_config("privileged", &["sleep", "3600"]);
    security(&mut config).privileged = true;
    let id = c.run(&pod, &pod_config, config).await?;
    let status = c.exec_ok(&id, &["cat", "/proc/self/status"]).await?;
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let (eff, bnd) = (field("CapEff:"), field("CapBnd:"));
    let full = u64::from_str_radix(&eff, 16).unwrap_or(0);
    ensure!(
        eff == bnd && full.count_ones() >= 38,
        "CapEff {eff} (CapBnd {bnd}): not every capability"
    );
    c.exec_ok(
        &id,
        &["sh", "-c", "echo pgn-domain > /proc/sys/kernel/domainname"],
    )
    .await?;
    let domain = c
        .exec_ok(&id, &["cat", "/proc/sys/kernel/domainname"])
        .await?;
    ensure!(domain.trim() == "pgn-domain", "domainname {domain:?}");
    Ok(())
}
