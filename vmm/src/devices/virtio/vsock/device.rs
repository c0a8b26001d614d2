//! The vsock virtio device: its three queues, config space and the glue to the muxer.
//!
//! Config space is one little-endian u64, the guest's cid. The tx queue is drained into the
//! muxer as long as the muxer's control queue has room (otherwise tx waits for rx to drain: the
//! guest cannot grow device memory by never reading). The rx queue is filled while the muxer
//! has packets and the guest has posted buffers; with no buffer the device waits for the rx
//! queue's eventfd rather than polling.
//!
//! The event queue is used once in a device's life, after a restore from a snapshot: the
//! guest's connections belonged to the VMM that took the snapshot, so the restored device puts a
//! `TRANSPORT_RESET` in the guest's first event buffer and moves no packet until the driver has
//! handled it (it resets every connected socket, re-reads the cid, then refills its event buffer
//! and kicks: that kick releases the device; listening sockets survive).

use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::EventSet;
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::event_handler::FdRegistry;
use super::muxer::Muxer;
use super::packet::{read_tx, RxBuffer};
use super::{
    VsockError, EVENT_QUEUE, EVENT_TRANSPORT_RESET, QUEUE_SIZE, RX_QUEUE, TX_QUEUE, VSOCK_HOST_CID,
};
use crate::devices::virtio::chain::{self, Limits};
use crate::devices::virtio::{
    ActivateContext, ActivateError, GuestErrors, Interrupt, PersistError, QueueProgress,
    VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMemoryMmap;

/// Queue chains handled per wake-up before the device yields to other fds (and re-kicks itself).
const BUDGET: usize = 4 * QUEUE_SIZE as usize;
/// Queue sizes: rx, tx, event.
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];

/// What the device holds once the driver set DRIVER_OK.
struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
}

/// The transport reset of a restored device. The guest still believes in connections this
/// process never had; a connection made before its driver has handled the reset would be reset
/// with the old ones, so nothing goes to rx until then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reset {
    /// Nothing to tell (a booted device, or the reset is through).
    Done,
    /// Restored: the event waits for the driver's next event buffer.
    Pending,
    /// The event is in the guest's hands; rx waits for the driver's next event-queue kick,
    /// the refill its event worker makes once it has reset its sockets.
    Posted,
}

/// A virtio-vsock device whose host side is a hybrid vsock Unix socket.
pub struct Vsock {
    guest_cid: u64,
    queue_evts: Vec<EventFd>,
    activate_evt: EventFd,
    timer: TimerFd,
    timer_deadline: Option<Instant>,
    acked_features: u64,
    active: Option<Active>,
    registered: bool,
    /// The tx queue may hold chains not yet handed to the muxer (kicked, or stalled on rx).
    tx_due: bool,
    /// Where a restored device is with telling the guest its connections are gone.
    reset: Reset,
    muxer: Muxer,
    tx_payload: Vec<u8>,
    rx_payload: Vec<u8>,
    /// Malformed chains and failed packet writes.
    guest_errors: GuestErrors,
}

/// Refuses the reserved cids (0-2: hypervisor, local, host) and VMADDR_CID_ANY.
fn check_cid(guest_cid: u64) -> Result<(), VsockError> {
    if guest_cid <= VSOCK_HOST_CID || guest_cid >= u64::from(u32::MAX) {
        return Err(VsockError::GuestCid(guest_cid));
    }
    Ok(())
}

impl Vsock {
    /// A device for guest `guest_cid`, listening for host clients at `uds_path` (created here;
    /// removed when the device is dropped).
    ///
    /// # Errors
    /// [`VsockError`] when the cid is reserved, the socket cannot be bound or an eventfd or
    /// timer cannot be created.
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Self, VsockError> {
        check_cid(guest_cid)?;
        let listener = UnixListener::bind(&uds_path).map_err(VsockError::Bind)?;
        Self::with_listener(guest_cid, uds_path, listener)
    }

    /// As [`Vsock::new`], serving `listener`, already bound at `uds_path` (a jailed VMM gets it
    /// from the host side).
    ///
    /// # Errors
    /// As [`Vsock::new`].
    pub fn with_listener(
        guest_cid: u64,
        uds_path: PathBuf,
        listener: UnixListener,
    ) -> Result<Self, VsockError> {
        check_cid(guest_cid)?;
        let new_evt = || EventFd::new(EFD_NONBLOCK).map_err(VsockError::EventFd);
        let queue_evts = vec![new_evt()?, new_evt()?, new_evt()?];
        let activate_evt = new_evt()?;
        let timer = TimerFd::new().map_err(|e| VsockError::EventFd(e.into()))?;
        set_nonblocking(timer.as_raw_fd()).map_err(VsockError::EventFd)?;
        listener.set_nonblocking(true).map_err(VsockError::Bind)?;
        Ok(Self {
            guest_cid,
            queue_evts,
            activate_evt,
            timer,
            timer_deadline: None,
            acked_features: 0,
            active: None,
            registered: false,
            tx_due: false,
            reset: Reset::Done,
            muxer: Muxer::new(guest_cid, uds_path, listener),
            tx_payload: Vec::new(),
            rx_payload: Vec::new(),
            guest_errors: GuestErrors::default(),
        })
    }

