//! Tests of the vsock device ([`super`]): the guest driver played on mock queues, host clients on
//! real Unix sockets.

use super::*;
use crate::devices::virtio::test_utils::{NEXT, WRITE};
use crate::devices::virtio::vsock::packet::{op, Header, HDR_SIZE, TYPE_STREAM};
use crate::devices::virtio::vsock::test_utils::{TempDir, TestRegistry};
use crate::devices::virtio::vsock::{VsockError, MAX_CONTROL_PACKETS};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

const CID: u64 = 3;
const RX_BASE: u64 = 0x10_0000;
const TX_BASE: u64 = 0x80_0000;
const SLOT: u64 = 0x2000;
const RX_BUF: u32 = 0x1000 + 44;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).expect("mem")
}

/// Plays the guest driver on the rx and tx queues.
struct Guest<'a> {
    mem: &'a GuestMemoryMmap,
    rx: MockSplitQueue<'a, GuestMemoryMmap>,
    tx: MockSplitQueue<'a, GuestMemoryMmap>,
    ev: MockSplitQueue<'a, GuestMemoryMmap>,
    rx_next: u16,
    tx_next: u16,
    rx_seen: u16,
}

impl<'a> Guest<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        Self {
            mem,
            rx: MockSplitQueue::create(mem, GuestAddress(0), QUEUE_SIZE),
            tx: MockSplitQueue::create(mem, GuestAddress(0x1_0000), QUEUE_SIZE),
            ev: MockSplitQueue::create(mem, GuestAddress(0x2_0000), QUEUE_SIZE),
            rx_next: 0,
            tx_next: 0,
            rx_seen: 0,
        }
    }

    fn activate(&self, dev: &mut Vsock) -> Arc<Interrupt> {
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("irq")));
        let queues = vec![
            self.rx.create_queue().expect("rx"),
            self.tx.create_queue().expect("tx"),
            self.ev.create_queue().expect("ev"),
        ];
        dev.activate(ActivateContext {
            mem: self.mem.clone(),
            interrupt: interrupt.clone(),
            queues,
        })
        .expect("activate");
        interrupt
    }

    fn post_rx(&mut self, n: u16) {
        for _ in 0..n {
            let idx = self.rx_next % QUEUE_SIZE;
            let addr = RX_BASE + u64::from(idx) * SLOT;
            let desc = SplitDescriptor::new(addr, RX_BUF, WRITE, 0);
            self.rx
                .add_desc_chains(&[RawDescriptor::from(desc)], idx)
                .expect("rx");
            self.rx_next = self.rx_next.wrapping_add(1);
        }
    }

    fn send(&mut self, hdr: Header, payload: &[u8]) {
        let idx = self.tx_next % QUEUE_SIZE;
        let addr = TX_BASE + u64::from(idx) * SLOT;
        let hdr = Header {
            len: u32::try_from(payload.len()).expect("len"),
            ..hdr
        };
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(addr))
            .expect("hdr");
        self.mem
            .write_slice(payload, GuestAddress(addr + 44))
            .expect("payload");
        let len = u32::try_from(HDR_SIZE + payload.len()).expect("len");
        let desc = SplitDescriptor::new(addr, len, 0, 0);
        self.send_chain(&[desc]);
    }

    /// Queues one tx chain of raw descriptors (NEXT links added here).
    fn send_chain(&mut self, descs: &[SplitDescriptor]) {
        let start = self.tx_next % QUEUE_SIZE;
        let n = u16::try_from(descs.len()).expect("n");
        let raw: Vec<RawDescriptor> = (descs.iter().enumerate())
            .map(|(i, d)| {
                let i = u16::try_from(i).expect("i");
                let last = i + 1 == n;
                let flags = if last { d.flags() } else { d.flags() | NEXT };
                let next = if last { 0 } else { start + i + 1 };
                RawDescriptor::from(SplitDescriptor::new(d.addr().0, d.len(), flags, next))
            })
            .collect();
        self.tx.add_desc_chains(&raw, start).expect("tx");
        self.tx_next = self.tx_next.wrapping_add(n);
    }

    fn tx_used(&self) -> u16 {
        self.tx.used().idx().load()
    }

    /// Packets the device wrote since the last call (header, payload, used length).
    fn received(&mut self) -> Vec<(Header, Vec<u8>, u32)> {
        let mut out = Vec::new();
        let end = self.rx.used().idx().load();
        while self.rx_seen != end {
            let elem = (self.rx.used().ring())
                .ref_at(usize::from(self.rx_seen % QUEUE_SIZE))
                .expect("used")
                .load();
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let addr = RX_BASE + u64::from(elem.id()) * SLOT;
            let mut raw = [0u8; HDR_SIZE];
            self.mem
                .read_slice(&mut raw, GuestAddress(addr))
                .expect("r");
            let hdr = Header::from_bytes(&raw);
            let mut data = vec![0u8; usize::try_from(elem.len().saturating_sub(44)).expect("n")];
            self.mem
                .read_slice(&mut data, GuestAddress(addr + 44))
                .expect("r");
            out.push((hdr, data, elem.len()));
        }
        out
    }
}

