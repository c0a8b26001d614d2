//! Test helpers shared by the virtio devices: descriptors and chains laid out in guest memory the
//! way a driver would, through virtio-queue's mock.

use std::sync::Arc;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateContext, Interrupt};
use crate::memory::GuestMemoryMmap;

/// Descriptor flag: another descriptor follows.
pub const NEXT: u16 = flag(VRING_DESC_F_NEXT);
/// Descriptor flag: device-writable.
pub const WRITE: u16 = flag(VRING_DESC_F_WRITE);
/// Descriptor flag: the buffer is a table of descriptors.
pub const INDIRECT: u16 = flag(VRING_DESC_F_INDIRECT);

/// A descriptor flag of virtio-bindings (a u32) as the 16-bit `flags` field takes it.
const fn flag(bit: u32) -> u16 {
    let [lo, hi, ..] = bit.to_le_bytes();
    u16::from_le_bytes([lo, hi])
}
const _: () = assert!(VRING_DESC_F_NEXT < 0x1_0000 && VRING_DESC_F_WRITE < 0x1_0000);
const _: () = assert!(VRING_DESC_F_INDIRECT < 0x1_0000);

/// One descriptor as the driver writes it.
pub fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

/// `(addr, len, flags)` buffers linked in order into one chain stored from table index `first`
/// (NEXT and `next` set here).
pub fn linked(first: u16, bufs: &[(u64, u32, u16)]) -> Vec<RawDescriptor> {
    let n = bufs.len();
    (bufs.iter().zip(first..))
        .enumerate()
        .map(|(i, (&(addr, len, flags), index))| {
            if i + 1 == n {
                raw(addr, len, flags, 0)
            } else {
                raw(addr, len, flags | NEXT, index + 1)
            }
        })
        .collect()
}

/// What the transport hands a device at DRIVER_OK: `mem`, `queues` and a fresh interrupt line
/// (returned too, to look at its status).
pub fn activation(mem: &GuestMemoryMmap, queues: Vec<Queue>) -> (ActivateContext, Arc<Interrupt>) {
    let irq = EventFd::new(EFD_NONBLOCK).expect("irq eventfd");
    let interrupt = Arc::new(Interrupt::new(irq));
    let ctx = ActivateContext {
        mem: mem.clone(),
        interrupt: interrupt.clone(),
        queues,
    };
    (ctx, interrupt)
}

/// Writes `descs` (links as given) at the start of `q`'s table, makes descriptor 0 available and
/// pops it as the device would.
pub fn chain_at<'a>(
    mem: &'a GuestMemoryMmap,
    q: &MockSplitQueue<'_, GuestMemoryMmap>,
    descs: &[RawDescriptor],
) -> DescriptorChain<&'a GuestMemoryMmap> {
    q.add_desc_chains(descs, 0).expect("descriptors");
    let mut queue: Queue = q.create_queue().expect("queue");
    queue.pop_descriptor_chain(mem).expect("chain")
}
