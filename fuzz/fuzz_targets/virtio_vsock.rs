//! virtio-vsock: the real device and muxer on a real event loop (`event_manager`, as in the
//! VMM), with the hybrid Unix-socket backend in a temporary directory. The guest posts tx
//! packets (mostly well-formed headers with fuzzed fields, split or not, or raw chains) and rx
//! buffers; the host side connects (`CONNECT <port>\n` or garbage), accepts guest-initiated
//! connections on `<uds>_52`, writes, reads, half-closes and closes. This drives the TX parser,
//! the RX writer, the credit accounting and every connection state transition.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use pangolin_fuzz::{memory, Driver, Layout, QueueOp};
use pangolin_vmm::devices::virtio::test_utils::activation;
use pangolin_vmm::devices::virtio::vsock::packet::{Header, HDR_SIZE};
use pangolin_vmm::devices::virtio::vsock::test_utils::TempDir;
use pangolin_vmm::devices::virtio::vsock::{Vsock, HOST_PORT_BASE, QUEUE_SIZE, VSOCK_HOST_CID};
use pangolin_vmm::devices::virtio::VirtioDevice;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

const CID: u64 = 3;
const MEM: usize = 0x20_0000;
/// Guest port a host service listens on (`<uds>_52`).
const SERVICE_PORT: u32 = 52;
const TX_BASE: u64 = 0x1_0000;
const TX_SLOT: u64 = 0x8000;
const RX_BASE: u64 = 0x10_0000;
const RX_SLOT: u64 = 0x1000;
const LAYOUT: Layout = Layout {
    data_base: 0x1_0000,
    data_len: 0x1f_0000,
};
const MAX_CLIENTS: usize = 16;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Cid {
    Guest,
    Host,
    Raw(u64),
}