fn guest_hdr(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: VSOCK_HOST_CID,
        src_port,
        dst_port,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 64 * 1024,
        ..Header::default()
    }
}

fn kick(dev: &mut Vsock, reg: &mut TestRegistry, queue: usize) {
    dev.queue_events()[queue].write(1).expect("kick");
    let fd = dev.queue_events()[queue].as_raw_fd();
    dev.handle_event(fd, EventSet::IN, reg);
}

fn started(dir: &TempDir, guest: &Guest) -> (Vsock, TestRegistry, Arc<Interrupt>) {
    let mut dev = Vsock::new(CID, dir.path().join("v.sock")).expect("vsock");
    let mut reg = TestRegistry::default();
    let irq = guest.activate(&mut dev);
    let fd = dev.activate_evt().as_raw_fd();
    dev.handle_event(fd, EventSet::IN, &mut reg);
    (dev, reg, irq)
}

#[test]
fn config_features_and_construction() {
    let dir = TempDir::new();
    assert!(matches!(
        Vsock::new(2, dir.path().join("a")),
        Err(VsockError::GuestCid(2))
    ));
    assert!(matches!(
        Vsock::new(u64::from(u32::MAX), dir.path().join("a")),
        Err(VsockError::GuestCid(_))
    ));
    let mut dev = Vsock::new(0x1122_3344, dir.path().join("v.sock")).expect("vsock");
    assert!(matches!(
        Vsock::new(CID, dir.path().join("v.sock")),
        Err(VsockError::Bind(_))
    ));
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(dev.queue_events().len(), 3);
    assert_eq!(dev.avail_features(), VIRTIO_F_VERSION_1);
    dev.set_acked_features(u64::MAX);
    assert_eq!(dev.acked_features, VIRTIO_F_VERSION_1);
    let mut cfg = [0xffu8; 12];
    dev.read_config(0, &mut cfg);
    assert_eq!(cfg, [0x44, 0x33, 0x22, 0x11, 0, 0, 0, 0, 0, 0, 0, 0]);
    let mut hi = [0xffu8; 2];
    dev.read_config(2, &mut hi);
    assert_eq!(hi, [0x22, 0x11]);
    dev.read_config(u64::MAX, &mut hi);
    assert_eq!(hi, [0, 0]);
    dev.write_config(0, &[9; 8]);
    dev.read_config(0, &mut cfg[..1]);
    assert_eq!(cfg[0], 0x44);
    let mem = memory();
    let guest = Guest::new(&mem);
    let err = dev.activate(ActivateContext {
        mem: mem.clone(),
        interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("irq"))),
        queues: vec![guest.rx.create_queue().expect("rx")],
    });
    assert!(matches!(
        err,
        Err(ActivateError::QueueCount {
            expected: 3,
            got: 1
        })
    ));
    assert!(!dev.is_activated());
}

