//! Vsock packets over guest memory.
//!
//! A packet is a 44-byte little-endian header (`struct virtio_vsock_hdr`: src_cid, dst_cid,
//! src_port, dst_port, len, type, op, flags, buf_alloc, fwd_cnt) followed by `len` payload bytes.
//! The guest lays a packet over one descriptor chain: device-readable descriptors on the tx
//! queue, device-writable ones on the rx queue. Drivers put the header and payload in one
//! descriptor (Linux 6.2+) or in two; this parser accepts any split, header included, as long as
//! the whole chain has the right direction, lies in guest RAM and is long enough.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::{MAX_PKT_PAYLOAD, QUEUE_SIZE};
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

/// A descriptor chain does not hold a valid packet.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    /// The chain is shorter than the header (plus payload, on tx).
    #[error("descriptor chain too short")]
    TooShort,
    /// The chain has more descriptors than the queue.
    #[error("descriptor chain too long")]
    TooLong,
    /// A descriptor is writable on tx or read-only on rx.
    #[error("descriptor has the wrong direction")]
    WrongDirection,
    /// A descriptor points outside guest RAM.
    #[error("descriptor outside guest memory")]
    OutOfBounds,
    /// The header's `len` exceeds [`MAX_PKT_PAYLOAD`].
    #[error("payload length {0} exceeds the maximum")]
    PayloadTooLong(u32),
    /// Copying from or to guest memory failed.
    #[error("guest memory access")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// One validated descriptor: a range of guest RAM.
#[derive(Clone, Copy, Debug)]
struct Segment {
    addr: GuestAddress,
    len: usize,
}

/// Collects a chain's descriptors, all of the given direction and inside guest RAM.
fn collect(
    mem: &GuestMemoryMmap,
    descs: impl Iterator<Item = Descriptor>,
    writable: bool,
) -> Result<(Vec<Segment>, usize), PacketError> {
    let mut segs = Vec::new();
    let mut total = 0usize;
    for desc in descs {
        if segs.len() >= usize::from(QUEUE_SIZE) {
            return Err(PacketError::TooLong);
        }
        if desc.is_write_only() != writable {
            return Err(PacketError::WrongDirection);
        }
        let len = usize::try_from(desc.len()).map_err(|_| PacketError::OutOfBounds)?;
        if len > 0 && !mem.check_range(desc.addr(), len) {
            return Err(PacketError::OutOfBounds);
        }
        total = total.checked_add(len).ok_or(PacketError::OutOfBounds)?;
        segs.push(Segment {
            addr: desc.addr(),
            len,
        });
    }
    Ok((segs, total))
}

/// Copies `out.len()` bytes starting `offset` bytes into the chain.
fn gather(
    mem: &GuestMemoryMmap,
    segs: &[Segment],
    mut offset: usize,
    out: &mut [u8],
) -> Result<(), PacketError> {
    let mut done = 0;
    for seg in segs {
        if done == out.len() {
            break;
        }
        if offset >= seg.len {
            offset -= seg.len;
            continue;
        }
        let n = (seg.len - offset).min(out.len() - done);
        let addr = seg
            .addr
            .checked_add(u64::try_from(offset).map_err(|_| PacketError::OutOfBounds)?)
            .ok_or(PacketError::OutOfBounds)?;
        mem.read_slice(&mut out[done..done + n], addr)?;
        done += n;
        offset = 0;
    }
    if done == out.len() {
        Ok(())
    } else {
        Err(PacketError::TooShort)
    }
}

/// Writes `data` starting `offset` bytes into the chain.
fn scatter(
    mem: &GuestMemoryMmap,
    segs: &[Segment],
    mut offset: usize,
    data: &[u8],
) -> Result<(), PacketError> {
    let mut done = 0;
    for seg in segs {
        if done == data.len() {
            break;
        }
        if offset >= seg.len {
            offset -= seg.len;
            continue;
        }
        let n = (seg.len - offset).min(data.len() - done);
        let addr = seg
            .addr
            .checked_add(u64::try_from(offset).map_err(|_| PacketError::OutOfBounds)?)
            .ok_or(PacketError::OutOfBounds)?;
        mem.write_slice(&data[done..done + n], addr)?;
        done += n;
        offset = 0;
    }
    if done == data.len() {
        Ok(())
    } else {
        Err(PacketError::TooShort)
    }
}

