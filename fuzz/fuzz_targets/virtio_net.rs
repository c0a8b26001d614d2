//! virtio-net: the real device on a real event loop (the unit tests' `setup`: a socket-pair
//! tap, queues laid out by virtio-queue's mock). The guest posts rx buffers and tx frames (well
//! formed or raw chains) and kicks; the host network sends frames of any size into the tap and
//! drains what the guest sent. Drives the RX refill (frames waiting for buffers, frames too big
//! for them), TX gathering, the tap watch and bad-chain handling.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pangolin_fuzz::{memory, Driver, Layout, QueueOp};
use pangolin_vmm::devices::virtio::net::test_utils::setup;
use pangolin_vmm::devices::virtio::net::QUEUE_SIZE;
use pangolin_vmm::devices::virtio::VirtioDevice;
use vm_memory::{Bytes, GuestAddress};

const MEM: usize = 0x20_0000;
const LAYOUT: Layout = Layout {
    data_base: 0x3_0000,
    data_len: 0x1d_0000,
};
const RX_BASE: u64 = 0x4_0000;
const TX_BASE: u64 = 0x10_0000;

#[derive(Arbitrary, Debug)]
enum Op {
    /// `n` rx buffers, each split into descriptors of these lengths.
    PostRx { n: u8, lens: Vec<u16> },
    /// A frame (vnet header included) in descriptors split at these lengths.
    Tx { frame: Vec<u8>, pad: u16, splits: Vec<u16> },
    RxQueue(QueueOp),
    TxQueue(QueueOp),
    Kick(bool),
    /// The host network sends a frame of `len` bytes (`data` repeated) into the tap.
    HostSend { data: Vec<u8>, len: u16 },
    HostDrain,
    Run,
}

#[derive(Arbitrary, Debug)]
struct Input {
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let mem = memory(MEM);
    let mut s = setup(&mem);
    let kicks: Vec<_> = {
        let net = s.net.lock().expect("net");
        net.queue_events().iter().filter_map(|e| e.try_clone().ok()).collect()
    };
    let mut rx = Driver::new(&mem, &s.rx.q, QUEUE_SIZE, LAYOUT);
    let mut tx = Driver::new(&mem, &s.tx.q, QUEUE_SIZE, LAYOUT);
    let (mut rx_slot, mut tx_slot) = (0u64, 0u64);
    let mut sink = vec![0u8; 0x1_0010];
    for op in input.ops.iter().take(256) {
        match op {
            Op::PostRx { n, lens } => {
                for _ in 0..(n % 8).max(1) {
                    let at = RX_BASE + (rx_slot % 16) * 0x1_0000;
                    rx_slot += 1;
                    let lens: Vec<u32> = if lens.is_empty() {
                        vec![1526]
                    } else {
                        lens.iter().take(8).map(|&l| u32::from(l) % 0x2000).collect()
                    };
                    rx.post_contiguous(at, &lens, true);
                }
                let _ = kicks[0].write(1);
            }
            Op::Tx { frame, pad, splits } => {
                let at = TX_BASE + (tx_slot % 8) * 0x2_0000;
                tx_slot += 1;
                let _ = mem.write_slice(frame, GuestAddress(at));
                let total = u32::try_from(frame.len()).unwrap_or(0) + u32::from(*pad);
                let mut lens = Vec::new();
                let mut left = total;
                for &split in splits.iter().take(8) {
                    let l = u32::from(split).min(left);
                    lens.push(l);
                    left -= l;
                }
                lens.push(left);
                tx.post_contiguous(at, &lens, false);
                let _ = kicks[1].write(1);
            }
            Op::RxQueue(q) => rx.apply(q),
            Op::TxQueue(q) => tx.apply(q),
            Op::Kick(which) => {
                let _ = kicks[usize::from(*which)].write(1);
            }
            Op::HostSend { data, len } => {
                let mut frame = data.clone();
                if !data.is_empty() {
                    frame = data.iter().copied().cycle().take(usize::from(*len)).collect();
                }
                let _ = s.host.send(&frame);
            }
            Op::HostDrain => while s.host.recv(&mut sink).is_ok() {},
            Op::Run => {}
        }
        for _ in 0..8 {
            match s.ev.run_with_timeout(0) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        assert!(!s.net.lock().expect("net").is_broken(), "guest input broke the device");
    }
});