#[test]
fn activation_registers_queues_listener_and_timer() {
    let dir = TempDir::new();
    let mem = memory();
    let guest = Guest::new(&mem);
    let (dev, reg, _irq) = started(&dir, &guest);
    assert!(dev.is_activated());
    assert_eq!(reg.fds.len(), 5);
    for evt in dev.queue_events() {
        assert_eq!(reg.armed(evt.as_raw_fd()), Some(EventSet::IN));
    }
    assert!(reg.fds.contains_key(&dev.muxer.listener_fd()));
    assert!(reg.fds.contains_key(&dev.timer.as_raw_fd()));
}

/// A host client connects to the device's socket and asks for port 1024; the device
/// accepts it and reads the request. The client and its descriptor in the device.
fn host_connects(dir: &TempDir, dev: &mut Vsock, reg: &mut TestRegistry) -> (UnixStream, RawFd) {
    let mut client = UnixStream::connect(dir.path().join("v.sock")).expect("connect");
    client.write_all(b"CONNECT 1024\n").expect("w");
    let before: Vec<RawFd> = reg.fds.keys().copied().collect();
    dev.handle_event(dev.muxer.listener_fd(), EventSet::IN, reg);
    let fd = *reg
        .fds
        .keys()
        .find(|fd| !before.contains(fd))
        .expect("client fd");
    reg.fire(fd);
    dev.handle_event(fd, EventSet::IN, reg);
    (client, fd)
}

#[test]
fn a_restored_device_resets_the_transport_before_any_rx() {
    let dir = TempDir::new();
    let mem = memory();
    let mut guest = Guest::new(&mem);
    let (mut dev, mut reg, irq) = started(&dir, &guest);
    dev.after_restore();
    guest.post_rx(8);
    kick(&mut dev, &mut reg, RX_QUEUE);
    // A host connection waits: no event buffer yet, so no reset, so no rx.
    let _client = host_connects(&dir, &mut dev, &mut reg);
    assert!(
        guest.received().is_empty(),
        "rx held until the reset is out"
    );
    assert_eq!(irq.status(), 0);
    // The driver posts an event buffer: the reset goes there first, then the request.
    let ev = SplitDescriptor::new(0x3_0000, 8, WRITE, 0);
    guest
        .ev
        .add_desc_chains(&[RawDescriptor::from(ev)], 0)
        .expect("event buffer");
    mem.write_obj(0xffff_ffff_u32, GuestAddress(0x3_0000))
        .expect("poison");
    kick(&mut dev, &mut reg, EVENT_QUEUE);
    assert_eq!(guest.ev.used().idx().load(), 1);
    let elem = guest.ev.used().ring().ref_at(0).expect("used").load();
    assert_eq!((elem.id(), elem.len()), (0, 4));
    let id: u32 = mem.read_obj(GuestAddress(0x3_0000)).expect("read");
    assert_eq!(id, EVENT_TRANSPORT_RESET);
    assert_ne!(irq.status() & 1, 0);
    assert!(
        guest.received().is_empty(),
        "rx still held: the driver has not handled the reset yet"
    );
    // Its event worker refills the buffer and kicks: now the request goes out, and the
    // reset is not sent twice.
    let ev = SplitDescriptor::new(0x3_1000, 8, WRITE, 0);
    guest
        .ev
        .add_desc_chains(&[RawDescriptor::from(ev)], 1)
        .expect("event buffer");
    kick(&mut dev, &mut reg, EVENT_QUEUE);
    assert_eq!(guest.ev.used().idx().load(), 1);
    let pkts = guest.received();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, op::REQUEST);
    assert_eq!(
        dev.queue_progress().expect("progress")[EVENT_QUEUE],
        QueueProgress {
            next_avail: 1,
            next_used: 1
        }
    );
}

