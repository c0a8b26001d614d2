//! Vsock packets over guest memory.
//!
//! A packet is a 44-byte little-endian header (`struct virtio_vsock_hdr`: src_cid, dst_cid,
//! src_port, dst_port, len, type, op, flags, buf_alloc, fwd_cnt) followed by `len` payload bytes.
//! The guest lays a packet over one descriptor chain: device-readable descriptors on the tx
//! queue, device-writable ones on the rx queue. Drivers put the header and payload in one
//! descriptor (Linux 6.2+) or in two; this parser accepts any split, header included, as long as
//! the whole chain has the right direction, lies in guest RAM and is long enough (checked by
//! [`chain`](crate::devices::virtio::chain), read and written through virtio-queue's
//! `Reader`/`Writer`).

use std::io::{Read, Write};

use virtio_queue::{DescriptorChain, Writer};

use super::{MAX_PKT_PAYLOAD, QUEUE_SIZE};
use crate::devices::virtio::chain::{self, ChainError, Limits};
use crate::memory::GuestMemoryMmap;

/// Size of the packet header.
pub const HDR_SIZE: usize = 44;
/// [`HDR_SIZE`] as the used-ring length type.
const HDR_SIZE_U32: u32 = 44;
/// The only socket type offered: stream.
pub const TYPE_STREAM: u16 = 1;
/// `flags` of `OP_SHUTDOWN`: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `flags` of `OP_SHUTDOWN`: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both shutdown flags.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// Packet operations (`op`).
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection refused or torn down.
    pub const RST: u16 = 3;
    /// Half or full close, with `SHUTDOWN_*` flags.
    pub const SHUTDOWN: u16 = 4;
    /// Payload.
    pub const RW: u16 = 5;
    /// Unsolicited credit (buf_alloc/fwd_cnt) announcement.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Asks the peer for a `CREDIT_UPDATE`.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// A packet header, decoded (the wire form is little-endian and packed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Sender's context id.
    pub src_cid: u64,
    /// Receiver's context id.
    pub dst_cid: u64,
    /// Sender's port.
    pub src_port: u32,
    /// Receiver's port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type ([`TYPE_STREAM`]).
    pub type_: u16,
    /// Operation ([`op`]).
    pub op: u16,
    /// Operation flags (shutdown direction).
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, ever (wrapping).
    pub fwd_cnt: u32,
}

impl Header {
    /// Decodes the wire form.
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the wire form.
    pub fn to_bytes(self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Chains on either queue: at most a queue's worth of descriptors, room for the header.
const LIMITS: Limits = Limits {
    descriptors: QUEUE_SIZE as usize,
    min_bytes: HDR_SIZE,
    max_bytes: usize::MAX,
};

/// A descriptor chain does not hold a valid packet.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    /// The chain itself is malformed (direction, bounds, length, termination).
    #[error("malformed descriptor chain")]
    Chain(#[from] ChainError),
    /// The header's `len` exceeds [`MAX_PKT_PAYLOAD`].
    #[error("payload length {0} exceeds the maximum")]
    PayloadTooLong(u32),
    /// The payload does not fit the chain: shorter than the header's `len` on tx, smaller than
    /// the payload on rx.
    #[error("payload longer than the descriptor chain")]
    TooShort,
    /// Copying from or to guest memory failed.
    #[error("guest memory access")]
    Memory(#[source] std::io::Error),
}

/// Reads a guest packet from a tx chain: returns its header and copies an `OP_RW` payload into
/// `payload` (cleared for other ops, whose payload is ignored).
///
/// # Errors
/// [`PacketError`] when the chain is malformed or does not hold the packet its header announces.
pub fn read_tx(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    payload: &mut Vec<u8>,
) -> Result<Header, PacketError> {
    payload.clear();
    let mut reader = chain::reader(mem, chain, LIMITS)?;
    let mut raw = [0u8; HDR_SIZE];
    reader.read_exact(&mut raw).map_err(PacketError::Memory)?;
    let hdr = Header::from_bytes(&raw);
    if hdr.len > MAX_PKT_PAYLOAD {
        return Err(PacketError::PayloadTooLong(hdr.len));
    }
    if hdr.op == op::RW && hdr.len > 0 {
        let len = usize::try_from(hdr.len).map_err(|_| PacketError::PayloadTooLong(hdr.len))?;
        if reader.available_bytes() < len {
            return Err(PacketError::TooShort);
        }
        payload.resize(len, 0);
        reader.read_exact(payload).map_err(PacketError::Memory)?;
    }
    Ok(hdr)
}

/// A validated rx chain, ready to receive one packet.
pub struct RxBuffer<'a> {
    writer: Writer<'a>,
}

impl<'a> RxBuffer<'a> {
    /// Validates an rx chain: all writable, inside guest RAM, room for at least the header.
    ///
    /// # Errors
    /// [`PacketError::Chain`] naming what is wrong with the chain.
    pub fn parse(
        mem: &'a GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<Self, PacketError> {
        let writer = chain::writer(mem, chain, LIMITS)?;
        Ok(Self { writer })
    }

    /// Most payload bytes this buffer takes.
    pub fn payload_capacity(&self) -> usize {
        let max = usize::try_from(MAX_PKT_PAYLOAD).unwrap_or(usize::MAX);
        // `parse` made sure the header fits.
        (self.writer.available_bytes().saturating_sub(HDR_SIZE)).min(max)
    }

    /// Writes `hdr` (its `len` set from `payload`) and `payload`; returns the used length.
    ///
    /// # Errors
    /// [`PacketError::TooShort`] when `payload` exceeds [`Self::payload_capacity`] (nothing is
    /// written then); [`PacketError::Memory`] when guest memory cannot be written.
    pub fn write(mut self, hdr: &Header, payload: &[u8]) -> Result<u32, PacketError> {
        if payload.len() > self.payload_capacity() {
            return Err(PacketError::TooShort);
        }
        let len = u32::try_from(payload.len()).map_err(|_| PacketError::TooShort)?;
        let hdr = Header { len, ..*hdr };
        self.writer
            .write_all(&hdr.to_bytes())
            .map_err(PacketError::Memory)?;
        self.writer
            .write_all(payload)
            .map_err(PacketError::Memory)?;
        // `len` is at most MAX_PKT_PAYLOAD: no overflow.
        Ok(len + HDR_SIZE_U32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{chain_at, linked, raw, INDIRECT, NEXT, WRITE as W};
    use virtio_queue::mock::{DescriptorTable, MockSplitQueue};
    use vm_memory::{Bytes, GuestAddress};

    /// Where the test queue lives, clear of the buffers.
    const QUEUE_AT: u64 = 0x8_0000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("mem")
    }

    /// The chain of `(addr, len, flags)` buffers, as the device pops it.
    fn chain<'a>(
        m: &'a GuestMemoryMmap,
        bufs: &[(u64, u32, u16)],
    ) -> DescriptorChain<&'a GuestMemoryMmap> {
        let q = MockSplitQueue::create(m, GuestAddress(QUEUE_AT), QUEUE_SIZE);
        chain_at(m, &q, &linked(0, bufs))
    }

    fn sample() -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1234,
            dst_port: 5678,
            len: 5,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn header_round_trips_through_the_wire_form() {
        let h = sample();
        let b = h.to_bytes();
        assert_eq!(&b[24..28], &5u32.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), h);
    }

