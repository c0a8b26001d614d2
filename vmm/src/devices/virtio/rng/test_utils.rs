//! Test helpers: a deterministic entropy source and an activated device on a mock queue.

use std::io;

use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestAddress;

use super::{EntropySource, Rng};
use crate::devices::virtio::test_utils::activation;
use crate::devices::virtio::VirtioDevice;
use crate::memory::GuestMemoryMmap;

/// Deterministic bytes 0, 1, 2, ... wrapping.
pub struct Counter(pub u8);

impl EntropySource for Counter {
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<()> {
        for b in buf {
            *b = self.0;
            self.0 = self.0.wrapping_add(1);
        }
        Ok(())
    }
}

/// 4 MiB of guest memory.
pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).expect("memory")
}

/// A device on `vq`, activated, counting from 0.
pub fn activated(mem: &GuestMemoryMmap, vq: &MockSplitQueue<'_, GuestMemoryMmap>) -> Rng<Counter> {
    let mut rng = Rng::with_source(Counter(0)).expect("rng");
    let (ctx, _) = activation(mem, vec![vq.create_queue().expect("queue")]);
    rng.activate(ctx).expect("activate");
    rng
}

/// Used element `index`: (head, len).
pub fn used(vq: &MockSplitQueue<'_, GuestMemoryMmap>, index: usize) -> (u32, u32) {
    let elem = vq.used().ring().ref_at(index).expect("used").load();
    (elem.id(), elem.len())
}

/// The device's interrupt status (0 before activation).
pub fn irq_status(rng: &Rng<Counter>) -> u32 {
    rng.interrupt().map_or(0, |i| i.status())
}
