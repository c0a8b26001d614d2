//! The vsock device on the event loop: which fd woke it and what to do.
//!
//! `init` registers only the activation eventfd. Activation registers the three queue eventfds,
//! the listening socket and the timer; host streams come and go one-shot through the
//! [`FdRegistry`] the muxer is handed, which is the event manager's `EventOps` in the VMM and a
//! recording fake in tests.

use std::os::fd::{AsRawFd, RawFd};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Vsock;

/// An fd could not be (re)registered with the event loop.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The event manager refused.
    #[error("event loop registration")]
    EventManager(#[source] event_manager::Error),
}

/// Where the device adds, re-arms and removes the fds it watches.
pub trait FdRegistry {
    /// Starts watching `fd` for `set`.
    ///
    /// # Errors
    /// [`RegistryError`] when the event loop refuses the fd.
    fn add(&mut self, fd: RawFd, set: EventSet) -> Result<(), RegistryError>;
    /// Changes the events watched on `fd` (re-arms a one-shot fd).
    ///
    /// # Errors
    /// [`RegistryError`] when the event loop refuses.
    fn modify(&mut self, fd: RawFd, set: EventSet) -> Result<(), RegistryError>;
    /// Stops watching `fd` (before it is closed).
    fn remove(&mut self, fd: RawFd);
}

impl FdRegistry for EventOps<'_> {
    fn add(&mut self, fd: RawFd, set: EventSet) -> Result<(), RegistryError> {
        EventOps::add(self, Events::new_raw(fd, set)).map_err(RegistryError::EventManager)
    }

    fn modify(&mut self, fd: RawFd, set: EventSet) -> Result<(), RegistryError> {
        EventOps::modify(self, Events::new_raw(fd, set)).map_err(RegistryError::EventManager)
    }

    fn remove(&mut self, fd: RawFd) {
        if let Err(e) = EventOps::remove(self, Events::empty_raw(fd)) {
            tracing::debug!(fd, error = %e, "vsock: removing fd from the event loop");
        }
    }
}

impl MutEventSubscriber for Vsock {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.handle_event(events.fd(), events.event_set(), ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        let fd = self.activate_evt().as_raw_fd();
        if let Err(e) = FdRegistry::add(ops, fd, EventSet::IN) {
            tracing::error!(error = %e, "vsock: cannot watch the activation event");
        }
    }
}
