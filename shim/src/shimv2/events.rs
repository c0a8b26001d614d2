//! Task events to containerd, in order, through one queue.
//!
//! Every event goes into one unbounded channel, enqueued by the lifecycle code at the state
//! transition it reports (under the pod's state lock, so queue order is transition order), and
//! one publisher task drains the channel and publishes one event after the other. So a
//! process's TaskStart always reaches containerd before its TaskExit, a TaskCreate before
//! both, and nothing is reordered by tasks racing to publish (runc-shim's `task.rs` does the
//! same with its event channel).

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::context::Context;
use tokio::sync::mpsc;

use super::process::Exit;

/// What happened to a task.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A task was created.
    Create(TaskCreate),
    /// Its init process started.
    Start(TaskStart),
    /// A process exited.
    Exit(TaskExit),
    /// The container hit its memory limit.
    Oom(TaskOOM),
    /// An exec was added.
    ExecAdded(TaskExecAdded),
    /// An exec started.
    ExecStarted(TaskExecStarted),
    /// The container was paused.
    Paused(TaskPaused),
    /// The container was resumed.
    Resumed(TaskResumed),
    /// The task was deleted.
    Delete(TaskDelete),
}

impl Event {
    /// TaskCreate for container `id`.
    pub fn create(
        id: &str,
        bundle: &str,
        rootfs: Vec<containerd_shim::protos::api::Mount>,
        io: TaskIO,
    ) -> Event {
        let mut e = TaskCreate::new();
        e.container_id = id.into();
        e.bundle = bundle.into();
        e.rootfs = rootfs;
        e.pid = std::process::id();
        e.io = protobuf::MessageField::some(io);
        Event::Create(e)
    }

    /// TaskStart (init) or TaskExecStarted (an exec) with the guest pid.
    pub fn started(id: &str, exec_id: &str, pid: u32) -> Event {
        if exec_id.is_empty() {
            let mut e = TaskStart::new();
            e.container_id = id.into();
            e.pid = pid;
            Event::Start(e)
        } else {
            let mut e = TaskExecStarted::new();
            e.container_id = id.into();
            e.exec_id = exec_id.into();
            e.pid = pid;
            Event::ExecStarted(e)
        }
    }

    /// TaskExit; its `id` is the exec id, or the container id for the init.
    pub fn exited(id: &str, exec_id: &str, pid: u32, exit: Exit) -> Event {
        let mut e = TaskExit::new();
        e.container_id = id.into();
        e.id = if exec_id.is_empty() { id } else { exec_id }.into();
        e.pid = pid;
        e.exit_status = exit.status;
        e.exited_at = exit.exited_at();
        Event::Exit(e)
    }

    /// TaskExecAdded.
    pub fn exec_added(id: &str, exec_id: &str) -> Event {
        let mut e = TaskExecAdded::new();
        e.container_id = id.into();
        e.exec_id = exec_id.into();
        Event::ExecAdded(e)
    }

    /// TaskPaused or TaskResumed.
    pub fn paused(id: &str, paused: bool) -> Event {
        if paused {
            let mut e = TaskPaused::new();
            e.container_id = id.into();
            Event::Paused(e)
        } else {
            let mut e = TaskResumed::new();
            e.container_id = id.into();
            Event::Resumed(e)
        }
    }

    /// TaskOOM.
    pub fn oom(id: &str) -> Event {
        let mut e = TaskOOM::new();
        e.container_id = id.into();
        Event::Oom(e)
    }

    /// TaskDelete.
    pub fn deleted(id: &str, pid: u32, exit: Exit) -> Event {
        let mut e = TaskDelete::new();
        e.container_id = id.into();
        e.pid = pid;
        e.exit_status = exit.status;
        e.exited_at = exit.exited_at();
        Event::Delete(e)
    }

