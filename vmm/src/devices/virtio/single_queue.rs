//! The plumbing every one-queue device shares (virtio-rng, virtio-blk): the queue's
//! notification eventfd, the activation eventfd that hands the queue to the event loop, the
//! Inactive/Active state, and serving each available chain with a device-specific handler.

use std::fmt::Display;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use tracing::{debug, warn};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateContext, ActivateError, Interrupt};
use crate::memory::GuestMemoryMmap;

const ACTIVATE_TOKEN: u32 = 0;
const QUEUE_TOKEN: u32 = 1;

/// Device lifecycle.
enum State {
    /// Waiting for the driver to set DRIVER_OK (or reset since).
    Inactive,
    /// Activated: the queue and memory the driver gave us.
    Active {
        /// Guest memory.
        mem: GuestMemoryMmap,
        /// The interrupt line.
        interrupt: Arc<Interrupt>,
        /// The request queue.
        queue: Queue,
    },
}

/// One request queue and its activation, for a device named `name` in logs.
pub struct SingleQueue {
    name: &'static str,
    queue_evts: [EventFd; 1],
    activate_evt: EventFd,
    queue_registered: bool,
    state: State,
}

impl SingleQueue {
    /// Inactive, with fresh eventfds.
    ///
    /// # Errors
    /// Creating an eventfd failed.
    pub fn new(name: &'static str) -> std::io::Result<Self> {
        Ok(Self {
            name,
            queue_evts: [EventFd::new(EFD_NONBLOCK)?],
            activate_evt: EventFd::new(EFD_NONBLOCK)?,
            queue_registered: false,
            state: State::Inactive,
        })
    }

    /// The queue's notification eventfd (registered as an ioeventfd).
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// Takes the driver's single queue and signals the event loop.
    ///
    /// # Errors
    /// [`ActivateError::QueueCount`] unless exactly one queue is given; the eventfd write failing.
    pub fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let got = ctx.queues.len();
        let Ok([queue]) = <[Queue; 1]>::try_from(ctx.queues) else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        self.state = State::Active {
            mem: ctx.mem,
            interrupt: ctx.interrupt,
            queue,
        };
        self.activate_evt.write(1).map_err(ActivateError::Event)
    }

    /// Whether the driver activated the queue.
    pub fn is_activated(&self) -> bool {
        matches!(self.state, State::Active { .. })
    }

    /// Forgets the queue (driver reset).
    pub fn reset(&mut self) {
        self.state = State::Inactive;
    }

    /// The interrupt line, once active.
    pub fn interrupt(&self) -> Option<&Arc<Interrupt>> {
        match &self.state {
            State::Active { interrupt, .. } => Some(interrupt),
            State::Inactive => None,
        }
    }

    /// `MutEventSubscriber::init`: watch the activation eventfd.
    pub fn init(&mut self, ops: &mut EventOps) {
        let evt = Events::with_data(&self.activate_evt, ACTIVATE_TOKEN, EventSet::IN);
        if let Err(e) = ops.add(evt) {
            warn!(error = ?e, device = self.name, "registering the activation eventfd");
        }
    }

    /// `MutEventSubscriber::process`: true when the guest kicked the queue.
    pub fn process(&mut self, events: Events, ops: &mut EventOps) -> bool {
        let [queue_evt] = &self.queue_evts;
        match events.data() {
            ACTIVATE_TOKEN => {
                let _ = self.activate_evt.read();
                if self.is_activated() && !self.queue_registered {
                    match ops.add(Events::with_data(queue_evt, QUEUE_TOKEN, EventSet::IN)) {
                        Ok(()) => self.queue_registered = true,
                        Err(e) => {
                            warn!(error = ?e, device = self.name, "registering the queue eventfd")
                        }
                    }
                }
                false
            }
            QUEUE_TOKEN => {
                let _ = queue_evt.read();
                true
            }
            other => {
                debug!(token = other, device = self.name, "unexpected event");
                false
            }
        }
    }

    /// Serves every available chain with `handle` (bytes written to the chain, or why it failed:
    /// then it completes with zero bytes), then raises the interrupt if any completed.
    pub fn serve<E: Display>(
        &mut self,
        mut handle: impl FnMut(&GuestMemoryMmap, DescriptorChain<&GuestMemoryMmap>) -> Result<u32, E>,
    ) {
        let State::Active {
            mem,
            interrupt,
            queue,
        } = &mut self.state
        else {
            return;
        };
        let mut completed = false;
        while let Some(chain) = queue.pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            let len = handle(mem, chain).unwrap_or_else(|e| {
                warn!(head, error = %e, device = self.name, "bad request");
                0
            });
            match queue.add_used(&*mem, head, len) {
                Ok(()) => completed = true,
                Err(e) => warn!(head, error = %e, device = self.name, "cannot return buffer"),
            }
        }
        if completed {
            if let Err(e) = interrupt.signal_used_queue() {
                warn!(error = %e, device = self.name, "raising the interrupt");
            }
        }
    }
}
