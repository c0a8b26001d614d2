//! Routes packets between the guest and host Unix streams, one [`Connection`] per port pair.
//!
//! The muxer owns the listening socket, the clients still writing their `CONNECT` line and the
//! connections keyed by `(local port, guest port)`. Packets for the guest leave in two streams:
//! control packets (`REQUEST`, `RESPONSE`, `RST`, `SHUTDOWN`, credit updates) are queued and go
//! first; data is read from a host stream only when an rx buffer is at hand, so nothing is read
//! that the guest cannot take. Host fds are armed one-shot with exactly the events the connection
//! can act on, so a stream the device cannot serve right now (no credit, no rx buffer) never
//! wakes the event loop in a spin.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use event_manager::EventSet;

use super::connection::{ConnState, Connection, ReadOutcome};
use super::event_handler::FdRegistry;
use super::packet::{op, Header, SHUTDOWN_BOTH, TYPE_STREAM};
use super::unix::{connect_nonblocking, guest_port_path, LineOutcome, PendingClient};
use super::{CONN_BUF_SIZE, HOST_PORT_BASE, MAX_CONNECTIONS, MAX_CONTROL_PACKETS, VSOCK_HOST_CID};
use crate::devices::virtio::GuestErrors;

/// How long a host client may take to send `CONNECT` and the guest to answer it.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a closing connection waits for the guest's `RST`.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// Clients accepted per listener wake-up.
const ACCEPT_BATCH: usize = 32;

/// `(local port, guest port)`.
type ConnKey = (u32, u32);

/// The connection table and host sockets of one vsock device.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    conns: HashMap<ConnKey, Connection>,
    by_fd: HashMap<RawFd, ConnKey>,
    pending: HashMap<RawFd, PendingClient>,
    host_ports: HashSet<u32>,
    control: VecDeque<Header>,
    rx_ready: VecDeque<ConnKey>,
    next_port: u32,
    /// Guest connections refused at the connection limit.
    refused: GuestErrors,
}

impl Muxer {
    /// A muxer serving `listener` (bound at `uds_path`, nonblocking) for guest `guest_cid`.
    pub fn new(guest_cid: u64, uds_path: PathBuf, listener: UnixListener) -> Self {
        Self {
            guest_cid,
            uds_path,
            listener,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            pending: HashMap::new(),
            host_ports: HashSet::new(),
            control: VecDeque::new(),
            rx_ready: VecDeque::new(),
            next_port: HOST_PORT_BASE,
            refused: GuestErrors::default(),
        }
    }

    /// The listening socket's fd.
    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Whether a packet for the guest may be waiting.
    pub fn has_rx(&self) -> bool {
        !self.control.is_empty() || !self.rx_ready.is_empty()
    }

    /// Whether the control queue is full: stop taking guest packets until rx drains.
    pub fn control_full(&self) -> bool {
        self.control.len() >= MAX_CONTROL_PACKETS
    }

    /// Connections and handshaking clients.
    pub fn connection_count(&self) -> usize {
        self.conns.len() + self.pending.len()
    }

