//! The virtio-mmio transport: register reads and writes of any offset and width (status state
//! machine, feature words, QueueSel in and out of range, queue setup, writes after DRIVER_OK,
//! resets) on an `MmioTransport` in front of a real device (rng, blk or net); once the driver
//! set DRIVER_OK the device serves its queue from the rings the driver configured.
//!
//! Checked besides "no panic": a live queue's configuration never changes until reset (FC
//! CVE-2026-5747), and an out-of-range QueueSel reads as an absent queue.
#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pangolin_fuzz::memory;
use pangolin_vmm::bus::BusDevice;
use pangolin_vmm::devices::virtio::blk::test_utils::MemDisk;
use pangolin_vmm::devices::virtio::blk::Block;
use pangolin_vmm::devices::virtio::mmio::regs::{self, status};
use pangolin_vmm::devices::virtio::mmio::{MmioTransport, Phase};
use pangolin_vmm::devices::virtio::net::test_utils::{pair, MAC};
use pangolin_vmm::devices::virtio::net::Net;
use pangolin_vmm::devices::virtio::rng::test_utils::Counter;
use pangolin_vmm::devices::virtio::rng::Rng;
use pangolin_vmm::devices::virtio::{Interrupt, VirtioDevice};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM: usize = 0x10_0000;

/// Every register offset of the layout, for `Reg::Known`.
const REGS: [u64; 26] = [
    regs::MAGIC_VALUE,
    regs::VERSION,
    regs::DEVICE_ID,
    regs::VENDOR_ID,
    regs::DEVICE_FEATURES,
    regs::DEVICE_FEATURES_SEL,
    regs::DRIVER_FEATURES,
    regs::DRIVER_FEATURES_SEL,
    regs::QUEUE_SEL,
    regs::QUEUE_NUM_MAX,
    regs::QUEUE_NUM,
    regs::QUEUE_READY,
    regs::QUEUE_NOTIFY,
    regs::INTERRUPT_STATUS,
    regs::INTERRUPT_ACK,
    regs::STATUS,
    regs::QUEUE_DESC_LOW,
    regs::QUEUE_DESC_HIGH,
    regs::QUEUE_DRIVER_LOW,
    regs::QUEUE_DRIVER_HIGH,
    regs::QUEUE_DEVICE_LOW,
    regs::QUEUE_DEVICE_HIGH,
    regs::SHM_LEN_LOW,
    regs::SHM_LEN_HIGH,
    regs::CONFIG_GENERATION,
    regs::CONFIG_SPACE,
];

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Reg {
    Known(u8),
    Config(u8),
    Raw(u16),
    Any(u64),
}

impl Reg {
    fn offset(self) -> u64 {
        match self {
            Reg::Known(i) => REGS[usize::from(i) % REGS.len()],
            Reg::Config(o) => regs::CONFIG_SPACE + u64::from(o),
            Reg::Raw(o) => u64::from(o),
            Reg::Any(o) => o,
        }
    }
}

fn width(w: u8) -> usize {
    [4, 1, 2, 8, 3, 0][usize::from(w) % 6]
}

#[derive(Arbitrary, Debug)]
enum Op {
    Read { reg: Reg, width: u8 },
    Write { reg: Reg, width: u8, value: u64 },
    /// The Linux driver's queue setup for queue `sel`: QueueSel, QueueNum, the three
    /// addresses (low and high halves), QueueReady.
    SetupQueue { sel: u32, size: u32, desc: u32, driver: u32, device: u32, ready: u32 },
    /// The driver's status walk up to `phase` (0 reset .. 4 DRIVER_OK), accepting `features`.
    Status { phase: u8, features: u64 },
    /// The guest writes memory (descriptors, rings, buffers).
    Poke { addr: u32, bytes: Vec<u8> },
    /// The event loop serves the device's queues (rng and blk).
    Serve,
}

#[derive(Arbitrary, Debug)]
struct Input {
    device: u8,
    ops: Vec<Op>,
}

enum Dev {
    Rng(Arc<Mutex<Rng<Counter>>>),
    Blk(Arc<Mutex<Block<MemDisk>>>),
    Net,
}

struct Harness {
    t: MmioTransport,
    dev: Dev,
    queues: usize,
}