    /// The eventfd the transport's activation signals to the event loop.
    pub fn activate_evt(&self) -> &EventFd {
        &self.activate_evt
    }

    /// Handles one ready fd of the device (the event loop's entry point).
    pub fn handle_event(&mut self, fd: RawFd, set: EventSet, reg: &mut dyn FdRegistry) {
        let now = Instant::now();
        if fd == self.activate_evt.as_raw_fd() {
            let _ = self.activate_evt.read();
            self.register(reg);
        } else if fd == self.queue_evts[RX_QUEUE].as_raw_fd() {
            let _ = self.queue_evts[RX_QUEUE].read();
        } else if fd == self.queue_evts[TX_QUEUE].as_raw_fd() {
            let _ = self.queue_evts[TX_QUEUE].read();
            self.tx_due = true;
        } else if fd == self.queue_evts[EVENT_QUEUE].as_raw_fd() {
            let _ = self.queue_evts[EVENT_QUEUE].read();
            match self.reset {
                // A kick with no reset under way: nothing to do (no event is ever sent).
                Reset::Done => return,
                // A buffer for the reset, maybe: `pump` tries.
                Reset::Pending => {}
                // The driver refilled after handling the reset: rx may flow.
                Reset::Posted => self.reset = Reset::Done,
            }
        } else if fd == self.muxer.listener_fd() {
            self.muxer.accept(reg, now);
        } else if fd == self.timer.as_raw_fd() {
            // Nonblocking: a timer re-armed since the wake-up reads as WouldBlock.
            let _ = self.timer.wait();
            self.timer_deadline = None;
            self.muxer.sweep(reg, now);
        } else {
            self.muxer.on_fd_event(fd, set, reg, now);
        }
        self.pump(reg);
        self.update_timer(now);
    }

    /// Registers the queue eventfds, the listener and the timer once activated.
    fn register(&mut self, reg: &mut dyn FdRegistry) {
        if self.active.is_none() || self.registered {
            return;
        }
        let fds = (self.queue_evts.iter().map(AsRawFd::as_raw_fd))
            .chain([self.muxer.listener_fd(), self.timer.as_raw_fd()]);
        for fd in fds {
            if let Err(e) = reg.add(fd, EventSet::IN) {
                tracing::error!(error = %e, "vsock: cannot watch a device fd");
            }
        }
        self.registered = true;
        // Chains the driver queued before activation reached the event loop.
        self.tx_due = true;
    }