impl Cid {
    fn get(self) -> u64 {
        match self {
            Cid::Guest => CID,
            Cid::Host => VSOCK_HOST_CID,
            Cid::Raw(c) => c,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Port {
    /// The host service at `<uds>_52`.
    Service,
    /// A local port handed to a host-initiated connection.
    HostLocal(u8),
    Small(u8),
    Raw(u32),
}

impl Port {
    fn get(self) -> u32 {
        match self {
            Port::Service => SERVICE_PORT,
            Port::HostLocal(n) => HOST_PORT_BASE + u32::from(n % 8),
            Port::Small(n) => 1000 + u32::from(n % 8),
            Port::Raw(p) => p,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum OpCode {
    /// REQUEST .. CREDIT_REQUEST (1..=7) or 0.
    Known(u8),
    Raw(u16),
}

#[derive(Arbitrary, Debug)]
struct Packet {
    src_cid: Cid,
    dst_cid: Cid,
    src_port: Port,
    dst_port: Port,
    stream: bool,
    op: OpCode,
    flags: u8,
    buf_alloc: u32,
    fwd_cnt: u32,
    /// Header `len` other than the payload's.
    len: Option<u32>,
    payload: Vec<u8>,
    /// Header and payload in separate descriptors, split at this offset.
    split: Option<u8>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Tx(Packet),
    /// `n` rx buffers of `len` bytes.
    PostRx { n: u8, len: u16 },
    RxQueue(QueueOp),
    TxQueue(QueueOp),
    Kick(u8),
    /// A host client connects to the device socket and writes `CONNECT <port>\n` (or `line`).
    HostConnect { port: Port, line: Option<Vec<u8>> },
    /// The host service accepts a guest-initiated connection.
    HostAccept,
    HostWrite { client: u8, data: Vec<u8> },
    HostRead { client: u8 },
    HostShutdown { client: u8, how: u8 },
    HostClose { client: u8 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    ops: Vec<Op>,
}

struct Guest<'a> {
    rx: Driver<'a>,
    tx: Driver<'a>,
    ev: Driver<'a>,
    tx_slot: u64,
    rx_slot: u64,
}

fn run(manager: &mut EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>) {
    for _ in 0..16 {
        match manager.run_with_timeout(0) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

fn send(mem: &pangolin_vmm::memory::GuestMemoryMmap, g: &mut Guest<'_>, p: &Packet) {
    let op = match p.op {
        OpCode::Known(n) => u16::from(n % 8),
        OpCode::Raw(n) => n,
    };
    let payload = &p.payload[..p.payload.len().min(usize::try_from(TX_SLOT).unwrap_or(0) - HDR_SIZE)];
    let hdr = Header {
        src_cid: p.src_cid.get(),
        dst_cid: p.dst_cid.get(),
        src_port: p.src_port.get(),
        dst_port: p.dst_port.get(),
        len: p
            .len
            .unwrap_or_else(|| u32::try_from(payload.len()).unwrap_or(0)),
        type_: if p.stream { 1 } else { 2 },
        op,
        flags: u32::from(p.flags % 4),
        buf_alloc: p.buf_alloc,
        fwd_cnt: p.fwd_cnt,
    };
    let at = TX_BASE + (g.tx_slot % 16) * TX_SLOT;
    g.tx_slot += 1;
    let mut bytes = hdr.to_bytes().to_vec();
    bytes.extend_from_slice(payload);
    let _ = mem.write_slice(&bytes, GuestAddress(at));
    let total = u32::try_from(bytes.len()).unwrap_or(0);
    match p.split {
        Some(split) => {
            let first = u32::from(split).min(total);
            g.tx.post_contiguous(at, &[first, total - first], false);
        }
        None => g.tx.post_contiguous(at, &[total], false),
    }
}

fuzz_target!(|input: Input| {
    let dir = TempDir::new();
    let uds = dir.path().join("v.sock");
    let Ok(service) = UnixListener::bind(dir.path().join(format!("v.sock_{SERVICE_PORT}"))) else {
        return;
    };
    let _ = service.set_nonblocking(true);
    let Ok(mut dev) = Vsock::new(CID, uds.clone()) else { return };
    let mem = memory(MEM);
    let rxq = MockSplitQueue::create(&mem, GuestAddress(0), QUEUE_SIZE);
    let txq = MockSplitQueue::create(&mem, GuestAddress(0x4000), QUEUE_SIZE);
    let evq = MockSplitQueue::create(&mem, GuestAddress(0x8000), QUEUE_SIZE);
    let mut g = Guest {
        rx: Driver::new(&mem, &rxq, QUEUE_SIZE, LAYOUT),
        tx: Driver::new(&mem, &txq, QUEUE_SIZE, LAYOUT),
        ev: Driver::new(&mem, &evq, QUEUE_SIZE, LAYOUT),
        tx_slot: 0,
        rx_slot: 0,
    };
    let kicks: Vec<_> = dev
        .queue_events()
        .iter()
        .filter_map(|e| e.try_clone().ok())
        .collect();
    let queues: Vec<Queue> = [&rxq, &txq, &evq]
        .iter()
        .filter_map(|q| q.create_queue().ok())
        .collect();
    let (ctx, _irq) = activation(&mem, queues);
    assert!(dev.activate(ctx).is_ok());
    let Ok(mut manager) = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new() else {
        return;
    };
    manager.add_subscriber(Arc::new(Mutex::new(dev)));
    run(&mut manager);
    let mut clients: Vec<UnixStream> = Vec::new();
    let mut buf = vec![0u8; 0x1_0000];
    for op in input.ops.iter().take(256) {
        match op {
            Op::Tx(p) => {
                send(&mem, &mut g, p);
                let _ = kicks[1].write(1);
            }
            Op::PostRx { n, len } => {
                for _ in 0..(n % 16).max(1) {
                    let at = RX_BASE + (g.rx_slot % 256) * RX_SLOT;
                    g.rx_slot += 1;
                    let len = u32::from(*len).min(u32::try_from(RX_SLOT).unwrap_or(0));
                    g.rx.post_contiguous(at, &[len], true);
                }
                let _ = kicks[0].write(1);
            }
            Op::RxQueue(q) => g.rx.apply(q),
            Op::TxQueue(q) => g.tx.apply(q),
            Op::Kick(q) => {
                if usize::from(*q % 3) == 2 {
                    g.ev.publish(0);
                }
                let _ = kicks[usize::from(*q % 3)].write(1);
            }
            Op::HostConnect { port, line } => {
                if clients.len() < MAX_CLIENTS {
                    if let Ok(mut c) = UnixStream::connect(&uds) {
                        let _ = c.set_nonblocking(true);
                        let text = match line {
                            Some(raw) => raw.clone(),
                            None => format!("CONNECT {}\n", port.get()).into_bytes(),
                        };
                        let _ = c.write_all(&text);
                        clients.push(c);
                    }
                }
            }
            Op::HostAccept => {
                if clients.len() < MAX_CLIENTS {
                    if let Ok((c, _)) = service.accept() {
                        let _ = c.set_nonblocking(true);
                        clients.push(c);
                    }
                }
            }
            Op::HostWrite { client, data } => {
                if let Some(c) = pick(&mut clients, *client) {
                    let _ = c.write(data);
                }
            }
            Op::HostRead { client } => {
                if let Some(c) = pick(&mut clients, *client) {
                    let _ = c.read(&mut buf);
                }
            }
            Op::HostShutdown { client, how } => {
                if let Some(c) = pick(&mut clients, *client) {
                    let how = match how % 3 {
                        0 => std::net::Shutdown::Write,
                        1 => std::net::Shutdown::Read,
                        _ => std::net::Shutdown::Both,
                    };
                    let _ = c.shutdown(how);
                }
            }
            Op::HostClose { client } => {
                if !clients.is_empty() {
                    let i = usize::from(*client) % clients.len();
                    clients.swap_remove(i);
                }
            }
        }
        run(&mut manager);
    }
});

fn pick(clients: &mut [UnixStream], i: u8) -> Option<&mut UnixStream> {
    let n = clients.len();
    clients.get_mut(usize::from(i) % n.max(1))
}