impl Harness {
    fn read(&mut self, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.t.read(offset, &mut b);
        b
    }
    fn r32(&mut self, offset: u64) -> u32 {
        let b = self.read(offset, 4);
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
    fn w32(&mut self, offset: u64, v: u32) {
        self.t.write(offset, &v.to_le_bytes());
    }
}

fn harness(kind: u8, mem: &pangolin_vmm::memory::GuestMemoryMmap) -> Option<Harness> {
    let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).ok()?));
    let (dev, device): (Dev, Arc<Mutex<dyn VirtioDevice>>) = match kind % 3 {
        0 => {
            let d = Arc::new(Mutex::new(Rng::with_source(Counter(0)).ok()?));
            (Dev::Rng(d.clone()), d)
        }
        1 => {
            let disk = MemDisk {
                data: vec![0; 8192],
                ..MemDisk::default()
            };
            let d = Arc::new(Mutex::new(Block::with_backend(disk, false).ok()?));
            (Dev::Blk(d.clone()), d)
        }
        _ => {
            let (tap, _host) = pair();
            let d = Arc::new(Mutex::new(Net::new(Box::new(tap), MAC).ok()?));
            (Dev::Net, d)
        }
    };
    let queues = device.lock().ok()?.queue_max_sizes().len();
    let t = MmioTransport::new(mem.clone(), device, irq);
    Some(Harness { t, dev, queues })
}

fuzz_target!(|input: Input| {
    let mem = memory(MEM);
    let Some(mut h) = harness(input.device, &mem) else { return };
    let mut live = None;
    for op in input.ops.iter().take(512) {
        match op {
            Op::Read { reg, width: w } => {
                let _ = h.read(reg.offset(), width(*w));
            }
            Op::Write { reg, width: w, value } => {
                let bytes = value.to_le_bytes();
                h.t.write(reg.offset(), &bytes[..width(*w)]);
            }
            Op::SetupQueue { sel, size, desc, driver, device, ready } => {
                h.w32(regs::QUEUE_SEL, *sel);
                h.w32(regs::QUEUE_NUM, *size);
                for (low, addr) in [
                    (regs::QUEUE_DESC_LOW, desc),
                    (regs::QUEUE_DRIVER_LOW, driver),
                    (regs::QUEUE_DEVICE_LOW, device),
                ] {
                    h.w32(low, *addr);
                    h.w32(low + 4, 0);
                }
                h.w32(regs::QUEUE_READY, *ready);
            }
            Op::Status { phase, features } => {
                let walk = [
                    0,
                    status::ACKNOWLEDGE,
                    status::ACKNOWLEDGE | status::DRIVER,
                    status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
                    status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
                ];
                let last = usize::from(*phase % 5);
                for (i, &value) in walk.iter().enumerate().take(last + 1) {
                    if i == 3 {
                        for sel in 0..2u32 {
                            h.w32(regs::DRIVER_FEATURES_SEL, sel);
                            let word = (features >> (32 * sel)) & 0xffff_ffff;
                            h.w32(regs::DRIVER_FEATURES, u32::try_from(word).unwrap_or(0));
                        }
                    }
                    h.w32(regs::STATUS, value);
                }
            }
            Op::Poke { addr, bytes } => {
                let _ = mem.write_slice(bytes, GuestAddress(u64::from(*addr)));
            }
            Op::Serve => match &h.dev {
                Dev::Rng(d) => d.lock().expect("rng").process_queue(),
                Dev::Blk(d) => d.lock().expect("blk").process_queue(),
                Dev::Net => {}
            },
        }
        let state = h.t.state();
        if state.phase == Phase::DriverOk {
            let queues = state.queues.clone();
            match &live {
                Some(before) => assert_eq!(before, &queues, "queue changed after DRIVER_OK"),
                None => live = Some(queues),
            }
        } else {
            live = None;
        }
        let sel = h.t.state().queue_sel;
        if usize::try_from(sel).map_or(true, |s| s >= h.queues) {
            assert_eq!(h.r32(regs::QUEUE_NUM_MAX), 0, "absent queue {sel}");
            assert_eq!(h.r32(regs::QUEUE_READY), 0, "absent queue {sel}");
        }
    }
});
