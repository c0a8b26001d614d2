//! The pod's cgroup on the host: every process a sandbox starts (the VMM or QEMU, virtiofsd,
//! vhost-device-vsock) runs in it, so the pod's host-side CPU and memory (guest RAM included)
//! are charged to the pod, under whatever limits its parent (kubelet's pod cgroup) sets.
//!
//! The path is the first task's `linux.cgroupsPath` (for a CRI pod the sandbox container's,
//! `<cgroup_parent>/<sandbox id>` or containerd's default `/k8s.io/<id>`), in the cgroupfs
//! form. cgroup v1 (each controller's hierarchy), hybrid and v2 hosts are handled by youki's
//! `libcgroups`. The systemd form (`slice:prefix:name`) needs systemd to create a scope over
//! D-Bus and is not supported: the pod then runs in the shim's cgroup and a warning says so.
//! When the cgroup is removed, whatever still runs in it is killed first.

use std::path::{Path, PathBuf};

use libcgroups::common::{create_cgroup_manager, AnyCgroupManager, CgroupConfig, CgroupManager};
use nix_libcgroups::unistd::Pid;

/// The pod cgroup could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// `linux.cgroupsPath` is not a usable cgroupfs path.
    #[error("linux.cgroupsPath {path:?}: {why}")]
    Path {
        /// The value.
        path: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Something else's processes run in the cgroup already: the pod's teardown kills
    /// whatever is in its cgroup, so it must be the pod's alone.
    #[error(
        "linux.cgroupsPath {path}: the cgroup already holds processes {pids:?} of something \
         else; a pod needs a cgroup of its own"
    )]
    InUse {
        /// The cgroup.
        path: PathBuf,
        /// Some of the processes in it.
        pids: Vec<i32>,
    },
    /// The host's cgroup setup could not be read.
    #[error("pod cgroup {path}: {message}")]
    Host {
        /// The cgroup.
        path: PathBuf,
        /// What libcgroups said.
        message: String,
    },
    /// A process could not be moved into the cgroup.
    #[error("moving {what} (pid {pid}) into the pod cgroup {path}: {message}")]
    Add {
        /// Which helper.
        what: &'static str,
        /// Its pid.
        pid: u32,
        /// The cgroup.
        path: PathBuf,
        /// What libcgroups said.
        message: String,
    },
}

/// Reads a pod's cgroup path from `linux.cgroupsPath`: `None` when the spec has none or names
/// a systemd unit (logged), an error when it is not a clean absolute path.
///
/// # Errors
/// [`CgroupError::Path`] naming the field.
pub fn pod_cgroup_path(cgroups_path: Option<&str>) -> Result<Option<PathBuf>, CgroupError> {
    let Some(raw) = cgroups_path.filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    let bad = |why| CgroupError::Path {
        path: raw.to_string(),
        why,
    };
    if !raw.starts_with('/') {
        if raw.split(':').count() == 3 {
            tracing::warn!(
                cgroups_path = raw,
                "systemd cgroup paths are not supported: the pod's VM runs in the shim's cgroup"
            );
            return Ok(None);
        }
        return Err(bad("must be an absolute cgroupfs path"));
    }
    if raw.split('/').any(|part| part == "." || part == "..") {
        return Err(bad("must not hold '.' or '..'"));
    }
    let path = PathBuf::from(raw);
    if path.components().count() < 2 {
        return Err(bad("must name a cgroup below the root"));
    }
    Ok(Some(path))
}

/// How long [`PodCgroup::remove`] retries a cgroup that is still busy.
pub const REMOVE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// The pod's host cgroup, created for it.
pub struct PodCgroup {
    path: PathBuf,
    /// Made once: it holds the host's cgroup layout (version, each controller's mount),
    /// detected from `/proc/self/cgroup` and mountinfo when the pod cgroup is made.
    manager: AnyCgroupManager,
}

