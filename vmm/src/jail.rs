//! The jail `pangolin-vmm` enters first thing, before it builds the VM or reads anything a
//! guest controls. The jailer and the VMM are one binary: the host side starts it as root
//! with every resource already open ([`crate::resources`]), and in this order it
//!
//! 1. limits itself (RLIMIT_NOFILE from the config, RLIMIT_CORE 0: a core dump would hold guest
//!    memory);
//! 2. leaves the host's (or the pod's) mount, IPC, UTS and network namespaces (`unshare`: it
//!    reaches the world only through the descriptors it was given; a tap queue works from
//!    any namespace), makes every mount a slave (host unmounts still reach it, nothing of ours
//!    reaches the host);
//! 3. mounts an empty tmpfs on the configured root, binds the configured directories (the
//!    sandbox's socket directory) into it at their own paths (nosuid, nodev, noexec),
//!    `pivot_root`s into it, detaches the old root and makes the tmpfs read-only: the VMM's
//!    whole filesystem is its socket directory;
//! 4. names its UTS namespace, drops every capability from the bounding set, clears its
//!    supplementary groups and switches to the configured non-root uid/gid (which empties the
//!    permitted and effective sets), clears the inheritable and ambient sets, becomes
//!    non-dumpable (no ptrace or /proc peeking by other processes of the same uid) and sets
//!    no_new_privs;
//! 5. checks that no capability is left in any set.
//!
//! Any failure ends the VMM before a single guest instruction runs: a VMM that could not jail
//! itself never boots a guest.

use std::path::{Path, PathBuf};

use caps::CapSet;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::unistd::{chdir, pivot_root, setgroups, setresgid, setresuid, Gid, Uid};

use crate::config::JailConfig;

/// The hostname of every VMM's UTS namespace.
pub const HOSTNAME: &str = "pangolin-vmm";

/// A step of the jail failed.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A system call of one step failed.
    #[error("jail: {step}")]
    Step {
        /// The step.
        step: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A step on a path failed.
    #[error("jail: {step} {path}")]
    Path {
        /// The step.
        step: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Capabilities survived the drop.
    #[error("jail: capabilities left after the drop: {0}")]
    CapsLeft(String),
}

fn step(step: &'static str) -> impl Fn(nix::Error) -> JailError {
    move |e| JailError::Step {
        step,
        source: e.into(),
    }
}

fn on(step: &'static str, path: &Path) -> impl Fn(nix::Error) -> JailError {
    let path = path.to_path_buf();
    move |e| JailError::Path {
        step,
        path: path.clone(),
        source: e.into(),
    }
}

/// Enters `jail` (see the module docs). Call it while the process is single-threaded.
///
/// # Errors
/// [`JailError`] naming the step that failed; the caller must not go on.
pub fn enter(jail: &JailConfig) -> Result<(), JailError> {
    limit(jail.max_open_files)?;
    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWNET,
    )
    .map_err(step("unshare mount, IPC, UTS and network namespaces"))?;
    build_root(&jail.root, &jail.bind)?;
    nix::unistd::sethostname(HOSTNAME).map_err(step("sethostname"))?;
    drop_privileges(jail.uid, jail.gid)?;
    tracing::info!(uid = jail.uid, gid = jail.gid, bound = ?jail.bind, "jailed");
    Ok(())
}

fn limit(max_open_files: u64) -> Result<(), JailError> {
    use nix::sys::resource::{setrlimit, Resource};
    setrlimit(Resource::RLIMIT_NOFILE, max_open_files, max_open_files)
        .map_err(step("RLIMIT_NOFILE"))?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(step("RLIMIT_CORE"))?;
    Ok(())
}

fn build_root(root: &Path, bind: &[PathBuf]) -> Result<(), JailError> {
    let none = None::<&str>;
    mount(none, "/", none, MsFlags::MS_SLAVE | MsFlags::MS_REC, none)
        .map_err(step("make mounts slaves"))?;
    let locked = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        locked,
        Some("mode=0755,size=64k"),
    )
    .map_err(on("mount the tmpfs root on", root))?;
    for dir in bind {
        let relative = dir.strip_prefix("/").unwrap_or(dir);
        let target = root.join(relative);
        std::fs::create_dir_all(&target).map_err(|source| JailError::Path {
            step: "create the bind point",
            path: target.clone(),
            source,
        })?;
        mount(Some(dir.as_path()), &target, none, MsFlags::MS_BIND, none)
            .map_err(on("bind", dir))?;
        mount(
            none,
            &target,
            none,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | locked,
            none,
        )
        .map_err(on("remount nosuid,nodev,noexec", dir))?;
    }
    chdir(root).map_err(on("chdir", root))?;
    // pivot_root(".", "."): the old root ends up on top of the new one, then goes.
    pivot_root(".", ".").map_err(on("pivot_root into", root))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(step("detach the old root"))?;
    chdir("/").map_err(step("chdir /"))?;
    mount(
        none,
        "/",
        none,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | locked,
        none,
    )
    .map_err(step("make the root read-only"))?;
    Ok(())
}

fn drop_privileges(uid: u32, gid: u32) -> Result<(), JailError> {
    let caps_err = |step: &'static str| {
        move |e: caps::errors::CapsError| JailError::Step {
            step,
            source: std::io::Error::other(e.to_string()),
        }
    };
    // Needs CAP_SETPCAP: before the uid switch.
    caps::clear(None, CapSet::Bounding).map_err(caps_err("drop the bounding set"))?;
    setgroups(&[]).map_err(step("clear supplementary groups"))?;
    let (u, g) = (Uid::from_raw(uid), Gid::from_raw(gid));
    setresgid(g, g, g).map_err(step("setresgid"))?;
    // Without PR_SET_KEEPCAPS this empties the permitted and effective sets.
    setresuid(u, u, u).map_err(step("setresuid"))?;
    caps::clear(None, CapSet::Inheritable).map_err(caps_err("clear the inheritable set"))?;
    caps::clear(None, CapSet::Ambient).map_err(caps_err("clear the ambient set"))?;
    nix::sys::prctl::set_dumpable(false).map_err(step("PR_SET_DUMPABLE"))?;
    nix::sys::prctl::set_no_new_privs().map_err(step("PR_SET_NO_NEW_PRIVS"))?;
    let mut left = Vec::new();
    for set in [
        CapSet::Bounding,
        CapSet::Permitted,
        CapSet::Effective,
        CapSet::Inheritable,
        CapSet::Ambient,
    ] {
        let held = caps::read(None, set).map_err(caps_err("read capabilities"))?;
        if !held.is_empty() {
            left.push(format!("{set:?} {held:?}"));
        }
    }
    if !left.is_empty() {
        return Err(JailError::CapsLeft(left.join("; ")));
    }
    Ok(())
}