/// Reads a guest packet from a tx chain: returns its header and copies an `OP_RW` payload into
/// `payload` (cleared for other ops, whose payload is ignored).
pub fn read_tx(
    mem: &GuestMemoryMmap,
    descs: impl Iterator<Item = Descriptor>,
    payload: &mut Vec<u8>,
) -> Result<Header, PacketError> {
    payload.clear();
    let (segs, total) = collect(mem, descs, false)?;
    if total < HDR_SIZE {
        return Err(PacketError::TooShort);
    }
    let mut raw = [0u8; HDR_SIZE];
    gather(mem, &segs, 0, &mut raw)?;
    let hdr = Header::from_bytes(&raw);
    if hdr.len > MAX_PKT_PAYLOAD {
        return Err(PacketError::PayloadTooLong(hdr.len));
    }
    if hdr.op == op::RW && hdr.len > 0 {
        let len = usize::try_from(hdr.len).map_err(|_| PacketError::PayloadTooLong(hdr.len))?;
        if total - HDR_SIZE < len {
            return Err(PacketError::TooShort);
        }
        payload.resize(len, 0);
        gather(mem, &segs, HDR_SIZE, payload)?;
    }
    Ok(hdr)
}

/// A validated rx chain, ready to receive one packet.
#[derive(Debug)]
pub struct RxBuffer {
    segs: Vec<Segment>,
    total: usize,
}

impl RxBuffer {
    /// Validates an rx chain: all writable, inside guest RAM, room for at least the header.
    pub fn parse(
        mem: &GuestMemoryMmap,
        descs: impl Iterator<Item = Descriptor>,
    ) -> Result<Self, PacketError> {
        let (segs, total) = collect(mem, descs, true)?;
        if total < HDR_SIZE {
            return Err(PacketError::TooShort);
        }
        Ok(Self { segs, total })
    }

    /// Most payload bytes this buffer takes.
    pub fn payload_capacity(&self) -> usize {
        let max = usize::try_from(MAX_PKT_PAYLOAD).unwrap_or(usize::MAX);
        (self.total - HDR_SIZE).min(max)
    }

