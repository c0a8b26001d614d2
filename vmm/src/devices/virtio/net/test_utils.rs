//! Test helpers: a tap stand-in (one end of a datagram socket pair: frames keep their boundaries
//! and the descriptor polls like a tap; the test holds the other end as "the host network"), a
//! guest driver for one queue, and an activated device on its own event loop.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Net, TapBackend, QUEUE_SIZE};
use crate::devices::virtio::test_utils::{linked, WRITE};
use crate::devices::virtio::{ActivateContext, Interrupt, VirtioDevice};
use crate::memory::GuestMemoryMmap;

/// The device's end.
pub struct SocketTap(pub UnixDatagram);

/// A connected pair: the backend for the device, the peer for the test.
pub fn pair() -> (SocketTap, UnixDatagram) {
    let (a, b) = UnixDatagram::pair().expect("socketpair");
    a.set_nonblocking(true).expect("nonblocking");
    b.set_nonblocking(true).expect("nonblocking");
    (SocketTap(a), b)
}

impl TapBackend for SocketTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.recv(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        self.0.send(frame)
    }

    fn raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Plays the guest driver on one queue: builds chains in the descriptor table, reads the used
/// ring.
pub struct Driver<'a> {
    /// The queue in guest memory.
    pub q: MockSplitQueue<'a, GuestMemoryMmap>,
    next_desc: u16,
}

impl<'a> Driver<'a> {
    /// A queue of `size` entries at `base`.
    pub fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        Self {
            q: MockSplitQueue::create(mem, GuestAddress(base), size),
            next_desc: 0,
        }
    }

    /// The device's view of the queue.
    pub fn queue(&self) -> virtio_queue::Queue {
        self.q.create_queue().expect("queue")
    }

    /// Makes one chain of `(addr, len, device_writable)` buffers available.
    pub fn add(&mut self, bufs: &[(u64, u32, bool)]) {
        let first = self.next_desc;
        let bufs: Vec<(u64, u32, u16)> = (bufs.iter())
            .map(|&(addr, len, write)| (addr, len, if write { WRITE } else { 0 }))
            .collect();
        (self.q)
            .add_desc_chains(&linked(first, &bufs), first)
            .expect("add chain");
        self.next_desc += u16::try_from(bufs.len()).expect("count");
    }

    /// The used ring's index.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(self.q.used_addr().unchecked_add(2))
            .expect("used idx")
    }

    /// Used element `i`: (head, len).
    pub fn used(&self, mem: &GuestMemoryMmap, i: u64) -> (u32, u32) {
        let at = self.q.used_addr().unchecked_add(4 + 8 * i);
        let id: u32 = mem.read_obj(at).expect("id");
        let len: u32 = mem.read_obj(at.unchecked_add(4)).expect("len");
        (id, len)
    }
}

/// The guest MAC the tests use.
pub const MAC: [u8; 6] = [0x02, 0x50, 0x47, 0x00, 0x00, 0x01];

/// An activated device on a socket-pair tap, in its own event manager.
pub struct Setup<'a> {
    /// The event loop the device is subscribed to.
    pub ev: EventManager<Arc<Mutex<Net>>>,
    /// The device.
    pub net: Arc<Mutex<Net>>,
    /// The guest's rx queue.
    pub rx: Driver<'a>,
    /// The guest's tx queue.
    pub tx: Driver<'a>,
    /// The device's interrupt line.
    pub interrupt: Arc<Interrupt>,
    /// The host end of the tap.
    pub host: UnixDatagram,
}

/// A device activated on fresh queues in `mem`; the activation event is already handled.
pub fn setup(mem: &GuestMemoryMmap) -> Setup<'_> {
    let (tap, host) = pair();
    let net = Arc::new(Mutex::new(Net::new(Box::new(tap), MAC).expect("net")));
    let mut ev = EventManager::<Arc<Mutex<Net>>>::new().expect("event manager");
    ev.add_subscriber(net.clone());
    let rx = Driver::new(mem, 0x1_0000, QUEUE_SIZE);
    let tx = Driver::new(mem, 0x2_0000, QUEUE_SIZE);
    let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("irq")));
    net.lock()
        .expect("lock")
        .activate(ActivateContext {
            mem: mem.clone(),
            interrupt: interrupt.clone(),
            queues: vec![rx.queue(), tx.queue()],
        })
        .expect("activate");
    assert_eq!(ev.run_with_timeout(100).expect("run"), 1);
    Setup {
        ev,
        net,
        rx,
        tx,
        interrupt,
        host,
    }
}

/// The guest kicks `queue`.
pub fn kick(s: &Setup<'_>, queue: usize) {
    s.net.lock().expect("lock").queue_events()[queue]
        .write(1)
        .expect("kick");
}
