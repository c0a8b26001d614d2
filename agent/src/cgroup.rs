//! cgroup v2 figures and limits of a container, read and written in the guest's cgroupfs.
//!
//! Each container's cgroup is `/sys/fs/cgroup/pangolin/<id>` (set as the spec's cgroupsPath when
//! the host gave none). Stats are parsed from the v2 interface files directly, so the figures are
//! exactly the kernel's; limits are applied through libcgroups so OCI semantics (CPU shares to
//! weight, swap accounting) stay the runtime library's.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use libcgroups::common::{CgroupManager, ControllerOpt};
use oci_spec::runtime::LinuxResources;
use pangolin_protocols::agent::{ContainerStats, CpuStats, IoStats, MemoryStats, PidsStats};

use crate::error::AgentError;

/// The cgroup v2 mount point in the guest.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The parent of every container cgroup, relative to the root.
pub const PARENT: &str = "pangolin";

/// Controllers enabled for containers; missing ones are skipped with a warning.
const CONTROLLERS: &[&str] = &["cpuset", "cpu", "io", "memory", "pids"];

/// The cgroupsPath used when the spec gives none.
pub fn default_path(id: &str) -> PathBuf {
    Path::new("/").join(PARENT).join(id)
}

/// Absolute cgroupfs directory of a cgroupsPath.
pub fn dir_of(cgroups_path: &Path) -> PathBuf {
    Path::new(CGROUP_ROOT).join(cgroups_path.strip_prefix("/").unwrap_or(cgroups_path))
}

/// Enables the container controllers in the root and the pangolin parent.
pub fn setup_root() -> Result<(), AgentError> {
    let root = Path::new(CGROUP_ROOT);
    let available = fs::read_to_string(root.join("cgroup.controllers"))
        .map_err(|e| AgentError::Cgroup("read cgroup.controllers", e))?;
    let wanted: Vec<&str> = CONTROLLERS
        .iter()
        .copied()
        .filter(|c| available.split_whitespace().any(|a| a == *c))
        .collect();
    let missing: Vec<&str> = CONTROLLERS
        .iter()
        .copied()
        .filter(|c| !wanted.contains(c))
        .collect();
    if !missing.is_empty() {
        tracing::warn!(
            ?missing,
            "cgroup controllers not available in the guest kernel"
        );
    }
    let line: String = wanted.iter().map(|c| format!("+{c} ")).collect();
    for dir in [root.to_path_buf(), root.join(PARENT)] {
        fs::create_dir_all(&dir).map_err(|e| AgentError::Cgroup("create parent", e))?;
        fs::write(dir.join("cgroup.subtree_control"), line.trim_end())
            .map_err(|e| AgentError::Cgroup("enable controllers", e))?;
    }
    Ok(())
}

/// Applies new limits to a running container.
pub fn update(cgroups_path: &Path, resources: &LinuxResources) -> Result<(), AgentError> {
    let manager = libcgroups::v2::manager::Manager::new(CGROUP_ROOT.into(), cgroups_path.into())
        .map_err(|e| AgentError::Cgroup("open", io::Error::other(e.to_string())))?;
    let opt = ControllerOpt {
        resources,
        disable_oom_killer: false,
        oom_score_adj: None,
        freezer_state: None,
    };
    manager
        .apply(&opt)
        .map_err(|e| AgentError::Cgroup("apply limits", io::Error::other(e.to_string())))
}

/// Pids of every process in the cgroup and its descendants.
pub fn pids(dir: &Path) -> Result<Vec<u32>, AgentError> {
    let mut out = Vec::new();
    collect_pids(dir, &mut out).map_err(|e| AgentError::Cgroup("list processes", e))?;
    out.sort_unstable();
    Ok(out)
}

fn collect_pids(dir: &Path, out: &mut Vec<u32>) -> io::Result<()> {
    let procs = fs::read_to_string(dir.join("cgroup.procs"))?;
    out.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            collect_pids(&entry.path(), out)?;
        }
    }
    Ok(())
}

/// Reads `memory.events`'s oom_kill counter (0 when absent).
pub fn oom_kills(dir: &Path) -> u64 {
    fs::read_to_string(dir.join("memory.events"))
        .map(|t| keyed(&t, "oom_kill"))
        .unwrap_or(0)
}