#[test]
fn host_connect_and_data_through_the_queues() {
    let dir = TempDir::new();
    let mem = memory();
    let mut guest = Guest::new(&mem);
    let (mut dev, mut reg, irq) = started(&dir, &guest);
    guest.post_rx(8);
    kick(&mut dev, &mut reg, RX_QUEUE);
    let (mut client, fd) = host_connects(&dir, &mut dev, &mut reg);
    let pkts = guest.received();
    assert_eq!(pkts.len(), 1);
    let req = pkts[0].0;
    assert_eq!(
        (req.op, req.dst_port, req.dst_cid, pkts[0].2),
        (op::REQUEST, 1024, CID, 44)
    );
    assert_ne!(irq.status() & 1, 0, "used-buffer interrupt raised");
    // The guest accepts, then both sides talk.
    guest.send(guest_hdr(op::RESPONSE, 1024, req.src_port), b"");
    kick(&mut dev, &mut reg, TX_QUEUE);
    assert_eq!(guest.tx_used(), 1);
    let line = format!("OK {}\n", req.src_port);
    let mut got = vec![0u8; line.len()];
    client.read_exact(&mut got).expect("ok line");
    assert_eq!(got, line.as_bytes());
    guest.send(guest_hdr(op::RW, 1024, req.src_port), b"from guest");
    kick(&mut dev, &mut reg, TX_QUEUE);
    let mut got = [0u8; 10];
    client.read_exact(&mut got).expect("data");
    assert_eq!(&got, b"from guest");
    client.write_all(b"from host").expect("w");
    reg.fire(fd);
    dev.handle_event(fd, EventSet::IN, &mut reg);
    let pkts = guest.received();
    assert_eq!(pkts.len(), 1);
    assert_eq!(
        (pkts[0].0.op, pkts[0].1.as_slice()),
        (op::RW, &b"from host"[..])
    );
    assert_eq!(pkts[0].2, 44 + 9);
}

#[test]
fn packets_wait_for_rx_buffers_without_spinning() {
    let dir = TempDir::new();
    let mem = memory();
    let mut guest = Guest::new(&mem);
    let (mut dev, mut reg, _irq) = started(&dir, &guest);
    guest.send(guest_hdr(op::REQUEST, 5000, 99), b"");
    kick(&mut dev, &mut reg, TX_QUEUE);
    assert_eq!(guest.tx_used(), 1);
    assert!(guest.received().is_empty(), "no rx buffer yet");
    assert!(dev.muxer.has_rx());
    guest.post_rx(1);
    kick(&mut dev, &mut reg, RX_QUEUE);
    let pkts = guest.received();
    assert_eq!(pkts.len(), 1);
    assert_eq!(
        (pkts[0].0.op, pkts[0].0.src_port, pkts[0].0.dst_port),
        (op::RST, 99, 5000)
    );
}

#[test]
fn malformed_chains_are_returned_and_the_device_carries_on() {
    let dir = TempDir::new();
    let mem = memory();
    let mut guest = Guest::new(&mem);
    let (mut dev, mut reg, _irq) = started(&dir, &guest);
    let w = WRITE;
    // tx: writable descriptor, too short, out of RAM, payload beyond the maximum.
    guest.send_chain(&[SplitDescriptor::new(TX_BASE, 64, w, 0)]);
    guest.send_chain(&[SplitDescriptor::new(TX_BASE, 20, 0, 0)]);
    guest.send_chain(&[SplitDescriptor::new(0x2000_0000, 64, 0, 0)]);
    let huge = Header {
        len: 0x10_0000,
        ..guest_hdr(op::RW, 1, 2)
    };
    mem.write_slice(&huge.to_bytes(), GuestAddress(TX_BASE + 0x10_0000))
        .expect("w");
    guest.send_chain(&[
        SplitDescriptor::new(TX_BASE + 0x10_0000, 44, 0, 0),
        SplitDescriptor::new(TX_BASE, 0x1000, 0, 0),
    ]);
    kick(&mut dev, &mut reg, TX_QUEUE);
    assert_eq!(guest.tx_used(), 4);
    assert!(!dev.muxer.has_rx(), "malformed packets are dropped");
    // rx: a read-only buffer comes back empty; the next good one gets the packet.
    let ro = SplitDescriptor::new(RX_BASE, RX_BUF, 0, 0);
    guest
        .rx
        .add_desc_chains(&[RawDescriptor::from(ro)], 0)
        .expect("rx");
    guest.rx_next = 1;
    guest.post_rx(1);
    guest.send(guest_hdr(op::REQUEST, 5000, 99), b"");
    kick(&mut dev, &mut reg, TX_QUEUE);
    let pkts = guest.received();
    assert_eq!(pkts.len(), 2);
    assert_eq!(pkts[0].2, 0, "bad rx chain used with length 0");
    assert_eq!(pkts[1].0.op, op::RST);
    assert_eq!(dev.guest_errors.count(), 5, "four tx chains, one rx chain");
}

