//! What one scrape measures: the sandboxes under the state directory and their host processes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pangolin_protocols::AGENT_VSOCK_PORT;
use pangolin_vmm_config::api::{Metrics, Request};

use crate::agent::AgentClient;
use crate::hypervisor::builtin::{control, API_SOCKET};
use crate::rpc_stats::{self, Histogram};
use crate::sandbox::info::{self, PodInfo, SandboxInfo};

/// How long the guest's figures may take per sandbox (a stuck guest costs a scrape this much).
const GUEST_PATIENCE: Duration = Duration::from_secs(2);

/// The guest's own figures, from its agent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GuestFigures {
    /// MemTotal.
    pub mem_total_bytes: u64,
    /// MemAvailable.
    pub mem_available_bytes: u64,
    /// Load averages over 1, 5 and 15 minutes.
    pub load: [f64; 3],
    /// Tasks in the guest.
    pub tasks: u64,
    /// Each container's cgroup figures: id, CPU seconds, memory usage, memory limit (0:
    /// none), pids.
    pub containers: Vec<ContainerFigures>,
}

/// One container's cgroup figures in the guest.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerFigures {
    /// Its id.
    pub id: String,
    /// CPU time.
    pub cpu_seconds: f64,
    /// memory.current.
    pub memory_bytes: u64,
    /// memory.max (0: unlimited).
    pub memory_limit_bytes: u64,
    /// pids.current.
    pub pids: u64,
}

/// One host process of a sandbox, measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessFigures {
    /// `vmm`, `virtiofsd` or `owner`.
    pub role: &'static str,
    /// User plus system CPU time.
    pub cpu_seconds: f64,
    /// Resident set size.
    pub rss_bytes: u64,
    /// Proportional set size (shared pages divided among their users).
    pub pss_bytes: u64,
    /// Open file descriptors.
    pub fds: u64,
    /// Threads.
    pub threads: u64,
}

/// One sandbox, measured.
#[derive(Debug, Clone)]
pub struct SandboxFigures {
    /// What it says about itself.
    pub info: SandboxInfo,
    /// The containerd shim's view.
    pub pod: PodInfo,
    /// Its processes that are alive now.
    pub processes: Vec<ProcessFigures>,
    /// The guest's figures, when its agent answered in time.
    pub guest: Option<GuestFigures>,
    /// Latency of the owner's agent calls, per method, as the owner last published them.
    pub rpc: BTreeMap<String, Histogram>,
    /// The built-in VMM's counters (exits, guest errors), when it answered in time.
    pub vmm: Option<Metrics>,
}

/// Every ready sandbox under `state_dir` with its processes' and its guest's figures.
pub async fn scrape(state_dir: &Path) -> Vec<SandboxFigures> {
    let dir = state_dir.to_path_buf();
    let host = tokio::task::spawn_blocking(move || scrape_host(&dir))
        .await
        .unwrap_or_default();
    let mut asks = tokio::task::JoinSet::new();
    for (i, (workdir, s)) in host.iter().enumerate() {
        let (workdir, containers) = (workdir.clone(), s.pod.containers.clone());
        let builtin = s.info.hypervisor == "builtin";
        asks.spawn(async move {
            let (guest, vmm) = tokio::join!(
                tokio::time::timeout(GUEST_PATIENCE, guest(&workdir, &containers)),
                async {
                    if builtin {
                        vmm_metrics(&workdir).await
                    } else {
                        None
                    }
                }
            );
            (i, guest.ok().flatten(), vmm)
        });
    }
    let mut out: Vec<SandboxFigures> = host.into_iter().map(|(_, s)| s).collect();
    while let Some(Ok((i, guest, vmm))) = asks.join_next().await {
        if let Some(s) = out.get_mut(i) {
            s.guest = guest;
            s.vmm = vmm;
        }
    }
    out
}

/// The built-in VMM's counters through its control socket.
async fn vmm_metrics(workdir: &Path) -> Option<Metrics> {
    let answer = control(&workdir.join(API_SOCKET), Request::Metrics, GUEST_PATIENCE)
        .await
        .ok()?;
    serde_json::from_str(&answer).ok()
}

/// The guest's figures through its agent (a connection of the monitor's own).
async fn guest(workdir: &Path, containers: &[String]) -> Option<GuestFigures> {
    let agent = AgentClient::connect(
        &info::vsock_socket(workdir),
        AGENT_VSOCK_PORT,
        Instant::now() + GUEST_PATIENCE,
        || Ok(()),
    )
    .await
    .ok()?;
    let g = agent.guest_stats().await.ok()?;
    let mut figures = GuestFigures {
        mem_total_bytes: g.mem_total_bytes,
        mem_available_bytes: g.mem_available_bytes,
        load: [g.load1, g.load5, g.load15],
        tasks: g.tasks,
        containers: Vec::new(),
    };
    for id in containers {
        // A container of the pod file that the guest does not know (yet, or any more).
        let Ok(c) = agent.stats(id).await else {
            continue;
        };
        figures.containers.push(ContainerFigures {
            id: id.clone(),
            cpu_seconds: c.cpu.usage_usec as f64 / 1e6,
            memory_bytes: c.memory.usage_bytes,
            memory_limit_bytes: c.memory.limit_bytes,
            pids: c.pids.current,
        });
    }
    Some(figures)
}