    /// The topic and message containerd gets.
    fn into_message(self) -> (&'static str, Box<dyn MessageDyn>) {
        match self {
            Event::Create(e) => (topics::TASK_CREATE_EVENT_TOPIC, Box::new(e)),
            Event::Start(e) => (topics::TASK_START_EVENT_TOPIC, Box::new(e)),
            Event::Exit(e) => (topics::TASK_EXIT_EVENT_TOPIC, Box::new(e)),
            Event::Oom(e) => (topics::TASK_OOM_EVENT_TOPIC, Box::new(e)),
            Event::ExecAdded(e) => (topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(e)),
            Event::ExecStarted(e) => (topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(e)),
            Event::Paused(e) => (topics::TASK_PAUSED_EVENT_TOPIC, Box::new(e)),
            Event::Resumed(e) => (topics::TASK_RESUMED_EVENT_TOPIC, Box::new(e)),
            Event::Delete(e) => (topics::TASK_DELETE_EVENT_TOPIC, Box::new(e)),
        }
    }
}

/// Where events go: containerd's event service, or a test's recorder.
#[async_trait]
pub trait Publisher: Send + Sync + 'static {
    /// Publishes one event; an error is logged by the queue, never retried out of order.
    async fn publish(&self, event: Event) -> Result<(), String>;
}

/// containerd's event service for one namespace.
pub struct Containerd {
    publisher: RemotePublisher,
    namespace: String,
}

impl Containerd {
    /// Publishes through `publisher` into `namespace`.
    pub fn new(publisher: RemotePublisher, namespace: &str) -> Containerd {
        Containerd {
            publisher,
            namespace: namespace.to_string(),
        }
    }
}

#[async_trait]
impl Publisher for Containerd {
    async fn publish(&self, event: Event) -> Result<(), String> {
        let (topic, msg) = event.into_message();
        self.publisher
            .publish(Context::default(), topic, &self.namespace, msg)
            .await
            .map_err(|e| format!("{topic}: {e}"))
    }
}

/// The ordered event queue; cloning shares it.
#[derive(Clone)]
pub struct Events {
    tx: mpsc::UnboundedSender<Event>,
}

impl Events {
    /// A queue drained by one task that publishes through `publisher`, in order.
    pub fn start(publisher: impl Publisher) -> Events {
        let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                if let Err(error) = publisher.publish(event).await {
                    // containerd may be restarting; the event is lost, the order is kept.
                    tracing::warn!(%error, "publishing an event");
                }
            }
        });
        Events { tx }
    }

    /// Enqueues `event` (never blocks: callers hold the pod's state lock).
    pub fn send(&self, event: Event) {
        if self.tx.send(event).is_err() {
            tracing::warn!("event queue closed; event dropped");
        }
    }
}

#[cfg(test)]
pub mod recorder {
    //! A [`Publisher`] that keeps what it got, for unit tests.

    use std::sync::{Arc, Mutex};

    use super::*;

    /// Records events in publication order.
    #[derive(Clone, Default)]
    pub struct Recorder {
        events: Arc<Mutex<Vec<Event>>>,
    }

    impl Recorder {
        /// Everything published so far.
        pub fn events(&self) -> Vec<Event> {
            self.events
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        }
    }

    #[async_trait]
    impl Publisher for Recorder {
        async fn publish(&self, event: Event) -> Result<(), String> {
            // A slow publisher: ordering must not depend on publishing being fast.
            tokio::task::yield_now().await;
            self.events
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(event);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::recorder::Recorder;
    use super::*;

    #[tokio::test]
    async fn events_are_published_in_the_order_they_were_sent() {
        let rec = Recorder::default();
        let events = Events::start(rec.clone());
        for i in 0..100u32 {
            events.send(Event::started("c", "", i));
        }
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while rec.events().len() < 100 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let pids: Vec<u32> = rec
            .events()
            .iter()
            .filter_map(|e| match e {
                Event::Start(s) => Some(s.pid),
                _ => None,
            })
            .collect();
        assert_eq!(pids, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn exit_of_an_exec_carries_the_exec_id_and_of_an_init_the_container_id() {
        let exit = Exit {
            status: 3,
            at_unix_ns: 1_500_000_000,
        };
        let Event::Exit(init) = Event::exited("c1", "", 7, exit) else {
            panic!("not an exit");
        };
        assert_eq!((init.id.as_str(), init.pid, init.exit_status), ("c1", 7, 3));
        assert_eq!(init.exited_at.nanos, 500_000_000);
        let Event::Exit(exec) = Event::exited("c1", "e1", 8, exit) else {
            panic!("not an exit");
        };
        assert_eq!(exec.id, "e1");
    }
}
