//! Task events to containerd, fire-and-forget (the publisher queues and retries).

use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::context::Context;

/// What happened to a task.
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

/// Publishes to containerd's event service for one namespace.
#[derive(Clone)]
pub struct Events {
    publisher: std::sync::Arc<RemotePublisher>,
    namespace: String,
}

impl Events {
    /// Publisher for `namespace`.
    pub fn new(publisher: RemotePublisher, namespace: &str) -> Self {
        Self {
            publisher: std::sync::Arc::new(publisher),
            namespace: namespace.to_string(),
        }
    }

    /// Sends `event`; failures are logged (containerd may be restarting).
    pub async fn send(&self, event: Event) {
        let (topic, msg): (&str, Box<dyn MessageDyn>) = match event {
            Event::Create(e) => (topics::TASK_CREATE_EVENT_TOPIC, Box::new(e)),
            Event::Start(e) => (topics::TASK_START_EVENT_TOPIC, Box::new(e)),
            Event::Exit(e) => (topics::TASK_EXIT_EVENT_TOPIC, Box::new(e)),
            Event::Oom(e) => (topics::TASK_OOM_EVENT_TOPIC, Box::new(e)),
            Event::ExecAdded(e) => (topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(e)),
            Event::ExecStarted(e) => (topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(e)),
            Event::Paused(e) => (topics::TASK_PAUSED_EVENT_TOPIC, Box::new(e)),
            Event::Resumed(e) => (topics::TASK_RESUMED_EVENT_TOPIC, Box::new(e)),
            Event::Delete(e) => (topics::TASK_DELETE_EVENT_TOPIC, Box::new(e)),
        };
        if let Err(e) = self
            .publisher
            .publish(Context::default(), topic, &self.namespace, msg)
            .await
        {
            tracing::warn!(topic, error = %e, "publishing an event");
        }
    }
}