/// The host side of a scrape: each ready sandbox's directory and figures.
fn scrape_host(state_dir: &Path) -> Vec<(PathBuf, SandboxFigures)> {
    info::list(state_dir)
        .into_iter()
        .filter_map(|(workdir, info, pod)| {
            // A directory left by a sandbox whose owner is gone is not a sandbox any more.
            if info.owner_pid != 0 && !Path::new(&format!("/proc/{}", info.owner_pid)).exists() {
                return None;
            }
            let roles = [
                ("vmm", info.vmm_pid),
                ("virtiofsd", info.virtiofsd_pid),
                ("owner", Some(info.owner_pid).filter(|&p| p != 0)),
            ];
            // virtiofsd with its sandboxed child; the others alone (the owner's children are
            // the VMM and virtiofsd, counted on their own).
            let processes = roles
                .into_iter()
                .filter_map(|(role, pid)| match role {
                    "virtiofsd" => measure_tree(role, pid?),
                    _ => measure(role, pid?),
                })
                .collect();
            let rpc = rpc_stats::read(&workdir);
            Some((
                workdir,
                SandboxFigures {
                    info,
                    pod,
                    processes,
                    guest: None,
                    rpc,
                    vmm: None,
                },
            ))
        })
        .collect()
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`), what `/proc/<pid>/stat` counts CPU in.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf reads a constant of the running system and touches no memory of ours.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Figures of process `pid`; None when it is gone.
pub fn measure(role: &'static str, pid: u32) -> Option<ProcessFigures> {
    let proc_dir = format!("/proc/{pid}");
    let stat = std::fs::read_to_string(format!("{proc_dir}/stat")).ok()?;
    let (cpu_ticks, threads) = parse_stat(&stat)?;
    let status = std::fs::read_to_string(format!("{proc_dir}/status")).unwrap_or_default();
    let rollup = std::fs::read_to_string(format!("{proc_dir}/smaps_rollup")).unwrap_or_default();
    let fds = std::fs::read_dir(format!("{proc_dir}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    Some(ProcessFigures {
        role,
        cpu_seconds: cpu_ticks as f64 / ticks_per_second(),
        rss_bytes: kib_field(&status, "VmRSS:") * 1024,
        pss_bytes: kib_field(&rollup, "Pss:") * 1024,
        fds,
        threads,
    })
}

/// Figures of process `pid` and its descendants, summed (virtiofsd's work is done by the child
/// it forks into its sandbox; RSS counts shared pages once per process, PSS shares them out);
/// None when `pid` is gone.
pub fn measure_tree(role: &'static str, pid: u32) -> Option<ProcessFigures> {
    let mut total = measure(role, pid)?;
    let mut queue = children(pid);
    // A bound on what a (hostile) process tree may cost a scrape.
    let mut left = 64;
    while let Some(child) = queue.pop() {
        if left == 0 {
            break;
        }
        left -= 1;
        if let Some(f) = measure(role, child) {
            total.cpu_seconds += f.cpu_seconds;
            total.rss_bytes += f.rss_bytes;
            total.pss_bytes += f.pss_bytes;
            total.fds += f.fds;
            total.threads += f.threads;
        }
        queue.extend(children(child));
    }
    Some(total)
}

/// The children of every thread of `pid` (`/proc/<pid>/task/<tid>/children`).
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// utime + stime (fields 14 and 15) and num_threads (field 20) of a `/proc/<pid>/stat` line;
/// the command name (field 2) may hold spaces and parentheses, so fields count from its last `)`.
pub fn parse_stat(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    Some((field(14)? + field(15)?, field(20)?))
}

/// A `Key:   N kB` line's N (0 when absent).
pub fn kib_field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_count_from_the_last_parenthesis() {
        let stat =
            "4242 (we ird) (name) S 1 4242 4242 0 -1 4194560 100 0 0 0 37 5 0 0 20 0 9 0 123 0 0";
        assert_eq!(parse_stat(stat), Some((42, 9)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1"), None);
    }

    #[test]
    fn kib_fields_and_this_process_are_measured() {
        assert_eq!(kib_field("Name:\tx\nVmRSS:\t  1234 kB\n", "VmRSS:"), 1234);
        assert_eq!(kib_field("", "Pss:"), 0);
        let me = measure("owner", std::process::id()).expect("this process");
        assert!(me.rss_bytes > 0 && me.threads >= 1 && me.fds >= 3, "{me:?}");
        assert!(measure("vmm", u32::MAX).is_none());
    }

    #[test]
    fn a_tree_sums_the_children() {
        let mut sh = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & wait"])
            .spawn()
            .expect("sh");
        let pid = sh.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        while children(pid).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let alone = measure("virtiofsd", pid).expect("sh");
        let tree = measure_tree("virtiofsd", pid).expect("tree");
        let _ = sh.kill();
        let _ = sh.wait();
        assert_eq!(
            (alone.threads, tree.threads),
            (1, 2),
            "{alone:?} vs {tree:?}"
        );
        assert!(tree.rss_bytes > alone.rss_bytes, "{alone:?} vs {tree:?}");
    }
}
