//! A process that holds a pod's network namespace for OCI hooks. Hooks find the namespace by
//! the state's `pid` (`/proc/<pid>/ns/net`: Docker's `libnetwork-setkey`, nerdctl's network
//! hook), so that pid must be a process in it. The VMM is not one when it is jailed (its jail
//! has a network namespace of its own), so a pod with host hooks gets this holder instead: its
//! own binary started again with [`HOLD_ARG`], which does nothing until it is killed (by its
//! sandbox, or by the kernel when the thread that started it dies: `PR_SET_PDEATHSIG`).

use std::path::Path;

use crate::daemon::{Daemon, DaemonError};

/// The argument that makes a Pangolin binary a holder ([`hold_if_asked`]).
pub const HOLD_ARG: &str = "--pangolin-hold-netns";

/// Never returns when this process was started as a holder; a binary that starts sandboxes
/// with a holder calls it first thing in `main`.
pub fn hold_if_asked() {
    if std::env::args_os().nth(1).is_some_and(|a| a == HOLD_ARG) {
        loop {
            nix::unistd::pause();
        }
    }
}

/// Starts a holder in `netns`, its output (none) to `log`.
///
/// # Errors
/// [`DaemonError::Spawn`] when the namespace cannot be opened or the process not started.
pub fn spawn(netns: &Path, log: &Path) -> Result<Daemon, DaemonError> {
    // The running binary, even if its file was replaced since (an upgrade).
    Daemon::spawn_in(
        "netns holder",
        Path::new("/proc/self/exe"),
        // The namespace's path only names the holder in `ps`.
        &[HOLD_ARG.to_string(), netns.display().to_string()],
        log,
        Some(netns),
    )
}
