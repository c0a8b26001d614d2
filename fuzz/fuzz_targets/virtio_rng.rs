//! virtio-rng: request chains on the real device (`Rng` with a deterministic entropy source),
//! served by `process_queue` as the event loop would after a kick.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pangolin_fuzz::{memory, Driver, Layout, QueueOp};
use pangolin_vmm::devices::virtio::rng::test_utils::Counter;
use pangolin_vmm::devices::virtio::rng::{Rng, QUEUE_SIZE};
use pangolin_vmm::devices::virtio::test_utils::activation;
use pangolin_vmm::devices::virtio::VirtioDevice;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

const MEM: usize = 0x20_0000;
const LAYOUT: Layout = Layout {
    data_base: 0x1_0000,
    data_len: 0x1f_0000,
};

#[derive(Arbitrary, Debug)]
enum Op {
    Queue(QueueOp),
    /// The guest kicks: the device serves every available chain.
    Kick,
    /// Driver reset and re-activation on the same rings.
    Reset,
}

#[derive(Arbitrary, Debug)]
struct Input {
    event_idx: bool,
    ops: Vec<Op>,
}

fn activate(rng: &mut Rng<Counter>, vq: &MockSplitQueue<'_, pangolin_vmm::memory::GuestMemoryMmap>, mem: &pangolin_vmm::memory::GuestMemoryMmap, event_idx: bool) {
    let Ok(mut q) = vq.create_queue::<Queue>() else { return };
    q.set_event_idx(event_idx);
    let (ctx, _irq) = activation(mem, vec![q]);
    assert!(rng.activate(ctx).is_ok(), "one queue activates");
}

fuzz_target!(|input: Input| {
    let mem = memory(MEM);
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), QUEUE_SIZE);
    let mut driver = Driver::new(&mem, &vq, QUEUE_SIZE, LAYOUT);
    let Ok(mut rng) = Rng::with_source(Counter(0)) else { return };
    activate(&mut rng, &vq, &mem, input.event_idx);
    for op in input.ops.iter().take(256) {
        match op {
            Op::Queue(q) => driver.apply(q),
            Op::Kick => rng.process_queue(),
            Op::Reset => {
                assert!(rng.reset());
                activate(&mut rng, &vq, &mem, input.event_idx);
            }
        }
    }
    rng.process_queue();
});