/// Current figures of the container's cgroup.
pub fn stats(dir: &Path) -> Result<ContainerStats, AgentError> {
    let read = |name: &str| fs::read_to_string(dir.join(name)).unwrap_or_default();
    if !dir.is_dir() {
        return Err(AgentError::Cgroup(
            "read stats",
            io::Error::new(io::ErrorKind::NotFound, dir.display().to_string()),
        ));
    }
    let cpu_stat = read("cpu.stat");
    let mut cpu = CpuStats::new();
    cpu.usage_usec = keyed(&cpu_stat, "usage_usec");
    cpu.user_usec = keyed(&cpu_stat, "user_usec");
    cpu.system_usec = keyed(&cpu_stat, "system_usec");
    cpu.nr_periods = keyed(&cpu_stat, "nr_periods");
    cpu.nr_throttled = keyed(&cpu_stat, "nr_throttled");
    cpu.throttled_usec = keyed(&cpu_stat, "throttled_usec");

    let mem_stat = read("memory.stat");
    let events = read("memory.events");
    let mut memory = MemoryStats::new();
    memory.usage_bytes = single(&read("memory.current"));
    memory.limit_bytes = single(&read("memory.max"));
    memory.peak_bytes = single(&read("memory.peak"));
    memory.anon_bytes = keyed(&mem_stat, "anon");
    memory.file_bytes = keyed(&mem_stat, "file");
    memory.kernel_bytes = keyed(&mem_stat, "kernel");
    memory.inactive_file_bytes = keyed(&mem_stat, "inactive_file");
    memory.pgfault = keyed(&mem_stat, "pgfault");
    memory.pgmajfault = keyed(&mem_stat, "pgmajfault");
    memory.oom_events = keyed(&events, "oom");
    memory.oom_kill_events = keyed(&events, "oom_kill");

    let mut pids = PidsStats::new();
    pids.current = single(&read("pids.current"));
    pids.limit = single(&read("pids.max"));

    let mut io_stats = IoStats::new();
    for line in read("io.stat").lines() {
        for field in line.split_whitespace().skip(1) {
            let Some((key, value)) = field.split_once('=') else {
                continue;
            };
            let value: u64 = value.parse().unwrap_or(0);
            match key {
                "rbytes" => io_stats.read_bytes += value,
                "wbytes" => io_stats.write_bytes += value,
                "rios" => io_stats.read_ios += value,
                "wios" => io_stats.write_ios += value,
                _ => {}
            }
        }
    }

    let mut out = ContainerStats::new();
    out.cpu = Some(cpu).into();
    out.memory = Some(memory).into();
    out.pids = Some(pids).into();
    out.io = Some(io_stats).into();
    out.timestamp_unix_ns = crate::clock::unix_ns();
    Ok(out)
}

/// A one-value file; "max" (unlimited) and garbage read as 0.
fn single(text: &str) -> u64 {
    text.trim().parse().unwrap_or(0)
}

/// The value of `key` in a "key value" per line file.
fn keyed(text: &str, key: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_parse_the_v2_interface_files() {
        let dir = std::env::temp_dir().join(format!("pangolin-cg-{}", std::process::id()));
        fs::create_dir_all(dir.join("child")).expect("mkdir");
        fs::write(
            dir.join("cpu.stat"),
            "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n",
        )
        .expect("w");
        fs::write(dir.join("memory.current"), "4096\n").expect("w");
        fs::write(dir.join("memory.max"), "max\n").expect("w");
        fs::write(dir.join("memory.stat"), "anon 1024\nfile 2048\n").expect("w");
        fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .expect("w");
        fs::write(dir.join("pids.current"), "2\n").expect("w");
        fs::write(dir.join("pids.max"), "64\n").expect("w");
        fs::write(
            dir.join("io.stat"),
            "254:0 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0\n",
        )
        .expect("w");
        fs::write(dir.join("cgroup.procs"), "10\n11\n").expect("w");
        fs::write(dir.join("child/cgroup.procs"), "5\n").expect("w");

        let s = stats(&dir).expect("stats");
        assert_eq!(s.cpu.usage_usec, 1500);
        assert_eq!(s.memory.usage_bytes, 4096);
        assert_eq!(s.memory.limit_bytes, 0, "max reads as unlimited");
        assert_eq!(s.memory.file_bytes, 2048);
        assert_eq!(s.memory.oom_kill_events, 1);
        assert_eq!(s.pids.limit, 64);
        assert_eq!(s.io.write_bytes, 20);
        assert_eq!(oom_kills(&dir), 1);
        assert_eq!(pids(&dir).expect("pids"), vec![5, 10, 11]);
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn cgroup_paths_stay_under_the_root() {
        assert_eq!(
            dir_of(&default_path("c1")),
            Path::new("/sys/fs/cgroup/pangolin/c1")
        );
        assert_eq!(dir_of(Path::new("x/y")), Path::new("/sys/fs/cgroup/x/y"));
    }

    #[test]
    fn missing_cgroup_is_an_error() {
        assert!(stats(Path::new("/nonexistent/cgroup")).is_err());
    }
}
