//! One process of a container (its init, or an exec) as the shim tracks it.
//!
//! ```text
//!            start            exit (agent), VMM death, kill before start
//! Created ─────────► Running ───────────────────────────────────────► Exited
//!    │                 ▲ │ pause / resume (init only)                   ▲
//!    │                 │ ▼                                              │
//!    │               Paused ────────────── exit, VMM death ─────────────┘
//!    └──────────────── kill (init: counts as killed), VMM death ────────┘
//! ```
//! `Exited` is final. A process has a pid only once started; there is no pid 0 sentinel.

use containerd_shim::protos::api::Status;
use tokio::sync::{oneshot, watch};

use super::io::StdioPaths;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit status (128 + signal when killed).
    pub status: u32,
    /// When, in ns since the epoch.
    pub at_unix_ns: u64,
}

impl Exit {
    /// An exit with `status` now.
    pub fn now(status: u32) -> Exit {
        let at_unix_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        Exit { status, at_unix_ns }
    }

    /// The exit time as containerd's messages carry it.
    pub fn exited_at(
        &self,
    ) -> protobuf::MessageField<protobuf::well_known_types::timestamp::Timestamp> {
        let mut t = protobuf::well_known_types::timestamp::Timestamp::new();
        t.seconds = i64::try_from(self.at_unix_ns / 1_000_000_000).unwrap_or(i64::MAX);
        t.nanos = i32::try_from(self.at_unix_ns % 1_000_000_000).unwrap_or(0);
        protobuf::MessageField::some(t)
    }
}

/// Where a process is in its lifecycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessState {
    /// Created (init: in the guest, waiting for start; exec: recorded, not yet in the guest).
    Created,
    /// Being started: the agent call is under way.
    Starting,
    /// Running in the guest.
    Running {
        /// Guest pid.
        pid: u32,
    },
    /// Frozen with its container (init only).
    Paused {
        /// Guest pid.
        pid: u32,
    },
    /// Ended; final.
    Exited {
        /// Guest pid, if it ever started.
        pid: Option<u32>,
        /// How it ended.
        exit: Exit,
    },
}

/// Which kind of process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// The container's init.
    Init,
    /// An exec, with its OCI process JSON (handed to the agent at start).
    Exec {
        /// OCI process JSON.
        spec: String,
    },
}

/// One process and the handles of its streams.
#[derive(Debug)]
pub struct Process {
    /// Init or exec.
    pub kind: Kind,
    /// containerd's FIFOs.
    pub stdio: StdioPaths,
    state: ProcessState,
    /// Ends stdin once what the client wrote is forwarded (CloseIO); set while running.
    close_stdin: Option<oneshot::Sender<()>>,
    exit: watch::Sender<Option<Exit>>,
}

impl Process {
    /// A created process.
    pub fn new(kind: Kind, stdio: StdioPaths) -> Process {
        Process {
            kind,
            stdio,
            state: ProcessState::Created,
            close_stdin: None,
            exit: watch::channel(None).0,
        }
    }

    /// Its state.
    pub fn state(&self) -> &ProcessState {
        &self.state
    }

    /// Its guest pid once started.
    pub fn pid(&self) -> Option<u32> {
        match self.state {
            ProcessState::Running { pid } | ProcessState::Paused { pid } => Some(pid),
            ProcessState::Exited { pid, .. } => pid,
            ProcessState::Created | ProcessState::Starting => None,
        }
    }

    /// Its exit, once exited.
    pub fn exit(&self) -> Option<Exit> {
        match self.state {
            ProcessState::Exited { exit, .. } => Some(exit),
            _ => None,
        }
    }

    /// containerd's name for the state.
    pub fn status(&self) -> Status {
        match self.state {
            ProcessState::Created | ProcessState::Starting => Status::CREATED,
            ProcessState::Running { .. } => Status::RUNNING,
            ProcessState::Paused { .. } => Status::PAUSED,
            ProcessState::Exited { .. } => Status::STOPPED,
        }
    }