impl std::fmt::Debug for PodCgroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodCgroup")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl PodCgroup {
    /// The pod cgroup at `path` (a value from [`pod_cgroup_path`]); its directories are made
    /// when the first process is added.
    ///
    /// # Errors
    /// [`CgroupError::Host`] when the host's cgroup setup cannot be detected.
    pub fn new(path: &Path) -> Result<Self, CgroupError> {
        let manager = create_cgroup_manager(CgroupConfig {
            cgroup_path: path.to_path_buf(),
            systemd_cgroup: false,
            container_name: String::new(),
        })
        .map_err(|e| CgroupError::Host {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            manager,
        })
    }

    /// Fails when processes already run in the cgroup (or below it): another pod's or
    /// container's, which this pod's teardown would kill. A cgroup that does not exist yet,
    /// or cannot be read, holds none.
    ///
    /// # Errors
    /// [`CgroupError::InUse`] with some of their pids.
    pub fn refuse_if_in_use(&self) -> Result<(), CgroupError> {
        let mut pids: Vec<i32> = self
            .manager
            .get_all_pids()
            .map(|p| p.into_iter().map(Pid::as_raw).collect())
            .unwrap_or_default();
        if pids.is_empty() {
            return Ok(());
        }
        pids.truncate(8);
        Err(CgroupError::InUse {
            path: self.path.clone(),
            pids,
        })
    }

    /// The path, relative to each hierarchy's root.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves process `pid` (one of the sandbox's helpers, named `what`) into the cgroup.
    ///
    /// # Errors
    /// [`CgroupError::Add`] when the kernel refuses.
    pub fn add(&self, what: &'static str, pid: u32) -> Result<(), CgroupError> {
        let failed = |message: String| CgroupError::Add {
            what,
            pid,
            path: self.path.clone(),
            message,
        };
        let raw = i32::try_from(pid).map_err(|_| failed("pid out of range".into()))?;
        self.manager
            .add_task(Pid::from_raw(raw))
            .map_err(|e| failed(e.to_string()))?;
        tracing::debug!(what, pid, cgroup = %self.path.display(), "placed in the pod cgroup");
        Ok(())
    }

    /// [`Self::add`] for `pid` and then every process it has forked so far, for a daemon that
    /// may fork before it could be placed (virtiofsd forks into its sandbox at once). Race-free:
    /// a fork after `pid` moved inherits the cgroup, and one before it is among the children
    /// read after the move (fork and migration exclude each other in the kernel).
    pub fn add_tree(&self, what: &'static str, pid: u32) -> Result<(), CgroupError> {
        self.add(what, pid)?;
        for child in children(pid) {
            // A child that exited in between is no longer ours to place.
            match self.add_tree(what, child) {
                Err(_) if !Path::new(&format!("/proc/{child}")).exists() => {}
                other => other?,
            }
        }
        Ok(())
    }

    /// Kills whatever still runs in the cgroup and removes it from every hierarchy; failures
    /// are logged (the caller is tearing down and cannot do better).
    ///
    /// Processes killed a moment ago may still be exiting (a VMM unmapping its guest RAM takes
    /// a while, the more so under emulation), which keeps the cgroup busy: the removal is
    /// retried for up to [`REMOVE_PATIENCE`].
    pub fn remove(&self) {
        let started = std::time::Instant::now();
        loop {
            match self.manager.remove() {
                Ok(()) => return,
                Err(_) if started.elapsed() < REMOVE_PATIENCE => {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(e) => {
                    let e = CgroupError::Host {
                        path: self.path.clone(),
                        message: e.to_string(),
                    };
                    tracing::warn!(error = %e, "cannot remove the pod cgroup");
                    return;
                }
            }
        }
    }

    /// [`Self::remove`] for async callers: its retries sleep, so it runs on tokio's blocking
    /// pool rather than stalling a runtime worker (they serve every task of the pod).
    pub async fn remove_off_runtime(self: std::sync::Arc<Self>) {
        if let Err(e) = tokio::task::spawn_blocking(move || self.remove()).await {
            tracing::warn!(error = %e, "removing the pod cgroup");
        }
    }
}

/// The pids `pid`'s threads have forked (`/proc/<pid>/task/*/children`).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroups_path_forms() {
        assert_eq!(pod_cgroup_path(None).expect("none"), None);
        assert_eq!(pod_cgroup_path(Some("")).expect("empty"), None);
        assert_eq!(
            pod_cgroup_path(Some("/k8s.io/abc")).expect("cgroupfs"),
            Some(PathBuf::from("/k8s.io/abc"))
        );
        assert_eq!(
            pod_cgroup_path(Some("kubepods.slice:cri-containerd:abc")).expect("systemd"),
            None
        );
        for bad in ["relative/path", "/a/../b", "/a/./b", "/"] {
            let e = pod_cgroup_path(Some(bad)).expect_err(bad).to_string();
            assert!(e.starts_with("linux.cgroupsPath"), "{e}");
        }
    }

    #[test]
    fn a_cgroup_that_holds_another_process_is_refused_and_a_fresh_one_is_not() {
        let path = PathBuf::from(format!("/pangolin-unit-inuse-{}", std::process::id()));
        let first = PodCgroup::new(&path).expect("cgroup");
        first
            .refuse_if_in_use()
            .expect("a cgroup that does not exist holds nothing");
        let mut sleeper = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        first.add("sleeper", sleeper.id()).expect("add");
        let second = PodCgroup::new(&path).expect("cgroup");
        let err = second.refuse_if_in_use().expect_err("in use");
        let pid = i32::try_from(sleeper.id()).expect("pid");
        assert!(
            matches!(&err, CgroupError::InUse { pids, .. } if pids.contains(&pid)),
            "{err}"
        );
        assert!(err.to_string().starts_with("linux.cgroupsPath"), "{err}");
        first.remove();
        let _ = sleeper.wait();
        second.refuse_if_in_use().expect("removed: empty again");
    }
}
