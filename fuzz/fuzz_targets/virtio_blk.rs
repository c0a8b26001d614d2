//! virtio-blk: request chains (header, data, status in any split) on the real device over an
//! in-memory disk (`MemDisk`, the unit tests' backend), served by `process_queue`.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pangolin_fuzz::{memory, Driver, Layout, QueueOp};
use pangolin_vmm::devices::virtio::blk::test_utils::MemDisk;
use pangolin_vmm::devices::virtio::blk::{Block, QUEUE_SIZE};
use pangolin_vmm::devices::virtio::test_utils::activation;
use pangolin_vmm::devices::virtio::VirtioDevice;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

const MEM: usize = 0x20_0000;
const LAYOUT: Layout = Layout {
    data_base: 0x1_0000,
    data_len: 0x1f_0000,
};
/// Request headers the `Request` op writes go here, one 16-byte slot per table entry.
const HEADERS: u64 = 0x1_0000;

#[derive(Arbitrary, Debug)]
enum Op {
    Queue(QueueOp),
    /// A well-formed request: header (type, sector), `data` buffers, status byte.
    Request {
        type_: u8,
        sector: u16,
        data: Vec<u16>,
        data_writable: bool,
    },
    Kick,
    ReadConfig(u8, u8),
}

#[derive(Arbitrary, Debug)]
struct Input {
    read_only: bool,
    /// Disk size in bytes (not necessarily whole sectors).
    disk_len: u16,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let mem = memory(MEM);
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), QUEUE_SIZE);
    let mut driver = Driver::new(&mem, &vq, QUEUE_SIZE, LAYOUT);
    let disk = MemDisk {
        data: vec![0x5a; usize::from(input.disk_len)],
        ..MemDisk::default()
    };
    let Ok(mut blk) = Block::with_backend(disk, input.read_only) else { return };
    let Ok(q) = vq.create_queue::<Queue>() else { return };
    let (ctx, _irq) = activation(&mem, vec![q]);
    assert!(blk.activate(ctx).is_ok());
    let mut slot = 0u64;
    for op in input.ops.iter().take(256) {
        match op {
            Op::Queue(q) => driver.apply(q),
            Op::Request { type_, sector, data, data_writable } => {
                // Types 0 (IN), 1 (OUT), 4 (FLUSH), 8 (GET_ID) and others.
                let t = u32::from(*type_ % 10);
                let hdr_at = HEADERS + (slot % 256) * 16;
                let data_at = 0x2_0000 + (slot % 16) * 0x1_0000;
                slot += 1;
                let mut hdr = [0u8; 16];
                hdr[..4].copy_from_slice(&t.to_le_bytes());
                hdr[8..].copy_from_slice(&u64::from(*sector).to_le_bytes());
                let _ = mem.write_slice(&hdr, GuestAddress(hdr_at));
                let mut descs = vec![(hdr_at, 16u32, false)];
                let mut at = data_at;
                for &len in data.iter().take(8) {
                    let len = u32::from(len % 0x2001);
                    descs.push((at, len, *data_writable));
                    at += u64::from(len);
                }
                descs.push((at, 1, true));
                let chain = pangolin_fuzz::Chain {
                    bufs: descs
                        .iter()
                        .map(|&(addr, len, write)| pangolin_fuzz::Buf {
                            addr: pangolin_fuzz::Addr::Raw(addr),
                            len: pangolin_fuzz::Len::Raw(len),
                            write,
                            raw: None,
                        })
                        .collect(),
                };
                driver.post(&chain);
            }
            Op::Kick => blk.process_queue(),
            Op::ReadConfig(offset, len) => {
                let mut buf = vec![0u8; usize::from(*len % 32)];
                blk.read_config(u64::from(*offset), &mut buf);
            }
        }
    }
    blk.process_queue();
    assert_eq!(blk.capacity(), u64::from(input.disk_len) / 512);
});