    /// Whether it may be started now.
    pub fn can_start(&self) -> bool {
        self.state == ProcessState::Created
    }

    /// Whether it may be deleted now (it is not running).
    pub fn can_delete(&self) -> bool {
        matches!(
            self.state,
            ProcessState::Created | ProcessState::Exited { .. }
        )
    }

    /// Whether it runs in the guest (a signal can reach it).
    pub fn is_live(&self) -> bool {
        matches!(
            self.state,
            ProcessState::Running { .. } | ProcessState::Paused { .. }
        )
    }

    /// Created → Starting; false (unchanged) from any other state.
    pub fn begin_start(&mut self) -> bool {
        if !self.can_start() {
            return false;
        }
        self.state = ProcessState::Starting;
        true
    }

    /// Starting → Created again, after the agent refused to start it.
    pub fn start_failed(&mut self) {
        if self.state == ProcessState::Starting {
            self.state = ProcessState::Created;
        }
    }

    /// Starting → Running; false if it is no longer starting (e.g. it was failed meanwhile).
    pub fn started(&mut self, pid: u32, close_stdin: Option<oneshot::Sender<()>>) -> bool {
        if self.state != ProcessState::Starting {
            return false;
        }
        self.state = ProcessState::Running { pid };
        self.close_stdin = close_stdin;
        true
    }

    /// Running ⇄ Paused; false when not in the state left.
    pub fn set_paused(&mut self, paused: bool) -> bool {
        match (&self.state, paused) {
            (ProcessState::Running { pid }, true) => {
                self.state = ProcessState::Paused { pid: *pid };
                true
            }
            (ProcessState::Paused { pid }, false) => {
                self.state = ProcessState::Running { pid: *pid };
                true
            }
            _ => false,
        }
    }

    /// Any state → Exited, waking waiters; false (unchanged) if it had exited already.
    pub fn exited(&mut self, exit: Exit) -> bool {
        if self.exit().is_some() {
            return false;
        }
        self.state = ProcessState::Exited {
            pid: self.pid(),
            exit,
        };
        self.close_stdin = None;
        self.exit.send_replace(Some(exit));
        true
    }

    /// Takes the CloseIO handle (None when there is no stdin pump).
    pub fn take_close_stdin(&mut self) -> Option<oneshot::Sender<()>> {
        self.close_stdin.take()
    }

    /// A receiver that sees the exit.
    pub fn subscribe(&self) -> watch::Receiver<Option<Exit>> {
        self.exit.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process() -> Process {
        Process::new(Kind::Init, StdioPaths::default())
    }

    #[test]
    fn a_process_runs_through_its_lifecycle_once() {
        let mut p = process();
        assert!(p.can_start() && p.can_delete() && !p.is_live());
        assert_eq!((p.status(), p.pid()), (Status::CREATED, None));
        assert!(p.begin_start());
        assert!(!p.begin_start(), "a second start is refused");
        assert!(!p.can_delete(), "cannot delete while starting");
        assert!(p.started(42, None));
        assert_eq!((p.status(), p.pid()), (Status::RUNNING, Some(42)));
        assert!(p.set_paused(true) && p.status() == Status::PAUSED);
        assert!(!p.set_paused(true));
        assert!(p.set_paused(false));
        let rx = p.subscribe();
        assert!(p.exited(Exit::now(0)));
        assert!(!p.exited(Exit::now(1)), "the first exit stays");
        assert_eq!(rx.borrow().map(|e| e.status), Some(0));
        assert_eq!((p.status(), p.pid()), (Status::STOPPED, Some(42)));
        assert!(p.can_delete() && !p.is_live() && !p.can_start());
    }

    #[test]
    fn a_failed_start_goes_back_to_created_and_an_exit_before_start_has_no_pid() {
        let mut p = process();
        assert!(p.begin_start());
        p.start_failed();
        assert!(p.can_start());
        assert!(p.exited(Exit::now(137)));
        assert_eq!(p.pid(), None);
        assert!(
            !p.started(1, None),
            "an exited process cannot become running"
        );
    }
}
