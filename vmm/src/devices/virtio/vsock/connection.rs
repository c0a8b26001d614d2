//! One vsock stream connection: its state machine, credit and host-side buffering.
//!
//! Credit (virtio 1.2 section 5.10.6.3): each side advertises `buf_alloc`, the size of its
//! receive buffer, and `fwd_cnt`, the running count of bytes it has consumed from it. A sender
//! tracks how much it sent (`rx_cnt` here, for bytes to the guest) and may have at most
//! `buf_alloc - (sent - fwd_cnt)` bytes in flight. Towards the guest the device reads the host
//! stream only up to that credit. From the guest, bytes are written straight to the host stream;
//! what the stream does not take waits in `tx_buf`, never more than the advertised buffer (a
//! guest that overruns its credit gets its connection reset). Counters wrap as u32.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use event_manager::EventSet;

use super::packet::{op, Header, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::{CREDIT_UPDATE_THRESHOLD, VSOCK_HOST_CID};

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: `REQUEST` sent to the guest, waiting for its `RESPONSE` (or `RST`).
    Connecting,
    /// Connected; data flows subject to the guest's shutdown flags.
    Established,
    /// The host stream ended; `SHUTDOWN` sent to the guest, waiting for its `RST`.
    LocalClosed,
    /// The guest shut down both directions; draining buffered bytes to the host, then `RST`.
    PeerClosed,
}

/// What reading the host stream for the guest gave.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    /// This many bytes.
    Data(usize),
    /// The host closed its side.
    Eof,
    /// Nothing available now.
    WouldBlock,
    /// The stream failed.
    Failed,
}

/// The connection can no longer carry guest data to the host.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// Writing the host stream failed.
    #[error("host stream")]
    Io(#[from] io::Error),
    /// The host stream accepted no bytes.
    #[error("host stream closed")]
    Closed,
    /// The guest sent more than the credit it was given.
    #[error("guest overran its credit")]
    CreditOverrun,
}

/// One connection between a guest port and a host Unix stream.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    /// Life-cycle state.
    pub state: ConnState,
    /// The host-side port (source of packets to the guest).
    pub local_port: u32,
    /// The guest-side port.
    pub peer_port: u32,
    guest_cid: u64,
    /// When the connection is torn down if still in a transitional state.
    pub deadline: Option<Instant>,
    /// Whether the connection waits in the muxer's rx queue.
    pub rx_queued: bool,
    /// The event set the fd is armed with (one-shot), `None` when disarmed.
    pub armed: Option<EventSet>,
    buf_alloc: u32,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    peer_shutdown: u32,
    tx_buf: VecDeque<u8>,
    /// Leading `tx_buf` bytes that are the handshake answer, not guest data (no credit).
    uncounted: usize,
    write_shut: bool,
}

impl Connection {
    /// A connection over `stream` (nonblocking), advertising `buf_alloc` to the guest.
    pub fn new(
        stream: UnixStream,
        state: ConnState,
        local_port: u32,
        peer_port: u32,
        guest_cid: u64,
        buf_alloc: u32,
    ) -> Self {
        Self {
            stream,
            state,
            local_port,
            peer_port,
            guest_cid,
            deadline: None,
            rx_queued: false,
            armed: None,
            buf_alloc,
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            peer_shutdown: 0,
            tx_buf: VecDeque::new(),
            uncounted: 0,
            write_shut: false,
        }
    }

