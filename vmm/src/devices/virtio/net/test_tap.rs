//! A tap stand-in for tests: one end of a datagram socket pair (frames keep their boundaries and
//! the descriptor polls like a tap); the test holds the other end as "the host network".

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;

use super::TapBackend;

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
    pub q: virtio_queue::mock::MockSplitQueue<'a, crate::memory::GuestMemoryMmap>,
    next_desc: u16,
}

impl<'a> Driver<'a> {
    /// A queue of `size` entries at `base`.
    pub fn new(mem: &'a crate::memory::GuestMemoryMmap, base: u64, size: u16) -> Self {
        Self {
            q: virtio_queue::mock::MockSplitQueue::create(mem, vm_memory::GuestAddress(base), size),
            next_desc: 0,
        }
    }

    /// The device's view of the queue.
    pub fn queue(&self) -> virtio_queue::Queue {
        self.q.create_queue().expect("queue")
    }

    /// Makes one chain of `(addr, len, device_writable)` buffers available.
    pub fn add(&mut self, bufs: &[(u64, u32, bool)]) {
        use virtio_queue::desc::{split::Descriptor, RawDescriptor};
        let first = self.next_desc;
        let n = u16::try_from(bufs.len()).expect("count");
        let descs: Vec<RawDescriptor> = bufs
            .iter()
            .zip(first..)
            .map(|(&(addr, len, write), i)| {
                let mut flags = if write { 2 } else { 0 };
                if i + 1 < first + n {
                    flags |= 1;
                }
                RawDescriptor::from(Descriptor::new(addr, len, flags, i + 1))
            })
            .collect();
        self.q.add_desc_chains(&descs, first).expect("add chain");
        self.next_desc += n;
    }

    /// The used ring's index.
    pub fn used_idx(&self, mem: &crate::memory::GuestMemoryMmap) -> u16 {
        use vm_memory::{Address, Bytes};
        mem.read_obj(self.q.used_addr().unchecked_add(2))
            .expect("used idx")
    }

    /// Used element `i`: (head, len).
    pub fn used(&self, mem: &crate::memory::GuestMemoryMmap, i: u64) -> (u32, u32) {
        use vm_memory::{Address, Bytes};
        let at = self.q.used_addr().unchecked_add(4 + 8 * i);
        let id: u32 = mem.read_obj(at).expect("id");
        let len: u32 = mem.read_obj(at.unchecked_add(4)).expect("len");
        (id, len)
    }
}