    #[test]
    fn tx_header_and_payload_in_one_or_split_descriptors() {
        let m = mem();
        let h = sample();
        m.write_slice(&h.to_bytes(), GuestAddress(0x1000))
            .expect("w");
        m.write_slice(b"hello", GuestAddress(0x1000 + 44))
            .expect("w");
        let mut payload = Vec::new();
        let got = read_tx(&m, chain(&m, &[(0x1000, 49, 0)]), &mut payload).expect("one");
        assert_eq!((got, payload.as_slice()), (h, &b"hello"[..]));
        // Header split over two descriptors, payload in a third.
        m.write_slice(&h.to_bytes()[..10], GuestAddress(0x2000))
            .expect("w");
        m.write_slice(&h.to_bytes()[10..], GuestAddress(0x3000))
            .expect("w");
        m.write_slice(b"hello", GuestAddress(0x4000)).expect("w");
        let descs = [(0x2000, 10, 0), (0x3000, 34, 0), (0x4000, 64, 0)];
        let got = read_tx(&m, chain(&m, &descs), &mut payload).expect("split");
        assert_eq!((got, payload.as_slice()), (h, &b"hello"[..]));
    }

    #[test]
    fn tx_rejects_short_long_out_of_bounds_and_writable_chains() {
        let m = mem();
        let mut p = Vec::new();
        let mut tx = |bufs: &[(u64, u32, u16)]| read_tx(&m, chain(&m, bufs), &mut p);
        let short = tx(&[(0x1000, 43, 0)]);
        assert!(
            matches!(short, Err(PacketError::Chain(ChainError::TooShort(44)))),
            "{short:?}"
        );
        let empty = tx(&[(0x1000, 0, 0)]);
        assert!(matches!(
            empty,
            Err(PacketError::Chain(ChainError::TooShort(_)))
        ));
        let wrong = tx(&[(0x1000, 64, W)]);
        assert!(matches!(
            wrong,
            Err(PacketError::Chain(ChainError::Direction))
        ));
        let oob = tx(&[(0xff_fff0, 64, 0)]);
        assert!(matches!(
            oob,
            Err(PacketError::Chain(ChainError::OutOfBounds(_)))
        ));
        let huge = tx(&[(0x1000, u32::MAX, 0)]);
        assert!(matches!(
            huge,
            Err(PacketError::Chain(ChainError::OutOfBounds(_)))
        ));
        // Payload descriptor out of bounds.
        let oob = tx(&[(0x1000, 44, 0), (0x20_0000, 100, 0)]);
        assert!(matches!(
            oob,
            Err(PacketError::Chain(ChainError::OutOfBounds(_)))
        ));
        // len beyond the maximum payload.
        let h = Header {
            len: MAX_PKT_PAYLOAD + 1,
            ..sample()
        };
        m.write_slice(&h.to_bytes(), GuestAddress(0x1000))
            .expect("w");
        let big = read_tx(&m, chain(&m, &[(0x1000, 0x2_0000, 0)]), &mut p);
        assert!(
            matches!(big, Err(PacketError::PayloadTooLong(_))),
            "{big:?}"
        );
        // len larger than what the chain holds.
        let h = Header {
            len: 100,
            ..sample()
        };
        m.write_slice(&h.to_bytes(), GuestAddress(0x1000))
            .expect("w");
        let descs = [(0x1000, 44, 0), (0x2000, 50, 0)];
        let trunc = read_tx(&m, chain(&m, &descs), &mut p);
        assert!(matches!(trunc, Err(PacketError::TooShort)));
    }