#[test]
fn tx_stalls_while_rx_is_full_and_resumes_when_it_drains() {
    let dir = TempDir::new();
    let mem = memory();
    let mut guest = Guest::new(&mem);
    let (mut dev, mut reg, _irq) = started(&dir, &guest);
    // Refused connects each queue an RST; no rx buffers to take them.
    for port in 0..u32::from(QUEUE_SIZE) {
        guest.send(guest_hdr(op::REQUEST, port, 99), b"");
    }
    kick(&mut dev, &mut reg, TX_QUEUE);
    let cap = u16::try_from(MAX_CONTROL_PACKETS).expect("cap");
    assert_eq!(guest.tx_used(), cap);
    for port in 0..10 {
        guest.send(guest_hdr(op::REQUEST, 1000 + port, 99), b"");
    }
    kick(&mut dev, &mut reg, TX_QUEUE);
    assert_eq!(guest.tx_used(), cap, "stalled: the control queue is full");
    guest.post_rx(64);
    kick(&mut dev, &mut reg, RX_QUEUE);
    assert_eq!(guest.received().len(), 64);
    assert_eq!(guest.tx_used(), cap + 10, "resumed once rx drained");
}

#[test]
fn end_to_end_through_the_event_manager() {
    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
    let dir = TempDir::new();
    let mem = memory();
    let mut guest = Guest::new(&mem);
    let listener =
        std::os::unix::net::UnixListener::bind(dir.path().join("v.sock_52")).expect("bind");
    let mut dev = Vsock::new(CID, dir.path().join("v.sock")).expect("vsock");
    let rx_kick = dev.queue_events()[RX_QUEUE].try_clone().expect("evt");
    let tx_kick = dev.queue_events()[TX_QUEUE].try_clone().expect("evt");
    let _irq = guest.activate(&mut dev);
    let dev = Arc::new(Mutex::new(dev));
    let mut manager =
        EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().expect("manager");
    manager.add_subscriber(dev.clone());
    let run = |manager: &mut EventManager<_>| {
        for _ in 0..10 {
            if manager.run_with_timeout(50).expect("run") == 0 {
                break;
            }
        }
    };
    run(&mut manager);
    guest.post_rx(8);
    rx_kick.write(1).expect("kick");
    guest.send(guest_hdr(op::REQUEST, 7000, 52), b"");
    tx_kick.write(1).expect("kick");
    run(&mut manager);
    let pkts = guest.received();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, op::RESPONSE);
    let (mut host, _) = listener.accept().expect("accept");
    host.write_all(b"hello guest").expect("w");
    run(&mut manager);
    let pkts = guest.received();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].1, b"hello guest");
    drop(host);
    run(&mut manager);
    let pkts = guest.received();
    assert_eq!(pkts[0].0.op, op::SHUTDOWN);
    guest.send(guest_hdr(op::RST, 7000, 52), b"");
    tx_kick.write(1).expect("kick");
    run(&mut manager);
    assert_eq!(dev.lock().expect("lock").muxer.connection_count(), 0);
}
