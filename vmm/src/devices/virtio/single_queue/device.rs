//! [`SingleQueueDevice`]: the virtio device around a [`RequestHandler`].

use std::sync::Arc;

use tracing::{debug, warn};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::RequestHandler;
use crate::devices::virtio::{
    ActivateContext, ActivateError, GuestErrors, Interrupt, PersistError, QueueProgress,
    VirtioDevice,
};
use crate::memory::GuestMemoryMmap;

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

/// A one-queue virtio device serving its requests with `H`.
pub struct SingleQueueDevice<H> {
    handler: H,
    queue_max_sizes: [u16; 1],
    pub(super) queue_evts: [EventFd; 1],
    pub(super) activate_evt: EventFd,
    /// Whether the queue eventfd is registered with the event loop.
    pub(super) queue_registered: bool,
    state: State,
    acked_features: u64,
    /// Chains completed with zero bytes, or not returned at all.
    guest_errors: GuestErrors,
}

impl<H: RequestHandler> SingleQueueDevice<H> {
    /// An inactive device serving requests with `handler`.
    ///
    /// # Errors
    /// Creating an eventfd failed.
    pub fn with_handler(handler: H) -> std::io::Result<Self> {
        Ok(Self {
            handler,
            queue_max_sizes: [H::QUEUE_SIZE],
            queue_evts: [EventFd::new(EFD_NONBLOCK)?],
            activate_evt: EventFd::new(EFD_NONBLOCK)?,
            queue_registered: false,
            state: State::Inactive,
            acked_features: 0,
            guest_errors: GuestErrors::default(),
        })
    }

    /// The request handler.
    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// The features the driver accepted (those offered only).
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Chains the guest got wrong so far (completed with zero bytes, or not returnable).
    pub fn guest_errors(&self) -> GuestErrors {
        self.guest_errors
    }

    /// The interrupt line, once active.
    pub fn interrupt(&self) -> Option<&Arc<Interrupt>> {
        match &self.state {
            State::Active { interrupt, .. } => Some(interrupt),
            State::Inactive => None,
        }
    }

    /// Serves the available chains, at most one ring's worth ([`H::QUEUE_SIZE`] chains) per
    /// wake-up, then raises the interrupt if any completed; see [`Self::serve_up_to`].
    pub fn process_queue(&mut self) {
        self.serve_up_to(usize::from(H::QUEUE_SIZE));
    }

    /// Serves at most `budget` available chains, then raises the interrupt if any completed.
    /// A guest that keeps refilling the ring cannot hold the event loop: once the budget is
    /// spent with chains still waiting, the device kicks its own queue eventfd and yields, so
    /// the other devices get their turn before it serves the rest. Failures are counted; the
    /// first few and then one in [`crate::devices::virtio::LOG_EVERY`] are logged. Returns the
    /// number of chains taken off the ring.
    pub fn serve_up_to(&mut self, budget: usize) -> usize {
        let State::Active {
            mem,
            interrupt,
            queue,
        } = &mut self.state
        else {
            return 0;
        };
        let (handler, errors) = (&mut self.handler, &mut self.guest_errors);
        let mut completed = false;
        let mut served = 0;
        while let Some(chain) = queue.pop_descriptor_chain(&*mem) {
            served += 1;
            let head = chain.head_index();
            let len = handler.handle(mem, chain).unwrap_or_else(|e| {
                if errors.record(crate::metrics::METRICS.guest_errors.of_device(H::NAME)) {
                    let count = errors.count();
                    warn!(head, error = %e, count, device = H::NAME, "bad request");
                }
                0
            });
            match queue.add_used(&*mem, head, len) {
                Ok(()) => completed = true,
                Err(e) => {
                    if errors.record(crate::metrics::METRICS.guest_errors.of_device(H::NAME)) {
                        let count = errors.count();
                        warn!(head, error = %e, count, device = H::NAME, "cannot return buffer");
                    }
                }
            }
            if served >= budget {
                // Budget spent: come back after the other fds had their turn (a spurious
                // kick when the ring happens to be empty now costs one empty pass).
                let [queue_evt] = &self.queue_evts;
                if let Err(e) = queue_evt.write(1) {
                    warn!(error = %e, device = H::NAME, "re-kicking the queue");
                }
                break;
            }
        }
        if completed {
            if let Err(e) = interrupt.signal_used_queue() {
                warn!(error = %e, device = H::NAME, "raising the interrupt");
            }
        }
        served
    }
}

impl<H: RequestHandler> VirtioDevice for SingleQueueDevice<H> {
    fn device_type(&self) -> u32 {
        H::DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn avail_features(&self) -> u64 {
        self.handler.avail_features()
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.handler.read_config(offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        debug!(offset, device = H::NAME, "configuration space is read-only");
    }

    /// Takes the driver's single queue and signals the event loop.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
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

    fn is_activated(&self) -> bool {
        matches!(self.state, State::Active { .. })
    }

    fn queue_progress(&mut self) -> Result<Vec<QueueProgress>, PersistError> {
        Ok(match &self.state {
            State::Active { queue, .. } => vec![QueueProgress::of(queue)],
            State::Inactive => Vec::new(),
        })
    }

    /// Forgets the queue and the negotiated features.
    fn reset(&mut self) -> bool {
        self.state = State::Inactive;
        self.acked_features = 0;
        true
    }
}