    /// Puts a `TRANSPORT_RESET` event (virtio 1.2 section 5.10.6.5) in the driver's next event
    /// buffer; true once it is there. Without a buffer it waits for the driver's event-queue
    /// kick (the Linux driver keeps its event buffers posted).
    fn post_transport_reset(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let queue = &mut active.queues[EVENT_QUEUE];
        let Some(chain) = queue.pop_descriptor_chain(&active.mem) else {
            return false;
        };
        let head = chain.head_index();
        let written = chain::writer(&active.mem, chain, Limits::descriptors(1))
            .map_err(|e| e.to_string())
            .and_then(|mut w| {
                w.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes())
                    .map_err(|e| e.to_string())
            });
        let len = match written {
            Ok(()) => 4,
            Err(e) => {
                // A broken event buffer: returned empty; the next one gets the event.
                if self
                    .guest_errors
                    .record(&crate::metrics::METRICS.guest_errors.vsock)
                {
                    tracing::warn!(error = %e, "vsock: bad event buffer");
                }
                if let Err(e) = queue.add_used(&active.mem, head, 0) {
                    tracing::warn!(error = %e, "vsock: returning an event buffer");
                }
                return false;
            }
        };
        if let Err(e) = queue.add_used(&active.mem, head, len) {
            tracing::warn!(error = %e, "vsock: returning the reset event");
            return false;
        }
        if let Err(e) = active.interrupt.signal_used_queue() {
            tracing::warn!(error = %e, "vsock: interrupt failed");
        }
        tracing::info!("vsock: transport reset sent to the restored guest");
        true
    }

    /// Moves packets both ways until nothing more can move, then interrupts the guest.
    fn pump(&mut self, reg: &mut dyn FdRegistry) {
        match self.reset {
            Reset::Done => {}
            Reset::Pending => {
                if self.post_transport_reset() {
                    // Only a kick after this point is the driver's answer to the event.
                    let _ = self.queue_evts[EVENT_QUEUE].read();
                    self.reset = Reset::Posted;
                }
                return;
            }
            Reset::Posted => return,
        }
        let mut used = false;
        for _ in 0..BUDGET {
            used |= self.process_rx(reg);
            if !self.tx_due || self.muxer.control_full() {
                break;
            }
            self.tx_due = false;
            used |= self.process_tx(reg);
        }
        if used {
            if let Some(active) = &self.active {
                if let Err(e) = active.interrupt.signal_used_queue() {
                    tracing::warn!(error = %e, "vsock: interrupt failed");
                }
            }
        }
    }

    /// Hands guest packets to the muxer; true if used entries were added.
    fn process_tx(&mut self, reg: &mut dyn FdRegistry) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let now = Instant::now();
        let mut used = false;
        let queue = &mut active.queues[TX_QUEUE];
        for _ in 0..BUDGET {
            if self.muxer.control_full() {
                // Resumed by `pump` once rx made room.
                self.tx_due = true;
                return used;
            }
            let Some(chain) = queue.pop_descriptor_chain(&active.mem) else {
                return used;
            };
            let head = chain.head_index();
            match read_tx(&active.mem, chain, &mut self.tx_payload) {
                Ok(hdr) => self.muxer.on_guest_packet(&hdr, &self.tx_payload, reg, now),
                Err(e) => {
                    if self
                        .guest_errors
                        .record(&crate::metrics::METRICS.guest_errors.vsock)
                    {
                        let count = self.guest_errors.count();
                        tracing::debug!(error = %e, count, "vsock: dropping malformed tx chain");
                    }
                }
            }
            if let Err(e) = queue.add_used(&active.mem, head, 0) {
                tracing::warn!(error = %e, "vsock: tx used ring");
            }
            used = true;
        }
        // Budget spent: come back after other fds had their turn.
        let _ = self.queue_evts[TX_QUEUE].write(1);
        used
    }

    /// Fills guest rx buffers with the muxer's packets; true if used entries were added.
    fn process_rx(&mut self, reg: &mut dyn FdRegistry) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let now = Instant::now();
        let mut used = false;
        let queue = &mut active.queues[RX_QUEUE];
        for _ in 0..BUDGET {
            if !self.muxer.has_rx() {
                return used;
            }
            // No buffer: wait for the driver's rx kick.
            let Some(chain) = queue.pop_descriptor_chain(&active.mem) else {
                return used;
            };
            let head = chain.head_index();
            let len = match RxBuffer::parse(&active.mem, chain) {
                Ok(buf) => {
                    let capacity = buf.payload_capacity();
                    let Some(hdr) = self.muxer.next_rx(capacity, &mut self.rx_payload, reg, now)
                    else {
                        queue.go_to_previous_position();
                        return used;
                    };
                    buf.write(&hdr, &self.rx_payload).unwrap_or_else(|e| {
                        if self
                            .guest_errors
                            .record(&crate::metrics::METRICS.guest_errors.vsock)
                        {
                            let count = self.guest_errors.count();
                            tracing::warn!(error = %e, count, "vsock: writing an rx packet");
                        }
                        0
                    })
                }
                Err(e) => {
                    if self
                        .guest_errors
                        .record(&crate::metrics::METRICS.guest_errors.vsock)
                    {
                        let count = self.guest_errors.count();
                        tracing::debug!(error = %e, count, "vsock: returning malformed rx chain");
                    }
                    0
                }
            };
            if let Err(e) = queue.add_used(&active.mem, head, len) {
                tracing::warn!(error = %e, "vsock: rx used ring");
            }
            used = true;
        }
        let _ = self.queue_evts[RX_QUEUE].write(1);
        used
    }

    /// Arms the timer for the muxer's earliest deadline.
    fn update_timer(&mut self, now: Instant) {
        let next = self.muxer.next_deadline();
        if next == self.timer_deadline {
            return;
        }
        self.timer_deadline = next;
        let result = match next {
            // A zero duration would disarm the timer.
            Some(at) => (self.timer).reset(
                at.saturating_duration_since(now)
                    .max(Duration::from_millis(1)),
                None,
            ),
            None => self.timer.clear(),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "vsock: timer");
        }
    }
}

/// Sets `O_NONBLOCK` on `fd`.
fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on an fd we own, with valid commands; results are checked.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.guest_cid.to_le_bytes();
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = start
                .checked_add(i)
                .and_then(|at| config.get(at))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The guest cid is read-only.
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount {
                expected: QUEUE_SIZES.len(),
                got: ctx.queues.len(),
            });
        }
        self.active = Some(Active {
            mem: ctx.mem,
            interrupt: ctx.interrupt,
            queues: ctx.queues,
        });
        self.activate_evt.write(1).map_err(ActivateError::Event)
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn queue_progress(&mut self) -> Result<Vec<QueueProgress>, PersistError> {
        if self.active.is_some() && !self.registered {
            return Err(PersistError::Busy("vsock activation"));
        }
        Ok(self.active.as_ref().map_or_else(Vec::new, |a| {
            a.queues.iter().map(QueueProgress::of).collect()
        }))
    }

    /// The restored guest's connections died with the old VMM: tell it so before anything else
    /// goes to it.
    fn after_restore(&mut self) {
        self.reset = Reset::Pending;
    }
}

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;
