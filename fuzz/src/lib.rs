//! What the virtio fuzz targets share: a hostile guest driver that lays descriptor chains, ring
//! indices and buffer contents chosen by the fuzzer into real guest memory (vm-memory's
//! `GuestMemoryMmap`), through virtio-queue's `MockSplitQueue`. The devices then parse that memory
//! with their own code; nothing here interprets it.
//!
//! Inputs are structured (`arbitrary`) so that most chains are plausible (buffers inside a data
//! area, linked in order) and some are not (raw addresses and lengths, raw `flags`/`next`, ring
//! indices anywhere): mostly valid inputs reach deep into a device, broken ones test its checks.

use arbitrary::Arbitrary;
use pangolin_vmm::memory::GuestMemoryMmap;
use pangolin_vmm::devices::virtio::test_utils::{NEXT, WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

/// Anonymous guest memory of `size` bytes at guest address 0.
///
/// # Panics
/// If the mapping fails (a harness bug: sizes are constants).
pub fn memory(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).expect("guest memory")
}

/// Where a buffer lies.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Addr {
    /// In the data area, at this byte offset.
    Data(u16),
    /// At the start of this 4 KiB page of the data area.
    Page(u8),
    /// Anywhere (mostly outside guest memory).
    Raw(u64),
}

/// How long a buffer is.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Len {
    /// Up to 255 bytes.
    Small(u8),
    /// Up to 64 KiB.
    Medium(u16),
    /// Any length.
    Raw(u32),
}

impl Len {
    /// The length in bytes.
    pub fn get(self) -> u32 {
        match self {
            Len::Small(n) => u32::from(n),
            Len::Medium(n) => u32::from(n),
            Len::Raw(n) => n,
        }
    }
}

/// One descriptor of a chain.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct Buf {
    /// Its address.
    pub addr: Addr,
    /// Its length.
    pub len: Len,
    /// Device-writable.
    pub write: bool,
    /// Raw `(flags, next)` instead of the in-order link the driver would write.
    pub raw: Option<(u16, u16)>,
}

/// A descriptor chain as the guest posts it.
#[derive(Arbitrary, Debug, Clone)]
pub struct Chain {
    /// The descriptors, stored at consecutive table slots.
    pub bufs: Vec<Buf>,
}

/// The guest's view of the memory layout of one device's queues and buffers.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// Start of the data area buffers point into.
    pub data_base: u64,
    /// Its size.
    pub data_len: u64,
}

impl Layout {
    /// The guest address `addr` names.
    pub fn resolve(&self, addr: Addr) -> u64 {
        match addr {
            Addr::Data(off) => self.data_base + u64::from(off) % self.data_len,
            Addr::Page(page) => self.data_base + (u64::from(page) * 0x1000) % self.data_len,
            Addr::Raw(a) => a,
        }
    }
}

/// What the guest driver can do to one queue and the memory around it.
#[derive(Arbitrary, Debug, Clone)]
pub enum QueueOp {
    /// Makes a chain available.
    Post(Chain),
    /// Writes bytes into the data area.
    Write {
        /// Offset in the data area.
        offset: u16,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// Sets the available ring's index (publishes entries never written, or takes some back).
    SetAvailIdx(u16),
    /// Writes one available ring entry.
    SetAvailEntry {
        /// Ring slot.
        slot: u16,
        /// Head descriptor index (may be out of range).
        head: u16,
    },
    /// Sets the used ring's `flags`/the avail ring's `used_event` words (notification hints).
    SetFlags(u16),
}

/// Plays the driver of one split queue laid out by virtio-queue's mock.
pub struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    /// The queue in guest memory.
    pub q: &'a MockSplitQueue<'a, GuestMemoryMmap>,
    size: u16,
    layout: Layout,
    next_desc: u16,
}

impl<'a> Driver<'a> {
    /// The driver of `q` (`size` entries) with buffers in `layout`'s data area.
    pub fn new(
        mem: &'a GuestMemoryMmap,
        q: &'a MockSplitQueue<'a, GuestMemoryMmap>,
        size: u16,
        layout: Layout,
    ) -> Self {
        Self {
            mem,
            q,
            size,
            layout,
            next_desc: 0,
        }
    }