    /// The host stream's fd.
    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Takes the guest's credit from any of its packets on this connection.
    pub fn set_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    /// Bytes the guest can still take (0 if its counters are inconsistent).
    pub fn peer_free_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// A header for a packet to the guest, carrying the device's current credit.
    pub fn header(&mut self, op: u16, flags: u32) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        Header {
            src_cid: VSOCK_HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// Whether the guest should hear of consumed bytes before it runs out of credit.
    pub fn needs_credit_update(&self) -> bool {
        (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD
    }

    /// Records a `SHUTDOWN` from the guest; returns the flags accumulated so far.
    pub fn guest_shutdown(&mut self, flags: u32) -> u32 {
        self.peer_shutdown |= flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
        self.peer_shutdown
    }

    /// Whether the guest has said it sends no more.
    pub fn guest_send_shut(&self) -> bool {
        self.peer_shutdown & SHUTDOWN_SEND != 0
    }

    /// Whether the guest has said it receives no more.
    pub fn guest_rcv_shut(&self) -> bool {
        self.peer_shutdown & SHUTDOWN_RCV != 0
    }

    /// Whether buffered bytes still wait for the host stream.
    pub fn tx_pending(&self) -> bool {
        !self.tx_buf.is_empty()
    }

    /// Queues the handshake answer ahead of any guest data and tries to send it.
    pub fn send_ack(&mut self, line: &[u8]) -> Result<(), ConnError> {
        self.tx_buf.extend(line);
        self.uncounted += line.len();
        self.flush()
    }

    /// Sends guest payload to the host stream, buffering what it does not take now.
    pub fn send_to_host(&mut self, data: &[u8]) -> Result<(), ConnError> {
        let mut written = 0;
        if self.tx_buf.is_empty() {
            written = write_some(&mut self.stream, data)?;
            self.fwd_cnt += Wrapping(u32::try_from(written).unwrap_or(u32::MAX));
        }
        let rest = &data[written..];
        let buffered = self.tx_buf.len() - self.uncounted + rest.len();
        if u32::try_from(buffered).map_or(true, |b| b > self.buf_alloc) {
            return Err(ConnError::CreditOverrun);
        }
        self.tx_buf.extend(rest);
        self.finish_write_side()
    }

    /// Writes buffered bytes to the host stream until it would block.
    pub fn flush(&mut self) -> Result<(), ConnError> {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            let n = write_some(&mut self.stream, front)?;
            if n == 0 {
                break;
            }
            let uncounted = n.min(self.uncounted);
            self.uncounted -= uncounted;
            self.fwd_cnt += Wrapping(u32::try_from(n - uncounted).unwrap_or(u32::MAX));
            self.tx_buf.drain(..n);
        }
        self.finish_write_side()
    }

    /// Shuts the host stream's write side once the guest stopped sending and the buffer drained.
    fn finish_write_side(&mut self) -> Result<(), ConnError> {
        if self.tx_buf.is_empty() && self.guest_send_shut() && !self.write_shut {
            self.write_shut = true;
            // The peer may already be gone; that is not an error for a closing stream.
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        Ok(())
    }

    /// Reads host bytes for the guest into `buf` (the caller sizes it by credit and space).
    pub fn read_for_guest(&mut self, buf: &mut [u8]) -> ReadOutcome {
        match self.stream.read(buf) {
            Ok(0) => ReadOutcome::Eof,
            Ok(n) => {
                self.rx_cnt += Wrapping(u32::try_from(n).unwrap_or(u32::MAX));
                ReadOutcome::Data(n)
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                ReadOutcome::WouldBlock
            }
            Err(_) => ReadOutcome::Failed,
        }
    }

    /// Whether the device should read the host stream now.
    pub fn wants_read(&self) -> bool {
        self.state == ConnState::Established
            && !self.guest_rcv_shut()
            && !self.rx_queued
            && self.peer_free_credit() > 0
    }

    /// The epoll events the connection needs (empty: leave the fd disarmed).
    pub fn interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        if self.wants_read() {
            set |= EventSet::IN;
        }
        if self.tx_pending() {
            set |= EventSet::OUT;
        }
        set
    }

    /// The guest answered `CREDIT_REQUEST`-style bookkeeping: builds a credit update.
    pub fn credit_update(&mut self) -> Header {
        self.header(op::CREDIT_UPDATE, 0)
    }
}

/// One nonblocking write; `WouldBlock` is 0 bytes, a zero-byte write of data is `Closed`.
fn write_some(stream: &mut UnixStream, data: &[u8]) -> Result<usize, ConnError> {
    if data.is_empty() {
        return Ok(0);
    }
    loop {
        match stream.write(data) {
            Ok(0) => return Err(ConnError::Closed),
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ConnError::Io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(buf_alloc: u32) -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().expect("pair");
        a.set_nonblocking(true).expect("nb");
        b.set_nonblocking(true).expect("nb");
        (
            Connection::new(a, ConnState::Established, 1 << 30, 5000, 3, buf_alloc),
            b,
        )
    }

    fn guest_credit(buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            buf_alloc,
            fwd_cnt,
            ..Header::default()
        }
    }

    #[test]
    fn reads_are_bounded_by_guest_credit() {
        let (mut c, mut peer) = conn(4096);
        assert_eq!(c.peer_free_credit(), 0, "no credit before the guest speaks");
        assert!(c.interest().is_empty());
        c.set_peer_credit(&guest_credit(100, 0));
        assert!(c.interest().contains(EventSet::IN));
        peer.write_all(&[1u8; 300]).expect("w");
        let mut buf = vec![0u8; usize::try_from(c.peer_free_credit()).expect("fits")];
        assert_eq!(c.read_for_guest(&mut buf), ReadOutcome::Data(100));
        assert_eq!(c.peer_free_credit(), 0);
        assert!(!c.wants_read());
        c.set_peer_credit(&guest_credit(100, 60));
        assert_eq!(c.peer_free_credit(), 60);
        // A guest claiming to have consumed more than it got gets no credit.
        c.set_peer_credit(&guest_credit(100, 500));
        assert_eq!(c.peer_free_credit(), 0);
    }

    #[test]
    fn counters_wrap() {
        let (mut c, _peer) = conn(4096);
        c.rx_cnt = Wrapping(u32::MAX - 10);
        c.set_peer_credit(&guest_credit(100, u32::MAX - 20));
        assert_eq!(c.peer_free_credit(), 90);
        c.rx_cnt += Wrapping(30);
        c.set_peer_credit(&guest_credit(100, 5));
        assert_eq!(c.peer_free_credit(), 86);
    }

    #[test]
    fn guest_data_is_written_buffered_and_credited() {
        let (mut c, mut peer) = conn(CREDIT_UPDATE_THRESHOLD * 4);
        c.send_to_host(b"hello").expect("send");
        let mut got = [0u8; 5];
        peer.read_exact(&mut got).expect("r");
        assert_eq!(&got, b"hello");
        assert_eq!(c.header(op::RW, 0).fwd_cnt, 5);
        // Fill the socket until it buffers.
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0u64;
        while !c.tx_pending() {
            c.send_to_host(&chunk).expect("send");
            sent += chunk.len() as u64;
        }
        assert!(c.interest().contains(EventSet::OUT));
        assert!(c.needs_credit_update());
        let mut sink = vec![0u8; 1 << 20];
        let mut drained = 0u64;
        while c.tx_pending() || drained < sent {
            match peer.read(&mut sink) {
                Ok(n) => drained += n as u64,
                Err(_) => c.flush().expect("flush"),
            }
        }
        assert_eq!(drained, sent);
        assert_eq!(
            c.credit_update().fwd_cnt,
            u32::try_from(sent + 5).expect("fits")
        );
    }

    #[test]
    fn overrunning_the_advertised_buffer_is_an_error() {
        let (mut c, _peer) = conn(1024);
        let chunk = vec![7u8; 1024];
        let mut result = Ok(());
        for _ in 0..10_000 {
            result = c.send_to_host(&chunk);
            if result.is_err() {
                break;
            }
        }
        assert!(
            matches!(result, Err(ConnError::CreditOverrun)),
            "{result:?}"
        );
    }

    #[test]
    fn ack_is_not_counted_as_guest_data() {
        let (mut c, mut peer) = conn(4096);
        c.send_ack(b"OK 1073741824\n").expect("ack");
        c.send_to_host(b"x").expect("x");
        let mut got = [0u8; 15];
        peer.read_exact(&mut got).expect("r");
        assert_eq!(&got, b"OK 1073741824\nx");
        assert_eq!(c.header(op::RW, 0).fwd_cnt, 1);
    }

    #[test]
    fn guest_send_shutdown_half_closes_after_draining() {
        let (mut c, mut peer) = conn(4096);
        c.send_to_host(b"bye").expect("send");
        assert_eq!(c.guest_shutdown(SHUTDOWN_SEND | 0x80), SHUTDOWN_SEND);
        c.flush().expect("flush");
        let mut got = Vec::new();
        peer.set_nonblocking(false).expect("blocking");
        peer.read_to_end(&mut got).expect("eof");
        assert_eq!(got, b"bye");
        // The read side is still open: the host can answer.
        peer.write_all(b"reply").expect("w");
        c.set_peer_credit(&guest_credit(100, 0));
        let mut buf = [0u8; 16];
        assert_eq!(c.read_for_guest(&mut buf), ReadOutcome::Data(5));
        drop(peer);
        assert_eq!(c.read_for_guest(&mut buf), ReadOutcome::Eof);
    }
}
