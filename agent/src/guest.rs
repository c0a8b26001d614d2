//! PID 1 duties: the guest's base mounts, logging, the shared filesystem, serving, power-off.
//!
//! Kernel command line parameters read by the agent:
//! - `pangolin.log=<level>`: agent log level (error|warn|info|debug|trace), default info.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use nix::mount::{mount, MsFlags};
use pangolin_protocols::agent::GuestDetails;
use pangolin_protocols::{AGENT_READY_PORT, AGENT_VSOCK_PORT, API_VERSION, LOG_PARAM};

use crate::oom::OomWatcher;
use crate::reaper::Reaper;
use crate::sandbox::{Sandbox, BUNDLES};
use crate::service::Service;

/// Value of `<key>=` on the kernel command line.
fn cmdline_param(cmdline: &str, key: &str) -> Option<String> {
    let prefix = format!("{key}=");
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&prefix))
        .map(str::to_string)
}

fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> anyhow::Result<()> {
    fs::create_dir_all(target).with_context(|| format!("mkdir {target}"))?;
    match mount(Some(source), target, Some(fstype), flags, data) {
        Ok(()) | Err(nix::errno::Errno::EBUSY) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("mount {fstype} on {target}")),
    }
}

fn base_mounts() -> anyhow::Result<()> {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", "proc", nodev, None)?;
    mount_fs("sysfs", "/sys", "sysfs", nodev, None)?;
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    mount_fs("shm", "/dev/shm", "tmpfs", nodev, Some("mode=1777"))?;
    mount_fs("cgroup2", "/sys/fs/cgroup", "cgroup2", nodev, None)?;
    mount_fs(
        "run",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    mount_fs(
        "tmp",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    fs::create_dir_all(BUNDLES).context("mkdir bundles")?;
    fs::create_dir_all(crate::helper::CONTAINER_ROOT).context("mkdir container root")?;
    Ok(())
}

static LOG_FILTER: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The agent's log filter, handed down to the helper.
pub fn log_filter() -> String {
    LOG_FILTER.get().cloned().unwrap_or_else(|| "info".into())
}

fn init_logging(cmdline: &str) {
    let level = cmdline_param(cmdline, LOG_PARAM).unwrap_or_else(|| "info".into());
    let _ = LOG_FILTER.set(level.clone());
    let filter = tracing_subscriber::EnvFilter::try_new(&level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(false)
        .with_timer(tracing_subscriber::fmt::time::uptime())
        .with_writer(std::io::stderr)
        .init();
}

/// Moves PID 1 from the initramfs onto a tmpfs root.
///
/// The initramfs root cannot be pivoted away from, so containers (which pivot_root) would
/// fail; from a tmpfs mounted on top it can. The steps of util-linux switch_root (MS_MOVE the
/// new root onto /, chroot) without its final exec: the agent goes on as the same process. It
/// used to re-execute itself on the new root: a second load of its 7 MB image, about 17 ms of a
/// QEMU/TCG boot. The image stays on the hidden initramfs either way; the helper is
/// started through `/proc/self/exe`, which names it wherever it is.
fn switch_root() -> anyhow::Result<()> {
    let new_root = Path::new("/newroot");
    mount_fs(
        "rootfs",
        "/newroot",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    for dir in ["dev", "proc", "sys", "run", "tmp"] {
        fs::create_dir_all(new_root.join(dir)).with_context(|| format!("mkdir /newroot/{dir}"))?;
    }
    nix::unistd::chdir(new_root).context("chdir /newroot")?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .context("move the new root onto /")?;
    nix::unistd::chroot(".").context("chroot")?;
    nix::unistd::chdir("/").context("chdir /")
}

/// Sets the guest up and serves the agent API until power-off.
pub fn run() -> anyhow::Result<()> {
    switch_root()?;
    base_mounts()?;
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    init_logging(&cmdline);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        "pangolin-agent starting"
    );
    // Containers share the guest's network namespace: its loopback serves the pod's localhost.
    if let Err(err) = crate::net::link_up("lo") {
        tracing::warn!(%err, "loopback not up");
    }
    if let Err(err) = crate::cgroup::setup_root() {
        tracing::warn!(%err, "cgroup setup failed; container limits will not apply");
    }
    // The pod's share is mounted by the host's first call (`share.rs`), not here.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    runtime.block_on(serve())
}

async fn serve() -> anyhow::Result<()> {
    let reaper = Reaper::spawn().context("SIGCHLD handler")?;
    let oom = OomWatcher::spawn().context("OOM watcher")?;
    let sandbox = Arc::new(Sandbox::new(reaper, oom));
    let ready = crate::clock::boottime_ns();
    let service: Arc<dyn pangolin_protocols::agent_ttrpc::AgentService + Send + Sync> =
        Arc::new(Service::new(sandbox, ready));
    let mut server = ttrpc::r#async::Server::new()
        .bind(&format!("vsock://-1:{AGENT_VSOCK_PORT}"))
        .context("listen on vsock")?
        .register_service(pangolin_protocols::agent_ttrpc::create_agent_service(
            service,
        ));
    server.start().await.context("start ttrpc server")?;
    // Before the readiness call: a template is snapshotted with its forwarder listening.
    crate::forward::serve().context("listen on the port-forward vsock port")?;
    tracing::info!(
        port = AGENT_VSOCK_PORT,
        boottime_ms = ready / 1_000_000,
        "agent ready"
    );
    tokio::task::spawn_blocking(announce_ready);
    // Serve until power-off; the server runs on its own tasks.
    std::future::pending::<()>().await;
    Ok(())
}

/// Tells the host the agent serves: connects to the host's AGENT_READY_PORT and says READY.
fn announce_ready() {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};
    const VMADDR_CID_HOST: u32 = 2;
    for attempt in 0..20 {
        let result = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .and_then(|fd| {
            connect(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &VsockAddr::new(VMADDR_CID_HOST, AGENT_READY_PORT),
            )?;
            nix::unistd::write(&fd, b"READY\n")?;
            Ok(())
        });
        match result {
            Ok(()) => return,
            Err(err) => {
                tracing::debug!(%err, attempt, "cannot announce readiness yet");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
    tracing::warn!("could not announce readiness to the host; it will find the agent by polling");
}

/// Guest facts for GetGuestDetails.
pub fn details(ready_boottime_ns: u64) -> GuestDetails {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mem_kib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    GuestDetails {
        api_version: API_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        kernel_release: release,
        online_cpus: u32::try_from(cpus).unwrap_or(u32::MAX),
        mem_total_bytes: mem_kib.saturating_mul(1024),
        agent_ready_boottime_ns: ready_boottime_ns,
        boot_id: fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        ..Default::default()
    }
}

/// Flushes filesystems and ends the VM (a reboot: the VMM is told to exit on it).
pub fn power_off() -> ! {
    if !is_pid1() {
        // Never reboot a machine the agent was started on by mistake.
        std::process::exit(1);
    }
    nix::unistd::sync();
    // With `reboot=t` this triple-faults, which every VMM sees as a shutdown.
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    std::process::exit(1)
}

/// True when running as the guest's init.
pub fn is_pid1() -> bool {
    std::process::id() == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_params_are_found_by_key() {
        let c = "console=ttyS0 pangolin.other=pangolin pangolin.log=debug quiet";
        assert_eq!(
            cmdline_param(c, "pangolin.other").as_deref(),
            Some("pangolin")
        );
        assert_eq!(cmdline_param(c, LOG_PARAM).as_deref(), Some("debug"));
        assert_eq!(cmdline_param(c, "pangolin.port"), None);
    }
}

/// The guest's memory and load from `/proc/meminfo` and `/proc/loadavg` texts.
pub fn stats(meminfo: &str, loadavg: &str) -> pangolin_protocols::agent::GuestStatsResponse {
    let kib = |key: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            .saturating_mul(1024)
    };
    let fields: Vec<&str> = loadavg.split_whitespace().collect();
    let load = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let tasks = fields
        .get(3)
        .and_then(|v| v.split_once('/'))
        .and_then(|(_, total)| total.parse().ok())
        .unwrap_or(0);
    pangolin_protocols::agent::GuestStatsResponse {
        mem_total_bytes: kib("MemTotal:"),
        mem_available_bytes: kib("MemAvailable:"),
        load1: load(0),
        load5: load(1),
        load15: load(2),
        tasks,
        ..Default::default()
    }
}

#[cfg(test)]
mod stats_tests {
    #[test]
    fn memory_and_load_come_from_proc() {
        let s = super::stats(
            "MemTotal:        245000 kB\nMemFree: 1 kB\nMemAvailable:    200000 kB\n",
            "0.50 0.25 0.10 2/87 123\n",
        );
        assert_eq!(s.mem_total_bytes, 245_000 * 1024);
        assert_eq!(s.mem_available_bytes, 200_000 * 1024);
        assert!((s.load1 - 0.5).abs() < 1e-9 && (s.load15 - 0.1).abs() < 1e-9);
        assert_eq!(s.tasks, 87);
        assert_eq!(super::stats("", "").mem_total_bytes, 0);
    }
}
