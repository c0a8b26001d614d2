//! The leak audit: what a pod may leave on the host, listed before and after, and every entry
//! that was not there before named.
//!
//! [`Audit::take`] lists, per category:
//! - `process`: processes whose command line mentions a scope directory (VMMs, virtiofsd,
//!   vhost-device-vsock, shims, namespace holders), containerd itself left out;
//! - `containerd fd`: what containerd has open besides sockets, pipes and anonymous inodes
//!   (files, FIFOs, directories, by path; not its bolt databases, `*.db`, which a plugin opens
//!   at its first use and keeps), and `containerd sockets`: how many sockets and pipes
//!   (a count: gRPC connections come and go), allowed [`SOCKET_SLACK`] more than before;
//! - `mount`: mount points under a scope directory;
//! - `socket`: Unix sockets bound under a scope directory;
//! - `lease`: IPAM leases of the scope's CNI networks (`/var/lib/cni/networks/<name>`);
//! - `file`: every file under the scope's state directories;
//! - and, for a scope that owns the host ([`Scope::whole_host`]: nothing else runs pods, as in
//!   `cargo xtask stress`), `netns` (files and mounts under `/run/netns`: CRI's pod namespaces),
//!   shims' sockets (`/run/containerd/s`), `link` (host links), `qdisc` (host qdiscs),
//!   `cgroup` (cgroup directories whose path holds "pangolin" or "kubepods") and `memfd` (memfds
//!   open in any process).
//!
//! Every e2e test ends with an audit of its own directories ([`crate::TestEnv::finish`], and
//! [`crate::finish_containerd`] before its containerd stops);
//! host-wide entries are left to whole-host scopes, since tests run side by side.
//!
//! [`Audit::leaks_since`] is every entry of `self` not in the earlier audit (counts: above it),
//! as `category: entry` lines; [`assert_no_leaks`] retries for a while (teardown is
//! asynchronous: a netns or a socket goes a moment after its pod) and then fails with the list.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How many more sockets and pipes containerd may hold after than before.
pub const SOCKET_SLACK: u64 = 2;

/// What an audit looks at.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// Directories whose processes, mounts and sockets are the test's (its private dir,
    /// containerd's dir).
    pub dirs: Vec<PathBuf>,
    /// Directories every file under which is the test's state (pangolin's state dir,
    /// containerd's state dir).
    pub state_dirs: Vec<PathBuf>,
    /// The private containerd's pid.
    pub containerd_pid: Option<u32>,
    /// IPAM lease directories of the test's CNI networks (`/var/lib/cni/networks/<name>`).
    pub lease_dirs: Vec<PathBuf>,
    /// Nothing else on the host makes pods: host-wide categories are audited too.
    pub whole_host: bool,
}

/// One audit: entries per category, and counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Audit {
    /// Entries per category.
    pub entries: BTreeMap<&'static str, BTreeSet<String>>,
    /// Counts per category (compared with a slack).
    pub counts: BTreeMap<&'static str, u64>,
}

