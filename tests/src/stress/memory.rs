//! Host figures of a stress run: containerd's memory and descriptors, the pods' PSS, the
//! host's available memory.

use std::collections::BTreeMap;
use std::path::Path;

use crate::cri;

/// containerd's RSS (KiB) and open descriptors.
pub(super) fn containerd_figures(pid: Option<u32>) -> (u64, u64) {
    let Some(pid) = pid else {
        return (0, 0);
    };
    let rss = kib_field(&format!("/proc/{pid}/status"), "VmRSS:");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    (rss, fds)
}

/// The host's `MemAvailable` (MiB).
pub(super) fn host_available_mib() -> u64 {
    kib_field("/proc/meminfo", "MemAvailable:") / 1024
}

/// The value of the `key` line (`Key:   123 kB`) of the proc file `path`; 0 when absent.
fn kib_field(path: &str, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// PSS (KiB) of every process in the test pods' cgroups (cgroup v1's memory hierarchy or the
/// unified one) and of the shims of the containerd in `ctrd_dir`, memfd mappings (guest RAM) left
/// out, per process name. Fails where the kernel has no `/proc/PID/smaps`
/// (`CONFIG_PROC_PAGE_MONITOR`), rather than report zeros.
pub fn pods_pss_kib(ctrd_dir: &Path) -> anyhow::Result<BTreeMap<String, u64>> {
    anyhow::ensure!(
        Path::new("/proc/self/smaps").exists(),
        "no /proc/PID/smaps on this kernel (CONFIG_PROC_PAGE_MONITOR): cannot measure PSS"
    );
    let mut pids: Vec<u32> = crate::processes_mentioning(ctrd_dir)
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("containerd-shim"))
        .map(|(pid, _)| pid)
        .collect();
    let cgroups = Path::new("/sys/fs/cgroup");
    let mut queue = vec![
        cgroups.join("memory").join(cri::CGROUP_PARENT),
        cgroups.join(cri::CGROUP_PARENT),
    ];
    while let Some(dir) = queue.pop() {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(procs.lines().filter_map(|p| p.parse::<u32>().ok()));
        }
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                queue.push(e.path());
            }
        }
    }
    pids.sort_unstable();
    pids.dedup();
    let mut by_name = BTreeMap::new();
    for pid in pids {
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim().to_string())
            .unwrap_or_default();
        // Kernel threads in a pod's cgroup (KVM's kvm-nx-lpage-recovery-<pid>) map nothing.
        let pss = pss_without_memfds(pid);
        if pss > 0 {
            *by_name.entry(name).or_default() += pss;
        }
    }
    Ok(by_name)
}

/// PSS of `pid` in KiB without its memfd mappings.
fn pss_without_memfds(pid: u32) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut total = 0;
    let mut skipping = false;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            skipping = line.contains("/memfd:");
        } else if first == "Pss:" && !skipping {
            total += fields
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}
