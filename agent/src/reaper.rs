//! Zombie reaping for PID 1, and the one place exit statuses come from.
//!
//! As PID 1 the agent inherits every orphan in the guest, so it reaps with `waitpid(-1)` on each
//! SIGCHLD. Because that also collects the agent's own children (helpers, container inits), no
//! other code may call `waitpid`; it registers the pid here and awaits the status instead.
//!
//! Race: a child can exit before its pid is registered (a container init that fails at once).
//! Unclaimed statuses are therefore kept, bounded, and handed out on registration.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// Unclaimed exit statuses kept for late registration; older ones are dropped first.
const MAX_UNCLAIMED: usize = 1024;

/// How a process ended, as seen by its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// Normal exit with this code.
    Exited(i32),
    /// Killed by this signal number.
    Signaled(i32),
}

impl ExitStatus {
    /// Shell convention: the code, or 128 + signal.
    pub fn shell_status(self) -> i32 {
        match self {
            ExitStatus::Exited(code) => code,
            ExitStatus::Signaled(sig) => 128 + sig,
        }
    }

    /// The terminating signal, 0 for a normal exit.
    pub fn signal(self) -> i32 {
        match self {
            ExitStatus::Exited(_) => 0,
            ExitStatus::Signaled(sig) => sig,
        }
    }
}

/// An exit status and when the reaper collected it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// How the process ended.
    pub status: ExitStatus,
    /// Wall-clock time it was reaped, nanoseconds since the Unix epoch.
    pub at_unix_ns: u64,
}

/// Receives a process's exit once it is known.
pub type ExitWatch = watch::Receiver<Option<Exit>>;

#[derive(Default)]
struct Table {
    waiting: HashMap<i32, watch::Sender<Option<Exit>>>,
    unclaimed: HashMap<i32, (u64, Exit)>,
    seq: u64,
}

/// Shared handle to the reaper's pid table.
#[derive(Clone, Default)]
pub struct Reaper {
    table: Arc<Mutex<Table>>,
}

impl Reaper {
    /// Starts reaping on SIGCHLD; call once, from PID 1 (or a subreaper).
    pub fn spawn() -> std::io::Result<Reaper> {
        let reaper = Reaper::default();
        let mut sigchld = signal(SignalKind::child())?;
        let r = reaper.clone();
        tokio::spawn(async move {
            loop {
                r.reap_all();
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok(reaper)
    }

    /// Watches `pid`'s exit; the status may already be known.
    pub fn register(&self, pid: i32) -> ExitWatch {
        let mut table = self.lock();
        let initial = table.unclaimed.remove(&pid).map(|(_, status)| status);
        let (tx, rx) = watch::channel(initial);
        if initial.is_none() {
            table.waiting.insert(pid, tx);
        }
        rx
    }

    /// Waits for `pid` (registered or not) to exit.
    pub async fn wait(&self, pid: i32) -> Exit {
        wait_exit(self.register(pid)).await
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // A poisoned table still holds valid data: every update is a single insert/remove.
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Collects every exited child without blocking.
    pub fn reap_all(&self) {
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, ExitStatus::Exited(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, ExitStatus::Signaled(sig as i32)),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(err) => {
                    tracing::warn!(%err, "waitpid failed");
                    return;
                }
            };
            self.record(status.0.as_raw(), status.1);
        }
    }

    fn record(&self, pid: i32, status: ExitStatus) {
        let status = Exit {
            status,
            at_unix_ns: crate::clock::unix_ns(),
        };
        let mut table = self.lock();
        if let Some(tx) = table.waiting.remove(&pid) {
            tracing::debug!(pid, ?status, "process exited");
            let _ = tx.send(Some(status));
            return;
        }
        table.seq += 1;
        let seq = table.seq;
        table.unclaimed.insert(pid, (seq, status));
        if table.unclaimed.len() > MAX_UNCLAIMED {
            if let Some(oldest) = table
                .unclaimed
                .iter()
                .min_by_key(|(_, (s, _))| *s)
                .map(|(p, _)| *p)
            {
                table.unclaimed.remove(&oldest);
            }
        }
    }
}

/// Waits until the watch carries a status.
pub async fn wait_exit(mut rx: ExitWatch) -> Exit {
    loop {
        if let Some(status) = *rx.borrow_and_update() {
            return status;
        }
        if rx.changed().await.is_err() {
            // The sender is only dropped after sending; treat a lost sender as a kill.
            let lost = Exit {
                status: ExitStatus::Signaled(libc::SIGKILL),
                at_unix_ns: crate::clock::unix_ns(),
            };
            return rx.borrow().unwrap_or(lost);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_status_follows_the_shell_convention() {
        assert_eq!(ExitStatus::Exited(7).shell_status(), 7);
        assert_eq!(ExitStatus::Signaled(9).shell_status(), 137);
        assert_eq!(ExitStatus::Signaled(9).signal(), 9);
        assert_eq!(ExitStatus::Exited(0).signal(), 0);
    }

    #[tokio::test]
    async fn status_recorded_before_registration_is_handed_out() {
        let reaper = Reaper::default();
        reaper.record(4242, ExitStatus::Exited(3));
        let exit = reaper.wait(4242).await;
        assert_eq!(exit.status, ExitStatus::Exited(3));
        assert!(exit.at_unix_ns > 0);
    }

    #[tokio::test]
    async fn registered_waiter_gets_the_status() {
        let reaper = Reaper::default();
        let rx = reaper.register(77);
        reaper.record(77, ExitStatus::Signaled(9));
        assert_eq!(wait_exit(rx).await.status, ExitStatus::Signaled(9));
    }

    #[test]
    fn unclaimed_statuses_are_bounded() {
        let reaper = Reaper::default();
        for pid in 0..i32::try_from(MAX_UNCLAIMED + 10).expect("small") {
            reaper.record(pid, ExitStatus::Exited(0));
        }
        let table = reaper.lock();
        assert_eq!(table.unclaimed.len(), MAX_UNCLAIMED);
        assert!(!table.unclaimed.contains_key(&0));
    }
}