impl Audit {
    /// Lists what `scope` covers now.
    pub fn take(scope: &Scope) -> Audit {
        let mut a = Audit::default();
        let mentions = |text: &str| {
            scope
                .dirs
                .iter()
                .any(|d| text.contains(&*d.to_string_lossy()))
        };
        for (pid, cmd) in crate::processes_mentioning_any(&scope.dirs) {
            if Some(pid) != scope.containerd_pid {
                a.add("process", format!("{pid} {cmd}"));
            }
        }
        if let Some(pid) = scope.containerd_pid {
            let (paths, sockets) = open_fds(pid);
            for p in paths {
                a.add("containerd fd", p);
            }
            a.counts.insert("containerd sockets", sockets);
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for line in mountinfo.lines() {
            let point = line.split(' ').nth(4).unwrap_or_default();
            let netns = point.starts_with("/run/netns/") || point.starts_with("/var/run/netns/");
            if mentions(point) || (scope.whole_host && netns) {
                a.add("mount", point.to_string());
            }
        }
        let unix = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
        for line in unix.lines().skip(1) {
            let path = line.split_whitespace().nth(7).unwrap_or_default();
            if mentions(path) || (scope.whole_host && path.starts_with("/run/containerd/s/")) {
                a.add("socket", path.to_string());
            }
        }
        for dir in &scope.lease_dirs {
            for entry in files_under(dir) {
                let name = entry.file_name().map(|n| n.to_string_lossy().into_owned());
                if !matches!(
                    name.as_deref(),
                    Some("lock" | "last_reserved_ip.0" | "last_reserved_ip.1")
                ) {
                    a.add("lease", entry.display().to_string());
                }
            }
        }
        for dir in &scope.state_dirs {
            for f in files_under(dir) {
                a.add("file", f.display().to_string());
            }
        }
        if scope.whole_host {
            a.whole_host();
        }
        a
    }

    fn add(&mut self, category: &'static str, entry: String) {
        self.entries.entry(category).or_default().insert(entry);
    }

    fn whole_host(&mut self) {
        for f in files_under(Path::new("/run/netns")) {
            self.add("netns", f.display().to_string());
        }
        for line in command_lines("ip", &["-o", "link", "show"]) {
            let name = line.split(':').nth(1).unwrap_or_default().trim();
            self.add("link", name.split('@').next().unwrap_or(name).to_string());
        }
        for line in command_lines("tc", &["qdisc", "show"]) {
            // "qdisc <kind> <handle>: dev <name> ..." without the counters.
            let words: Vec<&str> = line.split_whitespace().take(5).collect();
            self.add("qdisc", words.join(" "));
        }
        for root in ["/sys/fs/cgroup"] {
            for dir in dirs_under(Path::new(root), 5) {
                let s = dir.display().to_string();
                if s.contains("pangolin") || s.contains("kubepods") {
                    self.add("cgroup", s);
                }
            }
        }
        for (pid, memfd) in memfds() {
            self.add("memfd", format!("{pid} {memfd}"));
        }
    }

    /// Every entry here that `before` did not have, and every count above its earlier value
    /// (plus the slack), as `category: entry` lines.
    pub fn leaks_since(&self, before: &Audit) -> Vec<String> {
        let mut out = Vec::new();
        for (category, entries) in &self.entries {
            let old = before.entries.get(category);
            for e in entries {
                if !old.is_some_and(|o| o.contains(e)) {
                    out.push(format!("{category}: {e}"));
                }
            }
        }
        for (category, n) in &self.counts {
            let old = before.counts.get(category).copied().unwrap_or(0);
            if *n > old + SOCKET_SLACK {
                out.push(format!("{category}: {n} (before: {old})"));
            }
        }
        out
    }
}

/// Fails with the list of what `scope` holds now that `before` did not, once teardown had
/// `within` (times [`crate::patience`]) to finish.
pub fn assert_no_leaks(scope: &Scope, before: &Audit, within: Duration) {
    let deadline = Instant::now() + crate::patience(within);
    loop {
        let leaks = Audit::take(scope).leaks_since(before);
        if leaks.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "left on the host:\n  {}",
            leaks.join("\n  ")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Paths of `pid`'s descriptors that are not sockets, pipes, anonymous inodes or bolt databases
/// (containerd's metadata and a snapshotter's, opened at first use and kept), and how many are
/// sockets, pipes or anonymous inodes.
fn open_fds(pid: u32) -> (Vec<String>, u64) {
    let mut paths = Vec::new();
    let mut others = 0;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let t = target.display().to_string();
        if t.starts_with("socket:") || t.starts_with("pipe:") || t.starts_with("anon_inode:") {
            others += 1;
        } else if !t.starts_with("/dev/") && !t.ends_with(".db") {
            paths.push(t);
        }
    }
    (paths, others)
}

/// Every memfd open in any process, as (pid, `/memfd:name`).
fn memfds() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        for fd in std::fs::read_dir(p.path().join("fd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(t) = std::fs::read_link(fd.path()) {
                let t = t.display().to_string();
                if t.starts_with("/memfd:") {
                    out.push((pid, t));
                }
            }
        }
    }
    out
}

/// Every file (not directory) below `dir`, recursively; none when it does not exist.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut queue = vec![dir.to_path_buf()];
    while let Some(d) = queue.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => queue.push(e.path()),
                Ok(_) => out.push(e.path()),
                Err(_) => {}
            }
        }
    }
    out
}

/// Directories below `dir` down to `depth` levels.
fn dirs_under(dir: &Path, depth: usize) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut queue = vec![(dir.to_path_buf(), 0)];
    while let Some((d, level)) = queue.pop() {
        if level == depth {
            continue;
        }
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.push(e.path());
                queue.push((e.path(), level + 1));
            }
        }
    }
    out
}

/// The output lines of a command (none when it cannot run).
fn command_lines(program: &str, args: &[&str]) -> Vec<String> {
    std::process::Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_file_and_a_socket_count_past_the_slack_are_leaks_and_what_was_there_is_not() {
        let dir = std::env::temp_dir().join(format!("pangolin-audit-{}", std::process::id()));
        let state = dir.join("state");
        std::fs::create_dir_all(&state).expect("mkdir");
        std::fs::write(state.join("old"), "").expect("old file");
        let scope = Scope {
            dirs: vec![dir.clone()],
            state_dirs: vec![state.clone()],
            ..Scope::default()
        };
        let before = Audit::take(&scope);
        assert!(Audit::take(&scope).leaks_since(&before).is_empty());
        std::fs::create_dir_all(state.join("pod")).expect("mkdir");
        std::fs::write(state.join("pod/sock"), "").expect("new file");
        let leaks = Audit::take(&scope).leaks_since(&before);
        assert!(
            leaks
                .iter()
                .any(|l| l.starts_with("file: ") && l.ends_with("pod/sock")),
            "{leaks:?}"
        );
        assert!(leaks.iter().all(|l| !l.contains("/old")), "{leaks:?}");
        let mut counted = before.clone();
        counted.counts.insert("containerd sockets", 10);
        let mut more = before.clone();
        more.counts
            .insert("containerd sockets", 10 + SOCKET_SLACK + 1);
        assert_eq!(more.leaks_since(&counted).len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