    #[test]
    fn tx_rejects_loops_and_chains_longer_than_the_queue() {
        let m = mem();
        let mut p = Vec::new();
        let q = MockSplitQueue::create(&m, GuestAddress(QUEUE_AT), QUEUE_SIZE);
        let looped = [raw(0x1000, 44, NEXT, 1), raw(0x2000, 1, NEXT, 0)];
        let err = read_tx(&m, chain_at(&m, &q, &looped), &mut p);
        assert!(
            matches!(
                err,
                Err(PacketError::Chain(ChainError::Unterminated {
                    descriptors: 256,
                    ..
                }))
            ),
            "{err:?}"
        );
        // 300 descriptors through an indirect table.
        let table = DescriptorTable::new(&m, GuestAddress(0x5_0000), 300);
        for i in 0..300u16 {
            let flags = if i == 299 { 0 } else { NEXT };
            table.store(i, raw(0x1000, 1, flags, i + 1)).expect("store");
        }
        let head = [raw(0x5_0000, 300 * 16, INDIRECT, 0)];
        let err = read_tx(&m, chain_at(&m, &q, &head), &mut p);
        assert!(matches!(
            err,
            Err(PacketError::Chain(ChainError::TooLong(256)))
        ));
    }

    #[test]
    fn non_rw_payload_is_ignored() {
        let m = mem();
        let h = Header {
            op: op::REQUEST,
            len: 16,
            ..sample()
        };
        m.write_slice(&h.to_bytes(), GuestAddress(0x1000))
            .expect("w");
        let mut p = vec![1, 2, 3];
        let got = read_tx(&m, chain(&m, &[(0x1000, 44, 0)]), &mut p).expect("req");
        assert_eq!(got.op, op::REQUEST);
        assert!(p.is_empty());
    }

    #[test]
    fn rx_buffer_writes_header_and_payload_across_descriptors() {
        let m = mem();
        let bufs = [(0x1000, 20, W), (0x2000, 100, W)];
        let rx = RxBuffer::parse(&m, chain(&m, &bufs)).expect("rx");
        assert_eq!(rx.payload_capacity(), 76);
        let used = rx.write(&sample(), b"abc").expect("write");
        assert_eq!(used, 47);
        let mut raw = [0u8; HDR_SIZE];
        m.read_slice(&mut raw[..20], GuestAddress(0x1000))
            .expect("r");
        m.read_slice(&mut raw[20..], GuestAddress(0x2000))
            .expect("r");
        assert_eq!(Header::from_bytes(&raw), Header { len: 3, ..sample() });
        let mut data = [0u8; 3];
        m.read_slice(&mut data, GuestAddress(0x2000 + 24))
            .expect("r");
        assert_eq!(&data, b"abc");
        // Too much payload: refused, nothing written.
        m.write_slice(&[0xee; 20], GuestAddress(0x1000)).expect("w");
        let rx = RxBuffer::parse(&m, chain(&m, &bufs)).expect("rx");
        assert!(matches!(
            rx.write(&sample(), &[0u8; 77]),
            Err(PacketError::TooShort)
        ));
        let mut untouched = [0u8; 20];
        m.read_slice(&mut untouched, GuestAddress(0x1000))
            .expect("r");
        assert_eq!(untouched, [0xee; 20]);
    }

    #[test]
    fn rx_rejects_read_only_short_and_out_of_bounds_chains() {
        let m = mem();
        let ro = RxBuffer::parse(&m, chain(&m, &[(0x1000, 100, 0)]));
        assert!(matches!(ro, Err(PacketError::Chain(ChainError::Direction))));
        let short = RxBuffer::parse(&m, chain(&m, &[(0x1000, 40, W)]));
        assert!(matches!(
            short,
            Err(PacketError::Chain(ChainError::TooShort(44)))
        ));
        let oob = RxBuffer::parse(&m, chain(&m, &[(0x1000, 44, W), (0xff_ff00, 0x200, W)]));
        assert!(matches!(
            oob,
            Err(PacketError::Chain(ChainError::OutOfBounds(_)))
        ));
        // A read-only descriptor after writable ones: refused (a Writer alone would skip it).
        let mixed = RxBuffer::parse(&m, chain(&m, &[(0x1000, 44, W), (0x2000, 64, 0)]));
        assert!(matches!(
            mixed,
            Err(PacketError::Chain(ChainError::Direction))
        ));
    }
}
