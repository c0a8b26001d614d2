//! OOM-kill notification: one inotify instance watching every container's `memory.events`.
//!
//! cgroup v2 raises a modify event on `memory.events` when a counter changes; the watcher
//! compares `oom_kill` with the last value seen and queues the container id when it grew.
//! The host drains the queue with the blocking GetOomEvent call.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use crate::cgroup;
use crate::error::AgentError;

/// nix's Inotify as an `AsRawFd`, which tokio's AsyncFd needs.
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

struct Watched {
    id: String,
    dir: PathBuf,
    kills: u64,
}

/// Watches containers' cgroups and queues their ids on OOM kills.
pub struct OomWatcher {
    inotify: Arc<AsyncFd<InotifyFd>>,
    watches: Arc<Mutex<HashMap<WatchDescriptor, Watched>>>,
    events: tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>,
}

impl OomWatcher {
    /// Starts the watcher task.
    pub fn spawn() -> Result<OomWatcher, AgentError> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| AgentError::Io("inotify", e.into()))?;
        // SAFETY: Inotify owns its fd and keeps it open and unchanged until the AsyncFd drops it.
        let inotify = unsafe { AsyncFd::register(InotifyFd(inotify)) }
            .map_err(|e| AgentError::Io("inotify", e.into()))?;
        let inotify = Arc::new(inotify);
        let watches: Arc<Mutex<HashMap<WatchDescriptor, Watched>>> = Arc::default();
        let (tx, rx) = mpsc::unbounded_channel();
        let (fd, table) = (inotify.clone(), watches.clone());
        tokio::spawn(async move {
            loop {
                let Ok(mut guard) = fd.readable().await else {
                    return;
                };
                let events = match guard.try_io(|i| i.get_ref().0.read_events().map_err(Into::into))
                {
                    Ok(Ok(events)) => events,
                    Ok(Err(err)) => {
                        tracing::warn!(%err, "inotify read failed; OOM events stop");
                        return;
                    }
                    Err(_would_block) => continue,
                };
                let mut table = table.lock().unwrap_or_else(|p| p.into_inner());
                for event in events {
                    let Some(w) = table.get_mut(&event.wd) else {
                        continue;
                    };
                    let kills = cgroup::oom_kills(&w.dir);
                    if kills > w.kills {
                        w.kills = kills;
                        tracing::info!(container = %w.id, kills, "OOM kill in container");
                        let _ = tx.send(w.id.clone());
                    }
                }
            }
        });
        Ok(OomWatcher {
            inotify,
            watches,
            events: tokio::sync::Mutex::new(rx),
        })
    }

    /// Starts watching a container's cgroup directory.
    pub fn watch(&self, id: &str, dir: PathBuf) -> Result<(), AgentError> {
        let wd = self
            .inotify
            .get_ref()
            .0
            .add_watch(&dir.join("memory.events"), AddWatchFlags::IN_MODIFY)
            .map_err(|e| AgentError::Cgroup("watch memory.events", e.into()))?;
        let kills = cgroup::oom_kills(&dir);
        let mut table = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        table.insert(
            wd,
            Watched {
                id: id.to_string(),
                dir,
                kills,
            },
        );
        Ok(())
    }

    /// Stops watching a container (its cgroup is going away).
    pub fn unwatch(&self, id: &str) {
        let mut table = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        let wds: Vec<WatchDescriptor> = table
            .iter()
            .filter(|(_, w)| w.id == id)
            .map(|(wd, _)| *wd)
            .collect();
        for wd in wds {
            table.remove(&wd);
            // The watch is gone already when the cgroup was removed; ignore that.
            let _ = self.inotify.get_ref().0.rm_watch(wd);
        }
    }

    /// Waits for the next OOM kill; None if the watcher stopped.
    pub async fn next(&self) -> Option<String> {
        self.events.lock().await.recv().await
    }
}