    /// The memory layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    fn avail_idx(&self) -> u16 {
        self.q.avail().idx().load()
    }

    /// Stores `descs` from the next free table slot and publishes the first as a new head.
    pub fn post_raw(&mut self, descs: &[RawDescriptor]) {
        if self.size == 0 {
            return;
        }
        let head = self.next_desc % self.size;
        for (i, d) in descs.iter().enumerate() {
            let Ok(i) = u16::try_from(i) else { break };
            let slot = head.wrapping_add(i) % self.size;
            let _ = self.q.desc_table().store(slot, *d);
        }
        let n = u16::try_from(descs.len()).unwrap_or(u16::MAX);
        self.next_desc = self.next_desc.wrapping_add(n.max(1)) % self.size;
        self.publish(head);
    }

    /// Puts `head` in the next available ring slot and bumps the index.
    pub fn publish(&mut self, head: u16) {
        let idx = self.avail_idx();
        let slot = usize::from(idx % self.size.max(1));
        if let Ok(entry) = self.q.avail().ring().ref_at(slot) {
            entry.store(head);
        }
        self.q.avail().idx().store(idx.wrapping_add(1));
    }

    /// Posts `chain`: descriptors linked in table order unless they carry raw links.
    pub fn post(&mut self, chain: &Chain) {
        let size = self.size.max(1);
        let head = self.next_desc % size;
        let n = chain.bufs.len();
        let descs: Vec<RawDescriptor> = (chain.bufs.iter().enumerate())
            .map(|(i, b)| {
                let addr = self.layout.resolve(b.addr);
                let dir = if b.write { WRITE } else { 0 };
                let (flags, next) = match b.raw {
                    Some((flags, next)) => (flags | dir, next),
                    None if i + 1 < n => {
                        let next = u16::try_from(i + 1).unwrap_or(0).wrapping_add(head) % size;
                        (dir | NEXT, next)
                    }
                    None => (dir, 0),
                };
                RawDescriptor::from(Descriptor::new(addr, b.len.get(), flags, next))
            })
            .collect();
        self.post_raw(&descs);
    }

    /// Posts one chain of buffers laid out back to back from `addr`, `lens` long each, with
    /// direction `write`.
    pub fn post_contiguous(&mut self, addr: u64, lens: &[u32], write: bool) {
        let mut at = addr;
        let bufs: Vec<Buf> = lens
            .iter()
            .map(|&len| {
                let b = Buf {
                    addr: Addr::Raw(at),
                    len: Len::Raw(len),
                    write,
                    raw: None,
                };
                at = at.saturating_add(u64::from(len));
                b
            })
            .collect();
        self.post(&Chain { bufs });
    }

    /// Applies one driver operation.
    pub fn apply(&mut self, op: &QueueOp) {
        match op {
            QueueOp::Post(chain) => self.post(chain),
            QueueOp::Write { offset, bytes } => {
                let at = self.layout.data_base + u64::from(*offset) % self.layout.data_len;
                let room = usize::try_from(self.layout.data_base + self.layout.data_len - at)
                    .unwrap_or(0);
                let n = bytes.len().min(room);
                let _ = self.mem.write_slice(&bytes[..n], GuestAddress(at));
            }
            QueueOp::SetAvailIdx(idx) => self.q.avail().idx().store(*idx),
            QueueOp::SetAvailEntry { slot, head } => {
                let slot = usize::from(*slot % self.size.max(1));
                if let Ok(entry) = self.q.avail().ring().ref_at(slot) {
                    entry.store(*head);
                }
            }
            QueueOp::SetFlags(flags) => {
                let _ = self.mem.write_obj(*flags, self.q.avail_addr());
                let _ = self.mem.write_obj(*flags, self.q.used_addr());
            }
        }
    }

    /// Used ring entries `(id, len)` the device has returned so far (at most a ring's worth).
    pub fn used(&self) -> Vec<(u32, u32)> {
        let idx = self.q.used().idx().load();
        let n = idx.min(self.size);
        (0..n)
            .filter_map(|i| self.q.used().ring().ref_at(usize::from(i)).ok())
            .map(|e| {
                let e = e.load();
                (e.id(), e.len())
            })
            .collect()
    }
}
