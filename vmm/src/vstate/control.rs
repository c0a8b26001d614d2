//! Run control shared by the vCPU threads and the event loop.
//!
//! States: `Running` → `Paused` (vCPUs park outside KVM_RUN) → `Running`, `Running`/`Paused` →
//! `HandingOver` (a snapshot: each vCPU thread completes its last exit, hands its vCPU to the
//! event loop and returns), and any → `Stopping` (vCPU threads return). The first exit reason recorded wins; recording one signals `exit_evt`,
//! which the event loop watches.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the VMM stops; each maps to a distinct process exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off or reset (triple fault, i8042 reset, KVM system event).
    GuestShutdown,
    /// A `stop` request on the control socket.
    Requested,
    /// SIGTERM or SIGINT.
    Signal,
    /// KVM or a vCPU failed; details are in the log.
    Failed(&'static str),
    /// A `snapshot` request wrote the VM to its snapshot files (a template is never resumed).
    Snapshotted,
}

impl ExitReason {
    /// The process exit status: 0 guest shutdown, 1 failure, 3 requested stop, 4 signal,
    /// 5 snapshot taken.
    pub fn code(self) -> i32 {
        match self {
            ExitReason::GuestShutdown => 0,
            ExitReason::Failed(_) => 1,
            ExitReason::Requested => 3,
            ExitReason::Signal => 4,
            ExitReason::Snapshotted => 5,
        }
    }
}

/// What the vCPUs should be doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Running guest code.
    Running,
    /// Parked until resumed.
    Paused,
    /// Handing their vCPUs over for a snapshot, then returning from their threads.
    HandingOver,
    /// Returning from their threads.
    Stopping,
}

/// What a vCPU thread does next, from [`Control::vcpu_checkpoint`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkpoint {
    /// Enter the guest again.
    Run,
    /// Complete the last exit, hand the vCPU over, return.
    HandOver,
    /// Return.
    Stop,
}

struct Inner {
    state: RunState,
    parked: usize,
    exit: Option<ExitReason>,
}

/// Shared run control.
pub struct Control {
    inner: Mutex<Inner>,
    cond: Condvar,
    /// Signalled once an exit reason is recorded.
    pub exit_evt: EventFd,
}

/// Control could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("run control eventfd")]
pub struct ControlError(#[source] std::io::Error);

impl Control {
    /// Control in the `Running` state.
    pub fn new() -> Result<Self, ControlError> {
        Ok(Self {
            inner: Mutex::new(Inner {
                state: RunState::Running,
                parked: 0,
                exit: None,
            }),
            cond: Condvar::new(),
            exit_evt: EventFd::new(EFD_NONBLOCK).map_err(ControlError)?,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current state.
    pub fn state(&self) -> RunState {
        self.lock().state
    }

    /// Records why the VMM stops (first one wins) and moves to `Stopping`.
    pub fn exit(&self, reason: ExitReason) {
        let mut inner = self.lock();
        if inner.exit.is_none() {
            inner.exit = Some(reason);
        }
        inner.state = RunState::Stopping;
        self.cond.notify_all();
        drop(inner);
        let _ = self.exit_evt.write(1);
    }

    /// The recorded exit reason.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.lock().exit
    }

    /// Moves to `Paused`; false unless it was `Running`.
    pub fn request_pause(&self) -> bool {
        let mut inner = self.lock();
        if inner.state != RunState::Running {
            return false;
        }
        inner.state = RunState::Paused;
        true
    }

    /// Moves to `HandingOver` (and wakes parked vCPUs); false unless it was `Running` or
    /// `Paused`. There is no way back: the vCPU threads end.
    pub fn request_handover(&self) -> bool {
        let mut inner = self.lock();
        if !matches!(inner.state, RunState::Running | RunState::Paused) {
            return false;
        }
        inner.state = RunState::HandingOver;
        self.cond.notify_all();
        true
    }

    /// Moves back to `Running`; false unless it was `Paused`.
    pub fn resume(&self) -> bool {
        let mut inner = self.lock();
        if inner.state != RunState::Paused {
            return false;
        }
        inner.state = RunState::Running;
        self.cond.notify_all();
        true
    }

    /// Waits until `count` vCPUs are parked, calling `kick` between checks (a vCPU inside KVM_RUN
    /// only notices after a signal); false on timeout.
    pub fn wait_parked(&self, count: usize, timeout: Duration, kick: impl Fn()) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let inner = self.lock();
                if inner.parked >= count || inner.state != RunState::Paused {
                    return inner.parked >= count;
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            kick();
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Called by a vCPU thread outside KVM_RUN: blocks while paused, then says what to do.
    pub fn vcpu_checkpoint(&self) -> Checkpoint {
        let mut inner = self.lock();
        if inner.state == RunState::Paused {
            inner.parked += 1;
            while inner.state == RunState::Paused {
                inner = self.cond.wait(inner).unwrap_or_else(|p| p.into_inner());
            }
            inner.parked -= 1;
        }
        match inner.state {
            RunState::Running => Checkpoint::Run,
            RunState::HandingOver => Checkpoint::HandOver,
            RunState::Paused | RunState::Stopping => Checkpoint::Stop,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn handover_wakes_parked_vcpus_and_is_final() {
        let c = Arc::new(Control::new().expect("control"));
        assert!(c.request_pause());
        let c2 = c.clone();
        let t = std::thread::spawn(move || c2.vcpu_checkpoint());
        assert!(c.wait_parked(1, Duration::from_secs(5), || {}));
        assert!(c.request_handover());
        assert_eq!(t.join().expect("join"), Checkpoint::HandOver);
        assert!(!c.request_handover());
        assert!(!c.resume());
        assert!(!c.request_pause());
        c.exit(ExitReason::Snapshotted);
        assert_eq!(c.vcpu_checkpoint(), Checkpoint::Stop);
        assert_eq!(ExitReason::Snapshotted.code(), 5);
    }

    #[test]
    fn pause_parks_vcpus_until_resume_and_first_exit_wins() {
        let c = Arc::new(Control::new().expect("control"));
        assert!(c.request_pause());
        assert!(!c.request_pause());
        let c2 = c.clone();
        let t = std::thread::spawn(move || c2.vcpu_checkpoint());
        assert!(c.wait_parked(1, Duration::from_secs(5), || {}));
        assert!(c.resume());
        assert_eq!(t.join().expect("join"), Checkpoint::Run);
        c.exit(ExitReason::Requested);
        c.exit(ExitReason::GuestShutdown);
        assert_eq!(c.exit_reason(), Some(ExitReason::Requested));
        assert_eq!(c.exit_evt.read().expect("signalled"), 2);
        assert_eq!(c.vcpu_checkpoint(), Checkpoint::Stop);
        assert_eq!(ExitReason::Requested.code(), 3);
    }
}