    /// Writes `hdr` (its `len` set from `payload`) and `payload`; returns the used length.
    pub fn write(
        &self,
        mem: &GuestMemoryMmap,
        hdr: &Header,
        payload: &[u8],
    ) -> Result<u32, PacketError> {
        let len = u32::try_from(payload.len()).map_err(|_| PacketError::TooShort)?;
        if payload.len() > self.payload_capacity() {
            return Err(PacketError::TooShort);
        }
        let hdr = Header { len, ..*hdr };
        scatter(mem, &self.segs, 0, &hdr.to_bytes())?;
        scatter(mem, &self.segs, HDR_SIZE, payload)?;
        // `len` is at most MAX_PKT_PAYLOAD: no overflow.
        Ok(len + HDR_SIZE_U32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::vsock::test_utils::{F_NEXT, F_WRITE as W};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("mem")
    }

    fn desc(addr: u64, len: u32, flags: u16) -> Descriptor {
        Descriptor::new(addr, len, flags | F_NEXT, 0)
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
        let got = read_tx(&m, [desc(0x1000, 49, 0)].into_iter(), &mut payload).expect("one");
        assert_eq!((got, payload.as_slice()), (h, &b"hello"[..]));
        // Header split over two descriptors, payload in a third.
        m.write_slice(&h.to_bytes()[..10], GuestAddress(0x2000))
            .expect("w");
        m.write_slice(&h.to_bytes()[10..], GuestAddress(0x3000))
            .expect("w");
        m.write_slice(b"hello", GuestAddress(0x4000)).expect("w");
        let descs = [
            desc(0x2000, 10, 0),
            desc(0x3000, 34, 0),
            desc(0x4000, 64, 0),
        ];
        let got = read_tx(&m, descs.into_iter(), &mut payload).expect("split");
        assert_eq!((got, payload.as_slice()), (h, &b"hello"[..]));
    }

    #[test]
    fn tx_rejects_short_long_out_of_bounds_and_writable_chains() {
        let m = mem();
        let mut p = Vec::new();
        let short = read_tx(&m, [desc(0x1000, 43, 0)].into_iter(), &mut p);
        assert!(matches!(short, Err(PacketError::TooShort)), "{short:?}");
        let empty = read_tx(&m, std::iter::empty(), &mut p);
        assert!(matches!(empty, Err(PacketError::TooShort)));
        let wrong = read_tx(&m, [desc(0x1000, 64, W)].into_iter(), &mut p);
        assert!(matches!(wrong, Err(PacketError::WrongDirection)));
        let oob = read_tx(&m, [desc(0xff_fff0, 64, 0)].into_iter(), &mut p);
        assert!(matches!(oob, Err(PacketError::OutOfBounds)));
        let huge = read_tx(&m, [desc(0x1000, u32::MAX, 0)].into_iter(), &mut p);
        assert!(matches!(huge, Err(PacketError::OutOfBounds)));
        // len beyond the maximum payload.
        let h = Header {
            len: MAX_PKT_PAYLOAD + 1,
            ..sample()
        };
        m.write_slice(&h.to_bytes(), GuestAddress(0x1000))
            .expect("w");
        let big = read_tx(&m, [desc(0x1000, 0x2_0000, 0)].into_iter(), &mut p);
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
        let trunc = read_tx(
            &m,
            [desc(0x1000, 44, 0), desc(0x2000, 50, 0)].into_iter(),
            &mut p,
        );
        assert!(matches!(trunc, Err(PacketError::TooShort)));
        // Payload descriptor out of bounds.
        let oob = read_tx(
            &m,
            [desc(0x1000, 44, 0), desc(0x20_0000, 100, 0)].into_iter(),
            &mut p,
        );
        assert!(matches!(oob, Err(PacketError::OutOfBounds)));
        // Too many descriptors.
        let many = std::iter::repeat_n(desc(0x1000, 1, 0), 300);
        assert!(matches!(
            read_tx(&m, many, &mut p),
            Err(PacketError::TooLong)
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
        let got = read_tx(&m, [desc(0x1000, 44, 0)].into_iter(), &mut p).expect("req");
        assert_eq!(got.op, op::REQUEST);
        assert!(p.is_empty());
    }

    #[test]
    fn rx_buffer_writes_header_and_payload_across_descriptors() {
        let m = mem();
        let rx = RxBuffer::parse(&m, [desc(0x1000, 20, W), desc(0x2000, 100, W)].into_iter())
            .expect("rx");
        assert_eq!(rx.payload_capacity(), 76);
        let used = rx.write(&m, &sample(), b"abc").expect("write");
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
        assert!(rx.write(&m, &sample(), &[0u8; 77]).is_err());
    }

    #[test]
    fn rx_rejects_read_only_short_and_out_of_bounds_chains() {
        let m = mem();
        let ro = RxBuffer::parse(&m, [desc(0x1000, 100, 0)].into_iter());
        assert!(matches!(ro, Err(PacketError::WrongDirection)));
        let short = RxBuffer::parse(&m, [desc(0x1000, 40, W)].into_iter());
        assert!(matches!(short, Err(PacketError::TooShort)));
        let oob = RxBuffer::parse(
            &m,
            [desc(0x1000, 44, W), desc(0xff_ff00, 0x200, W)].into_iter(),
        );
        assert!(matches!(oob, Err(PacketError::OutOfBounds)));
    }
}