    /// Accepts waiting host clients (listener readable).
    pub fn accept(&mut self, reg: &mut dyn FdRegistry, now: Instant) {
        for _ in 0..ACCEPT_BATCH {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!(error = %e, "vsock: accept failed");
                    return;
                }
            };
            if self.connection_count() >= MAX_CONNECTIONS {
                tracing::warn!("vsock: connection limit reached, dropping host client");
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let fd = stream.as_raw_fd();
            if reg.add(fd, EventSet::IN | EventSet::ONE_SHOT).is_err() {
                continue;
            }
            self.pending
                .insert(fd, PendingClient::new(stream, now + HANDSHAKE_TIMEOUT));
        }
    }

    /// Handles readiness of a client or connection fd.
    pub fn on_fd_event(
        &mut self,
        fd: RawFd,
        set: EventSet,
        reg: &mut dyn FdRegistry,
        now: Instant,
    ) {
        if self.pending.contains_key(&fd) {
            self.pending_ready(fd, reg, now);
        } else if let Some(&key) = self.by_fd.get(&fd) {
            self.conn_event(key, set, reg, now);
        } else {
            tracing::debug!(fd, "vsock: event for an unknown fd");
            reg.remove(fd);
        }
    }

    fn pending_ready(&mut self, fd: RawFd, reg: &mut dyn FdRegistry, now: Instant) {
        let Some(client) = self.pending.get_mut(&fd) else {
            return;
        };
        let port = match client.read_line() {
            LineOutcome::Pending => {
                if reg.modify(fd, EventSet::IN | EventSet::ONE_SHOT).is_err() {
                    self.drop_pending(fd, reg);
                }
                return;
            }
            LineOutcome::Rejected => {
                tracing::debug!("vsock: bad or missing CONNECT line");
                self.drop_pending(fd, reg);
                return;
            }
            LineOutcome::Port(port) => port,
        };
        let Some(client) = self.pending.remove(&fd) else {
            return;
        };
        let Some(local) = self.alloc_port(port) else {
            reg.remove(fd);
            return;
        };
        let mut conn = Connection::new(
            client.stream,
            ConnState::Connecting,
            local,
            port,
            self.guest_cid,
            CONN_BUF_SIZE,
        );
        conn.deadline = Some(now + HANDSHAKE_TIMEOUT);
        self.control.push_back(conn.header(op::REQUEST, 0));
        self.host_ports.insert(local);
        self.by_fd.insert(fd, (local, port));
        self.conns.insert((local, port), conn);
    }

    fn drop_pending(&mut self, fd: RawFd, reg: &mut dyn FdRegistry) {
        reg.remove(fd);
        self.pending.remove(&fd);
    }

    /// A free local port for a host-initiated connection to guest `peer`.
    fn alloc_port(&mut self, peer: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_port;
            self.next_port = port.checked_add(1).unwrap_or(HOST_PORT_BASE);
            if !self.host_ports.contains(&port) && !self.conns.contains_key(&(port, peer)) {
                return Some(port);
            }
        }
        None
    }

    fn conn_event(&mut self, key: ConnKey, set: EventSet, reg: &mut dyn FdRegistry, now: Instant) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        conn.armed = None;
        let gone = set.intersects(EventSet::HANG_UP | EventSet::ERROR);
        if conn.tx_pending() && (set.contains(EventSet::OUT) || gone) && conn.flush().is_err() {
            self.reset(key, reg);
            return;
        }
        let readable = set.intersects(EventSet::IN | EventSet::READ_HANG_UP) || gone;
        let reading = conn.state == ConnState::Established && conn.wants_read();
        if readable && reading {
            conn.rx_queued = true;
            self.rx_ready.push_back(key);
        } else if gone {
            match conn.state {
                ConnState::Connecting | ConnState::PeerClosed => {
                    self.reset(key, reg);
                    return;
                }
                // The guest reads no more: the host going away ends the connection.
                ConnState::Established if conn.guest_rcv_shut() => {
                    conn.state = ConnState::LocalClosed;
                    conn.deadline = Some(now + SHUTDOWN_TIMEOUT);
                    let hdr = conn.header(op::SHUTDOWN, SHUTDOWN_BOTH);
                    self.control.push_back(hdr);
                }
                // Unread bytes may precede the EOF: rx reads them (queued, or once the guest
                // gives credit) and then sends the SHUTDOWN.
                ConnState::Established | ConnState::LocalClosed => {}
            }
        }
        self.sync(key, reg);
    }

    /// Handles one guest packet (already validated for size).
    pub fn on_guest_packet(
        &mut self,
        hdr: &Header,
        payload: &[u8],
        reg: &mut dyn FdRegistry,
        now: Instant,
    ) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != VSOCK_HOST_CID {
            tracing::debug!(
                src = hdr.src_cid,
                dst = hdr.dst_cid,
                "vsock: packet with bad cids"
            );
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            if hdr.op != op::RST {
                self.control.push_back(self.rst_reply(hdr));
            }
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        let Some(conn) = self.conns.get_mut(&key) else {
            match hdr.op {
                op::REQUEST => self.guest_connect(hdr, reg),
                op::RST => {}
                _ => self.control.push_back(self.rst_reply(hdr)),
            }
            return;
        };
        conn.set_peer_credit(hdr);
        let ok = match (hdr.op, conn.state) {
            (op::RST, _) => {
                self.remove(key, reg);
                return;
            }
            (op::RESPONSE, ConnState::Connecting) => {
                conn.state = ConnState::Established;
                conn.deadline = None;
                let line = format!("OK {}\n", conn.local_port);
                conn.send_ack(line.as_bytes()).is_ok()
            }
            (op::RW, ConnState::Established | ConnState::LocalClosed) => {
                !conn.guest_send_shut() && conn.send_to_host(payload).is_ok()
            }
            (op::CREDIT_UPDATE, ConnState::Connecting) => false,
            (op::CREDIT_UPDATE, _) => true,
            (op::CREDIT_REQUEST, ConnState::Connecting) => false,
            (op::CREDIT_REQUEST, _) => {
                let update = conn.credit_update();
                self.control.push_back(update);
                true
            }
            (op::SHUTDOWN, ConnState::Connecting) => false,
            (op::SHUTDOWN, state) => {
                let flags = conn.guest_shutdown(hdr.flags);
                let flushed = conn.flush().is_ok();
                if flags == SHUTDOWN_BOTH {
                    if state == ConnState::LocalClosed {
                        self.reset(key, reg);
                        return;
                    }
                    conn.state = ConnState::PeerClosed;
                    conn.deadline = Some(now + SHUTDOWN_TIMEOUT);
                }
                flushed
            }
            _ => false,
        };
        if ok {
            self.sync(key, reg);
        } else {
            self.reset(key, reg);
        }
    }

    /// A guest `REQUEST` for a port nothing is connected to: try `<uds_path>_<port>`.
    fn guest_connect(&mut self, hdr: &Header, reg: &mut dyn FdRegistry) {
        if self.connection_count() >= MAX_CONNECTIONS {
            if self
                .refused
                .record(&crate::metrics::METRICS.guest_errors.vsock)
            {
                let count = self.refused.count();
                tracing::warn!(
                    count,
                    "vsock: connection limit reached, refusing guest connection"
                );
            }
            self.control.push_back(self.rst_reply(hdr));
            return;
        }
        let path = guest_port_path(&self.uds_path, hdr.dst_port);
        let stream = match connect_nonblocking(&path) {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(port = hdr.dst_port, error = %e, "vsock: guest connect refused");
                self.control.push_back(self.rst_reply(hdr));
                return;
            }
        };
        let mut conn = Connection::new(
            stream,
            ConnState::Established,
            hdr.dst_port,
            hdr.src_port,
            self.guest_cid,
            CONN_BUF_SIZE,
        );
        conn.set_peer_credit(hdr);
        let fd = conn.fd();
        if reg.add(fd, EventSet::ONE_SHOT).is_err() {
            self.control.push_back(self.rst_reply(hdr));
            return;
        }
        conn.armed = Some(EventSet::empty());
        self.control.push_back(conn.header(op::RESPONSE, 0));
        let key = (hdr.dst_port, hdr.src_port);
        self.by_fd.insert(fd, key);
        self.conns.insert(key, conn);
        self.sync(key, reg);
    }

    /// The next packet for the guest given `capacity` payload bytes of rx buffer; its payload
    /// (for `OP_RW`) is left in `out`.
    pub fn next_rx(
        &mut self,
        capacity: usize,
        out: &mut Vec<u8>,
        reg: &mut dyn FdRegistry,
        now: Instant,
    ) -> Option<Header> {
        out.clear();
        if let Some(hdr) = self.control.pop_front() {
            return Some(hdr);
        }
        for _ in 0..self.rx_ready.len() {
            let key = self.rx_ready.pop_front()?;
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.rx_queued = false;
            if !conn.wants_read() {
                self.sync(key, reg);
                continue;
            }
            let credit = usize::try_from(conn.peer_free_credit()).unwrap_or(usize::MAX);
            let max = credit.min(capacity);
            out.resize(max, 0);
            match conn.read_for_guest(out) {
                ReadOutcome::Data(n) => {
                    out.truncate(n);
                    let mut hdr = conn.header(op::RW, 0);
                    hdr.len = u32::try_from(n).unwrap_or(u32::MAX);
                    if n == max && conn.wants_read() {
                        // Probably more: stay in line rather than wait for epoll.
                        conn.rx_queued = true;
                        self.rx_ready.push_back(key);
                    }
                    self.sync(key, reg);
                    return Some(hdr);
                }
                ReadOutcome::Eof => {
                    out.clear();
                    conn.state = ConnState::LocalClosed;
                    conn.deadline = Some(now + SHUTDOWN_TIMEOUT);
                    let hdr = conn.header(op::SHUTDOWN, SHUTDOWN_BOTH);
                    self.sync(key, reg);
                    return Some(hdr);
                }
                ReadOutcome::WouldBlock => {
                    out.clear();
                    self.sync(key, reg);
                }
                ReadOutcome::Failed => {
                    out.clear();
                    let hdr = conn.header(op::RST, 0);
                    self.remove(key, reg);
                    return Some(hdr);
                }
            }
        }
        out.clear();
        None
    }

    /// Brings a connection's epoll arming and credit announcements up to date, and finishes a
    /// drained `PeerClosed` connection.
    fn sync(&mut self, key: ConnKey, reg: &mut dyn FdRegistry) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.state == ConnState::PeerClosed && !conn.tx_pending() {
            self.reset(key, reg);
            return;
        }
        if conn.state != ConnState::Connecting && conn.needs_credit_update() {
            let update = conn.credit_update();
            self.control.push_back(update);
        }
        let want = conn.interest();
        let arm = match conn.armed {
            // Disarmed and nothing to wait for: stay disarmed (no HUP spin).
            None if want.is_empty() => None,
            Some(armed) if armed == want => None,
            _ => Some(want),
        };
        if let Some(set) = arm {
            let fd = conn.fd();
            conn.armed = Some(set);
            if reg.modify(fd, set | EventSet::ONE_SHOT).is_err() {
                self.reset(key, reg);
            }
        }
    }

    /// Tears a connection down and tells the guest (`RST`).
    fn reset(&mut self, key: ConnKey, reg: &mut dyn FdRegistry) {
        if let Some(conn) = self.conns.get_mut(&key) {
            let rst = conn.header(op::RST, 0);
            self.control.push_back(rst);
        }
        self.remove(key, reg);
    }

    /// Forgets a connection and closes its host stream.
    fn remove(&mut self, key: ConnKey, reg: &mut dyn FdRegistry) {
        let Some(conn) = self.conns.remove(&key) else {
            return;
        };
        let fd = conn.fd();
        reg.remove(fd);
        self.by_fd.remove(&fd);
        self.host_ports.remove(&conn.local_port);
        self.rx_ready.retain(|k| *k != key);
    }

    /// A `RST` answering `hdr` when no connection exists for it.
    fn rst_reply(&self, hdr: &Header) -> Header {
        Header {
            src_cid: VSOCK_HOST_CID,
            dst_cid: self.guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            type_: TYPE_STREAM,
            op: op::RST,
            ..Header::default()
        }
    }

    /// Ends handshakes and closings that ran past their deadline.
    pub fn sweep(&mut self, reg: &mut dyn FdRegistry, now: Instant) {
        let stale: Vec<RawFd> = (self.pending.iter())
            .filter(|(_, c)| c.deadline <= now)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in stale {
            tracing::debug!("vsock: host client sent no CONNECT in time");
            self.drop_pending(fd, reg);
        }
        let expired: Vec<ConnKey> = (self.conns.iter())
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            self.reset(key, reg);
        }
    }

    /// The earliest deadline of any handshake or closing.
    pub fn next_deadline(&self) -> Option<Instant> {
        let pending = self.pending.values().map(|c| c.deadline);
        let conns = self.conns.values().filter_map(|c| c.deadline);
        pending.chain(conns).min()
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // The socket file is ours; leave no stale path behind.
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::vsock::packet::{SHUTDOWN_RCV, SHUTDOWN_SEND};
    use crate::devices::virtio::vsock::test_utils::{TempDir, TestRegistry};
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::path::Path;

    const CID: u64 = 3;

    struct Fixture {
        dir: TempDir,
        uds: PathBuf,
        mux: Muxer,
        reg: TestRegistry,
    }

    fn fixture() -> Fixture {
        let dir = TempDir::new();
        let uds = dir.path().join("v.sock");
        let listener = UnixListener::bind(&uds).expect("bind");
        listener.set_nonblocking(true).expect("nb");
        let mux = Muxer::new(CID, uds.clone(), listener);
        Fixture {
            dir,
            uds,
            mux,
            reg: TestRegistry::default(),
        }
    }

    fn guest(op: u16, src_port: u32, dst_port: u32) -> Header {
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

    fn read_exactly(s: &mut UnixStream, n: usize) -> Vec<u8> {
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut buf = vec![0u8; n];
        s.read_exact(&mut buf).expect("read");
        buf
    }

    /// The device closed `s` (EOF, or a reset when it left bytes unread).
    fn assert_eof(s: &mut UnixStream) {
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("expected a closed stream, got {other:?}"),
        }
    }

    impl Fixture {
        fn now(&self) -> Instant {
            Instant::now()
        }

        /// Every packet the muxer has for the guest right now.
        fn drain(&mut self) -> Vec<(Header, Vec<u8>)> {
            let mut out = Vec::new();
            let mut buf = Vec::new();
            let now = self.now();
            while let Some(h) = self.mux.next_rx(64 * 1024, &mut buf, &mut self.reg, now) {
                out.push((h, buf.clone()));
            }
            out
        }

        fn send(&mut self, hdr: Header, payload: &[u8]) {
            let now = self.now();
            let hdr = Header {
                len: u32::try_from(payload.len()).expect("len"),
                ..hdr
            };
            self.mux.on_guest_packet(&hdr, payload, &mut self.reg, now);
        }

        fn event(&mut self, fd: RawFd, set: EventSet) {
            self.reg.fire(fd);
            let now = self.now();
            self.mux.on_fd_event(fd, set, &mut self.reg, now);
        }

        /// A host client through `CONNECT port`; returns it, its fd in the muxer and the
        /// REQUEST the guest got.
        fn host_client(&mut self, port: u32) -> (UnixStream, RawFd, Header) {
            let mut client = UnixStream::connect(&self.uds).expect("connect");
            client
                .write_all(format!("CONNECT {port}\n").as_bytes())
                .expect("w");
            let before: HashSet<RawFd> = self.mux.pending.keys().copied().collect();
            let now = self.now();
            self.mux.accept(&mut self.reg, now);
            let fd = *self
                .mux
                .pending
                .keys()
                .find(|fd| !before.contains(fd))
                .expect("pending");
            assert_eq!(self.reg.armed(fd), Some(EventSet::IN | EventSet::ONE_SHOT));
            self.event(fd, EventSet::IN);
            let pkts = self.drain();
            assert_eq!(pkts.len(), 1, "{pkts:?}");
            let req = pkts[0].0;
            assert_eq!(req.op, op::REQUEST);
            (client, fd, req)
        }

        /// A host client whose guest side answered; returns it, its fd and (local, guest) ports.
        fn established(&mut self, port: u32) -> (UnixStream, RawFd, u32) {
            let (mut client, fd, req) = self.host_client(port);
            self.send(guest(op::RESPONSE, port, req.src_port), b"");
            let line = format!("OK {}\n", req.src_port);
            assert_eq!(read_exactly(&mut client, line.len()), line.as_bytes());
            (client, fd, req.src_port)
        }
    }

    #[test]
    fn host_connect_sends_request_and_answers_ok_on_response() {
        let mut f = fixture();
        let (_client, fd, req) = f.host_client(1024);
        assert_eq!(
            (req.src_cid, req.dst_cid, req.dst_port, req.type_),
            (VSOCK_HOST_CID, CID, 1024, TYPE_STREAM)
        );
        assert_eq!(req.src_port, HOST_PORT_BASE);
        assert_eq!(req.buf_alloc, CONN_BUF_SIZE);
        let (_c2, _fd2, req2) = f.host_client(1024);
        assert_ne!(req2.src_port, req.src_port, "local ports are unique");
        assert!(f.reg.fds.contains_key(&fd));
        f.established(80);
    }

    #[test]
    fn data_flows_both_ways_once_established() {
        let mut f = fixture();
        let (mut client, fd, local) = f.established(1024);
        // Guest to host.
        f.send(guest(op::RW, 1024, local), b"ping");
        assert_eq!(read_exactly(&mut client, 4), b"ping");
        // Host to guest: the fd is armed for input; the event queues the connection.
        assert!(f.reg.armed(fd).is_some_and(|s| s.contains(EventSet::IN)));
        client.write_all(b"pong").expect("w");
        f.event(fd, EventSet::IN);
        let pkts = f.drain();
        assert_eq!(pkts.len(), 1);
        let (h, data) = &pkts[0];
        assert_eq!((h.op, h.len, data.as_slice()), (op::RW, 4, &b"pong"[..]));
        assert_eq!((h.src_port, h.dst_port, h.dst_cid), (local, 1024, CID));
        assert_eq!(h.fwd_cnt, 4, "consumed guest bytes are announced");
    }

    #[test]
    fn guest_rst_to_request_closes_the_client() {
        let mut f = fixture();
        let (mut client, fd, req) = f.host_client(1024);
        f.send(guest(op::RST, 1024, req.src_port), b"");
        assert_eof(&mut client);
        assert!(!f.reg.fds.contains_key(&fd));
        assert_eq!(f.mux.connection_count(), 0);
        assert!(f.drain().is_empty(), "no RST answers an RST");
    }

    #[test]
    fn malformed_or_missing_connect_lines_close_the_client() {
        let mut f = fixture();
        for line in [&b"HELLO\n"[..], b"CONNECT x\n", &[b'C'; 40]] {
            let mut client = UnixStream::connect(&f.uds).expect("connect");
            client.write_all(line).expect("w");
            let now = f.now();
            f.mux.accept(&mut f.reg, now);
            let fd = *f.mux.pending.keys().next().expect("pending");
            f.event(fd, EventSet::IN);
            assert_eof(&mut client);
            assert!(f.reg.fds.is_empty(), "{line:?}");
            assert!(f.drain().is_empty());
        }
        // A silent client is dropped at the handshake deadline.
        let mut client = UnixStream::connect(&f.uds).expect("connect");
        let now = f.now();
        f.mux.accept(&mut f.reg, now);
        assert!(f.mux.next_deadline().is_some());
        f.mux.sweep(&mut f.reg, now + HANDSHAKE_TIMEOUT);
        assert_eof(&mut client);
        assert!(f.reg.fds.is_empty());
        assert_eq!(f.mux.next_deadline(), None);
    }

    #[test]
    fn guest_connects_to_the_port_listener() {
        let mut f = fixture();
        let listener = UnixListener::bind(f.dir.path().join("v.sock_52")).expect("bind");
        f.send(guest(op::REQUEST, 7000, 52), b"");
        let pkts = f.drain();
        assert_eq!(pkts.len(), 1);
        let resp = pkts[0].0;
        assert_eq!(
            (resp.op, resp.src_port, resp.dst_port),
            (op::RESPONSE, 52, 7000)
        );
        let (mut host, _) = listener.accept().expect("accept");
        f.send(guest(op::RW, 7000, 52), b"hi host");
        assert_eq!(read_exactly(&mut host, 7), b"hi host");
        host.write_all(b"hi guest").expect("w");
        let fd = *f.mux.by_fd.keys().next().expect("fd");
        f.event(fd, EventSet::IN);
        let pkts = f.drain();
        assert_eq!(pkts[0].1, b"hi guest");
    }

    #[test]
    fn refused_guest_connect_and_stray_packets_get_rst() {
        let mut f = fixture();
        f.send(guest(op::REQUEST, 7000, 53), b"");
        f.send(guest(op::RW, 7001, 54), b"data");
        f.send(guest(op::RST, 7002, 55), b"");
        let seqpacket = Header {
            type_: 2,
            ..guest(op::REQUEST, 7003, 56)
        };
        f.send(seqpacket, b"");
        let wrong_src = Header {
            src_cid: 9,
            ..guest(op::REQUEST, 7004, 57)
        };
        f.send(wrong_src, b"");
        let wrong_dst = Header {
            dst_cid: 5,
            ..guest(op::REQUEST, 7005, 58)
        };
        f.send(wrong_dst, b"");
        let pkts: Vec<_> = f.drain().into_iter().map(|(h, _)| h).collect();
        let got: Vec<_> = pkts
            .iter()
            .map(|h| (h.op, h.src_port, h.dst_port))
            .collect();
        assert_eq!(
            got,
            [
                (op::RST, 53, 7000),
                (op::RST, 54, 7001),
                (op::RST, 56, 7003)
            ]
        );
        assert!(pkts
            .iter()
            .all(|h| h.dst_cid == CID && h.src_cid == VSOCK_HOST_CID));
        assert_eq!(f.mux.connection_count(), 0);
    }

    #[test]
    fn host_reads_never_exceed_the_guest_credit() {
        let mut f = fixture();
        let (mut client, fd, req) = f.host_client(1024);
        let response = Header {
            buf_alloc: 100,
            ..guest(op::RESPONSE, 1024, req.src_port)
        };
        f.send(response, b"");
        let _ = read_exactly(&mut client, format!("OK {}\n", req.src_port).len());
        client.write_all(&[9u8; 1000]).expect("w");
        f.event(fd, EventSet::IN);
        let pkts = f.drain();
        assert_eq!(pkts.len(), 1);
        assert_eq!(pkts[0].0.len, 100);
        // Out of credit: the fd is no longer armed for input.
        assert!(f.reg.armed(fd).is_some_and(|s| !s.contains(EventSet::IN)));
        f.event(fd, EventSet::IN);
        assert!(f.drain().is_empty());
        // The guest consumed 60 bytes: 60 more may go.
        let update = Header {
            buf_alloc: 100,
            fwd_cnt: 60,
            ..guest(op::CREDIT_UPDATE, 1024, req.src_port)
        };
        f.send(update, b"");
        assert!(f.reg.armed(fd).is_some_and(|s| s.contains(EventSet::IN)));
        f.event(fd, EventSet::IN);
        let pkts = f.drain();
        let total: u32 = pkts.iter().map(|(h, _)| h.len).sum();
        assert_eq!(total, 60);
    }

    #[test]
    fn consumed_guest_data_triggers_credit_updates() {
        let mut f = fixture();
        let (mut client, _fd, local) = f.established(1024);
        let chunk = vec![1u8; 32 * 1024];
        f.send(guest(op::RW, 1024, local), &chunk);
        assert!(f.drain().is_empty(), "below the threshold");
        f.send(guest(op::RW, 1024, local), &chunk);
        let pkts = f.drain();
        assert_eq!(pkts.len(), 1);
        assert_eq!(
            (pkts[0].0.op, pkts[0].0.fwd_cnt),
            (op::CREDIT_UPDATE, 64 * 1024)
        );
        assert_eq!(read_exactly(&mut client, 64 * 1024).len(), 64 * 1024);
        f.send(guest(op::CREDIT_REQUEST, 1024, local), b"");
        let pkts = f.drain();
        assert_eq!(pkts[0].0.op, op::CREDIT_UPDATE);
        assert_eq!(pkts[0].0.buf_alloc, CONN_BUF_SIZE);
    }

    #[test]
    fn a_guest_overrunning_its_credit_is_reset() {
        let mut f = fixture();
        let (_client, fd, local) = f.established(1024);
        let chunk = vec![1u8; 64 * 1024];
        // Nobody reads the client: the socket fills, then the advertised buffer.
        for _ in 0..64 {
            f.send(guest(op::RW, 1024, local), &chunk);
            if f.mux.conns.is_empty() {
                break;
            }
        }
        assert!(f.mux.conns.is_empty());
        assert!(!f.reg.fds.contains_key(&fd));
        let pkts = f.drain();
        assert_eq!(pkts.last().map(|(h, _)| h.op), Some(op::RST));
    }

    #[test]
    fn host_eof_sends_shutdown_then_guest_rst_cleans_up() {
        let mut f = fixture();
        let (client, fd, local) = f.established(1024);
        drop(client);
        f.event(fd, EventSet::IN | EventSet::HANG_UP);
        let pkts = f.drain();
        assert_eq!(pkts.len(), 1);
        assert_eq!(
            (pkts[0].0.op, pkts[0].0.flags),
            (op::SHUTDOWN, SHUTDOWN_BOTH)
        );
        assert!(f.mux.next_deadline().is_some());
        f.send(guest(op::RST, 1024, local), b"");
        assert!(f.reg.fds.is_empty());
        assert_eq!(f.mux.connection_count(), 0);
        assert_eq!(f.mux.next_deadline(), None);
    }

    #[test]
    fn bytes_before_a_host_hang_up_still_reach_the_guest() {
        let mut f = fixture();
        let (mut client, fd, _local) = f.established(1024);
        client.write_all(b"last words").expect("w");
        drop(client);
        f.event(fd, EventSet::IN | EventSet::HANG_UP);
        // A second wake-up (e.g. OUT armed) before rx ran must not lose the queued bytes.
        f.event(fd, EventSet::HANG_UP);
        let pkts = f.drain();
        assert_eq!(pkts.len(), 1);
        assert_eq!(
            (pkts[0].0.op, pkts[0].1.as_slice()),
            (op::RW, &b"last words"[..])
        );
        // Re-armed for input, the EOF comes next.
        assert!(f.reg.armed(fd).is_some_and(|s| s.contains(EventSet::IN)));
        f.event(fd, EventSet::IN | EventSet::HANG_UP);
        let pkts = f.drain();
        assert_eq!(pkts.len(), 1);
        assert_eq!(pkts[0].0.op, op::SHUTDOWN);
    }

    #[test]
    fn a_guest_that_never_answers_shutdown_is_reset_at_the_deadline() {
        let mut f = fixture();
        let (client, fd, _local) = f.established(1024);
        drop(client);
        f.event(fd, EventSet::IN);
        assert_eq!(f.drain()[0].0.op, op::SHUTDOWN);
        let later = f.now() + SHUTDOWN_TIMEOUT;
        f.mux.sweep(&mut f.reg, later);
        assert_eq!(f.drain()[0].0.op, op::RST);
        assert!(f.reg.fds.is_empty());
        // A host-initiated handshake the guest never answers ends the same way.
        let (mut client, _fd, _req) = f.host_client(1024);
        let later = f.now() + HANDSHAKE_TIMEOUT;
        f.mux.sweep(&mut f.reg, later);
        assert_eq!(f.drain()[0].0.op, op::RST);
        assert_eof(&mut client);
    }

    #[test]
    fn guest_shutdown_half_closes_then_full_shutdown_resets() {
        let mut f = fixture();
        let (mut client, fd, local) = f.established(1024);
        let shut = Header {
            flags: SHUTDOWN_SEND,
            ..guest(op::SHUTDOWN, 1024, local)
        };
        f.send(shut, b"");
        assert_eof(&mut client);
        // The host can still talk to the guest.
        client.write_all(b"late").expect("w");
        f.event(fd, EventSet::IN);
        assert_eq!(f.drain()[0].1, b"late");
        let shut = Header {
            flags: SHUTDOWN_RCV,
            ..guest(op::SHUTDOWN, 1024, local)
        };
        f.send(shut, b"");
        let pkts = f.drain();
        assert_eq!(pkts.len(), 1);
        assert_eq!(
            pkts[0].0.op,
            op::RST,
            "both directions shut: the device resets"
        );
        assert!(f.reg.fds.is_empty());
        assert_eq!(f.mux.connection_count(), 0);
    }

    #[test]
    fn dropping_the_muxer_removes_the_socket_path() {
        let f = fixture();
        let uds: &Path = &f.uds.clone();
        assert!(uds.exists());
        drop(f.mux);
        assert!(!uds.exists());
    }
}
