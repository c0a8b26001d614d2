//! One virtio-blk request: validating its descriptor chain and carrying it out.
//!
//! A request is a 16-byte header (`type`, reserved, `sector`, little-endian) in device-readable
//! memory, then the data (device-readable for OUT, device-writable for IN and GET_ID), then one
//! device-writable status byte. Virtio 1.x lets the driver split these across descriptors any way
//! it likes, so the chain is treated as two byte streams: the readable part followed by the
//! writable part ([`chain::request`]: virtio-queue's `Reader` and `Writer`, the writable one
//! split before its last byte, the status). A chain we cannot safely answer (no status byte,
//! memory outside the guest, a readable buffer after a writable one, a loop) is returned with
//! length 0 and nothing written.

use std::io::{self, Read, Write};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::{DescriptorChain, Reader, Writer};

use super::backend::{DiskBackend, ID_BYTES};
use super::QUEUE_SIZE;
use crate::devices::virtio::chain::{self, ChainError};
use crate::memory::GuestMemoryMmap;

/// Bytes per sector; capacity and `sector` are in these units.
pub const SECTOR_SIZE: u64 = 512;
/// `struct virtio_blk_outhdr`: type, ioprio, sector.
const HEADER_LEN: usize = 16;

// virtio-bindings makes every `#define` a u32; the status is one byte on the wire.
const _: () = assert!(VIRTIO_BLK_S_OK < 0x100 && VIRTIO_BLK_S_IOERR < 0x100);
const _: () = assert!(VIRTIO_BLK_S_UNSUPP < 0x100);
/// Status values: their low byte (the assertions above say that is all of them).
const S_OK: u8 = VIRTIO_BLK_S_OK.to_le_bytes()[0];
const S_IOERR: u8 = VIRTIO_BLK_S_IOERR.to_le_bytes()[0];
const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP.to_le_bytes()[0];

/// A chain the device cannot answer at all: it is returned with length 0, nothing written.
#[derive(Debug, thiserror::Error)]
pub enum UnanswerableError {
    /// The chain is malformed: a loop, a buffer outside guest memory, a readable buffer after a
    /// writable one.
    #[error("malformed descriptor chain")]
    Chain(#[from] ChainError),
    /// No device-writable byte for the status.
    #[error("no status byte")]
    NoStatus,
    /// Writing the status byte failed.
    #[error("writing the status")]
    Status(#[source] io::Error),
}

/// Why a well-formed chain's request failed; reported to the driver in the status byte.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The readable part is shorter than the header.
    #[error("short header")]
    Header,
    /// Data in the wrong direction for the request type.
    #[error("data buffers in the wrong direction")]
    Direction,
    /// Data length not a multiple of the sector size.
    #[error("data length not sector-aligned")]
    Unaligned,
    /// The request reaches past the end of the disk.
    #[error("request beyond capacity")]
    Range,
    /// A write to a read-only disk.
    #[error("write to read-only disk")]
    ReadOnly,
    /// A request type we do not implement.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// The host I/O failed.
    #[error("disk I/O")]
    Io(#[source] io::Error),
    /// Guest memory access failed.
    #[error("guest memory")]
    Memory(#[source] io::Error),
}

/// The fixed facts about the disk a request is checked against.
#[derive(Debug, Clone, Copy)]
pub struct DiskInfo {
    /// Capacity in sectors.
    pub capacity: u64,
    /// OUT requests are refused.
    pub read_only: bool,
}

/// How a request was answered.
#[derive(Debug)]
pub struct Answer {
    /// Bytes written into the chain, data and status byte: the used length.
    pub used: u32,
    /// Why the request failed, if it did (the driver got IOERR or UNSUPP).
    pub failure: Option<RequestError>,
}

/// Validates and serves one request.
///
/// # Errors
/// [`UnanswerableError`] if the chain cannot be answered; nothing was written then.
pub fn handle<D: DiskBackend>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    disk: &mut D,
    info: DiskInfo,
    scratch: &mut [u8],
) -> Result<Answer, UnanswerableError> {
    let (mut request, mut data_in) = chain::request(mem, chain, usize::from(QUEUE_SIZE))?;
    // The status is the last writable byte; everything writable before it is data.
    let data_len = (data_in.available_bytes().checked_sub(1)).ok_or(UnanswerableError::NoStatus)?;
    let mut status = (data_in.split_at(data_len)).map_err(|_| UnanswerableError::NoStatus)?;
    let (code, written, failure) = match execute(&mut request, &mut data_in, disk, info, scratch) {
        Ok(written) => (S_OK, written, None),
        Err(e) if matches!(e, RequestError::Unsupported(_)) => (S_UNSUPP, 0, Some(e)),
        Err(e) => (S_IOERR, 0, Some(e)),
    };
    status
        .write_all(&[code])
        .map_err(UnanswerableError::Status)?;
    // `written` is at most the writable length less one, and a chain holds under 4 GiB.
    let used = u32::try_from(written + 1).unwrap_or(u32::MAX);
    Ok(Answer { used, failure })
}

/// Carries out the request read from `request`; returns the data bytes written into `data_in`.
fn execute<D: DiskBackend>(
    request: &mut Reader<'_>,
    data_in: &mut Writer<'_>,
    disk: &mut D,
    info: DiskInfo,
    scratch: &mut [u8],
) -> Result<usize, RequestError> {
    if request.available_bytes() < HEADER_LEN {
        return Err(RequestError::Header);
    }
    let mut header = [0u8; HEADER_LEN];
    request
        .read_exact(&mut header)
        .map_err(RequestError::Memory)?;
    let (kind, sector) = parse_header(&header);
    let out_len = request.available_bytes();
    let in_len = data_in.available_bytes();
    match kind {
        VIRTIO_BLK_T_IN => {
            if out_len != 0 {
                return Err(RequestError::Direction);
            }
            let mut offset = disk_offset(sector, in_len, info)?;
            in_chunks(in_len, scratch, |buf| {
                disk.read_at(buf, offset).map_err(RequestError::Io)?;
                offset += u64::try_from(buf.len()).map_err(|_| RequestError::Range)?;
                data_in.write_all(buf).map_err(RequestError::Memory)
            })?;
            Ok(in_len)
        }
        VIRTIO_BLK_T_OUT => {
            if in_len != 0 {
                return Err(RequestError::Direction);
            }
            if info.read_only {
                return Err(RequestError::ReadOnly);
            }
            let mut offset = disk_offset(sector, out_len, info)?;
            in_chunks(out_len, scratch, |buf| {
                request.read_exact(buf).map_err(RequestError::Memory)?;
                disk.write_at(buf, offset).map_err(RequestError::Io)?;
                offset += u64::try_from(buf.len()).map_err(|_| RequestError::Range)?;
                Ok(())
            })?;
            Ok(0)
        }
        VIRTIO_BLK_T_FLUSH => {
            if in_len != 0 || out_len != 0 {
                return Err(RequestError::Direction);
            }
            disk.flush().map_err(RequestError::Io)?;
            Ok(0)
        }
        VIRTIO_BLK_T_GET_ID => {
            if out_len != 0 {
                return Err(RequestError::Direction);
            }
            let id = disk.id();
            let n = in_len.min(ID_BYTES);
            let part = id.get(..n).ok_or(RequestError::Range)?;
            data_in.write_all(part).map_err(RequestError::Memory)?;
            Ok(n)
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

fn parse_header(header: &[u8; HEADER_LEN]) -> (u32, u64) {
    let [t0, t1, t2, t3, _, _, _, _, s @ ..] = *header;
    (u32::from_le_bytes([t0, t1, t2, t3]), u64::from_le_bytes(s))
}

/// The byte offset of `sector`, if `len` bytes from there are whole sectors within the disk.
fn disk_offset(sector: u64, len: usize, info: DiskInfo) -> Result<u64, RequestError> {
    let len = u64::try_from(len).map_err(|_| RequestError::Range)?;
    if len % SECTOR_SIZE != 0 {
        return Err(RequestError::Unaligned);
    }
    let end = sector.checked_add(len / SECTOR_SIZE);
    if end.is_none_or(|end| end > info.capacity) {
        return Err(RequestError::Range);
    }
    sector.checked_mul(SECTOR_SIZE).ok_or(RequestError::Range)
}

/// Hands `f` the first `len` bytes' worth of scratch-sized chunks, in order.
fn in_chunks(
    len: usize,
    scratch: &mut [u8],
    mut f: impl FnMut(&mut [u8]) -> Result<(), RequestError>,
) -> Result<(), RequestError> {
    let mut left = len;
    while left > 0 {
        let n = left.min(scratch.len());
        let buf = scratch.get_mut(..n).filter(|b| !b.is_empty());
        f(buf.ok_or(RequestError::Range)?)?;
        left -= n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::blk::test_utils::MemDisk;
    use crate::devices::virtio::test_utils::{NEXT, WRITE as W};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress};
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;
    const SECTORS: u64 = 8;

    fn fresh_disk() -> MemDisk {
        MemDisk {
            data: (0..SECTORS * 512)
                .map(|i| u8::try_from(i % 251).expect("byte"))
                .collect(),
            ..MemDisk::default()
        }
    }

    fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    /// One request through `handle`: the guest header at HDR, its buffers from `descs` (chained
    /// in order), guest memory at DATA pre-filled with 0xaa and the status byte with 0xff.
    struct Run {
        mem: GuestMemoryMmap,
        result: Result<Answer, UnanswerableError>,
    }

    impl Run {
        fn new(kind: u32, sector: u64, descs: &[RawDescriptor], disk: &mut MemDisk) -> Self {
            Self::with(kind, sector, descs, disk, false, 64 * 1024)
        }

        fn with(
            kind: u32,
            sector: u64,
            descs: &[RawDescriptor],
            disk: &mut MemDisk,
            read_only: bool,
            scratch: usize,
        ) -> Self {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).expect("mem");
            let mut header = [0u8; 16];
            header[..4].copy_from_slice(&kind.to_le_bytes());
            header[8..].copy_from_slice(&sector.to_le_bytes());
            mem.write_slice(&header, GuestAddress(HDR)).expect("header");
            mem.write_slice(&[0xaa; 0x2000], GuestAddress(DATA))
                .expect("data");
            mem.write_obj(0xffu8, GuestAddress(STATUS)).expect("status");
            let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
            let chained: Vec<RawDescriptor> = descs
                .iter()
                .enumerate()
                .map(|(i, raw)| {
                    let desc = Descriptor::from(*raw);
                    let last = i + 1 == descs.len();
                    let next = u16::try_from(i + 1).expect("index");
                    let flags = if last {
                        desc.flags()
                    } else {
                        desc.flags() | NEXT
                    };
                    let next = if last { desc.next() } else { next };
                    RawDescriptor::from(Descriptor::new(desc.addr().0, desc.len(), flags, next))
                })
                .collect();
            vq.add_desc_chains(&chained, 0).expect("chain");
            let mut queue: Queue = vq.create_queue().expect("queue");
            let chain = queue.pop_descriptor_chain(&mem).expect("chain");
            let info = DiskInfo {
                capacity: disk.size() / SECTOR_SIZE,
                read_only,
            };
            let result = handle(&mem, chain, disk, info, &mut vec![0; scratch]);
            Self { mem, result }
        }

        fn status(&self) -> u8 {
            self.mem.read_obj(GuestAddress(STATUS)).expect("status")
        }

        fn data(&self, len: usize) -> Vec<u8> {
            let mut buf = vec![0; len];
            self.mem
                .read_slice(&mut buf, GuestAddress(DATA))
                .expect("data");
            buf
        }

        /// The used length of a well-formed chain.
        fn used(&self) -> Option<u32> {
            self.result.as_ref().ok().map(|a| a.used)
        }

        /// A well-formed chain answered with `status` and used length `len`, its failure
        /// reported unless the status is OK.
        fn answered(&self, status: u8, len: u32) {
            assert_eq!(self.used(), Some(len), "{:?}", self.result);
            assert_eq!(self.status(), status);
            let failed = self.result.as_ref().is_ok_and(|a| a.failure.is_some());
            assert_eq!(failed, status != S_OK, "{:?}", self.result);
        }
    }

    fn header() -> RawDescriptor {
        d(HDR, 16, 0)
    }

    fn status() -> RawDescriptor {
        d(STATUS, 1, W)
    }

    #[test]
    fn in_reads_sectors_across_descriptors_and_chunks() {
        let mut disk = fresh_disk();
        let descs = [header(), d(DATA, 512, W), d(DATA + 512, 1024, W), status()];
        let run = Run::with(VIRTIO_BLK_T_IN, 1, &descs, &mut disk, false, 200);
        run.answered(S_OK, 1537);
        assert_eq!(run.data(1536), disk.data[512..2048]);
    }

    #[test]
    fn out_writes_sectors() {
        let mut disk = fresh_disk();
        let descs = [header(), d(DATA, 1024, 0), status()];
        let run = Run::new(VIRTIO_BLK_T_OUT, 6, &descs, &mut disk);
        run.answered(S_OK, 1);
        assert!(disk.data[3072..].iter().all(|&b| b == 0xaa));
        assert_eq!(disk.data[3071], u8::try_from(3071 % 251).expect("byte"));
    }

    #[test]
    fn any_framing_is_accepted() {
        // Header and data in one readable buffer; data and status in one writable buffer.
        let mut disk = fresh_disk();
        let run = Run::new(
            VIRTIO_BLK_T_OUT,
            0,
            &[d(HDR, 16 + 512, 0), status()],
            &mut disk,
        );
        run.answered(S_OK, 1);
        let mut disk = fresh_disk();
        let run = Run::new(VIRTIO_BLK_T_IN, 0, &[header(), d(DATA, 513, W)], &mut disk);
        assert_eq!(run.used(), Some(513));
        assert_eq!(run.data(513)[..512], disk.data[..512]);
        assert_eq!(run.data(513)[512], S_OK);
    }

    #[test]
    fn read_only_disk_refuses_out() {
        let mut disk = fresh_disk();
        let before = disk.data.clone();
        let descs = [header(), d(DATA, 512, 0), status()];
        let run = Run::with(VIRTIO_BLK_T_OUT, 0, &descs, &mut disk, true, 4096);
        run.answered(S_IOERR, 1);
        assert_eq!(disk.data, before);
    }

    #[test]
    fn flush_and_get_id() {
        let mut disk = fresh_disk();
        Run::new(VIRTIO_BLK_T_FLUSH, 0, &[header(), status()], &mut disk).answered(S_OK, 1);
        assert_eq!(disk.flushes, 1);
        let run = Run::new(
            VIRTIO_BLK_T_GET_ID,
            0,
            &[header(), d(DATA, 20, W), status()],
            &mut disk,
        );
        run.answered(S_OK, 21);
        assert_eq!(run.data(20), disk.id());
        let run = Run::new(
            VIRTIO_BLK_T_GET_ID,
            0,
            &[header(), d(DATA, 4, W), status()],
            &mut disk,
        );
        run.answered(S_OK, 5);
        assert_eq!(run.data(5), b"pang\xaa");
    }

    #[test]
    fn unknown_types_are_unsupported() {
        let mut disk = fresh_disk();
        Run::new(11, 0, &[header(), status()], &mut disk).answered(S_UNSUPP, 1);
        Run::new(
            u32::MAX,
            0,
            &[header(), d(DATA, 512, W), status()],
            &mut disk,
        )
        .answered(S_UNSUPP, 1);
    }

    #[test]
    fn bad_requests_get_ioerr_and_touch_nothing() {
        let cases: [(u32, u64, Vec<RawDescriptor>); 10] = [
            (
                VIRTIO_BLK_T_IN,
                0,
                vec![header(), d(DATA, 100, W), status()],
            ),
            (
                VIRTIO_BLK_T_IN,
                7,
                vec![header(), d(DATA, 1024, W), status()],
            ),
            (
                VIRTIO_BLK_T_IN,
                SECTORS,
                vec![header(), d(DATA, 512, W), status()],
            ),
            (
                VIRTIO_BLK_T_IN,
                u64::MAX,
                vec![header(), d(DATA, 512, W), status()],
            ),
            (
                VIRTIO_BLK_T_IN,
                0,
                vec![header(), d(DATA, 512, 0), d(DATA, 512, W), status()],
            ),
            (
                VIRTIO_BLK_T_OUT,
                0,
                vec![header(), d(DATA, 512, 0), d(DATA, 512, W), status()],
            ),
            (
                VIRTIO_BLK_T_OUT,
                u64::MAX / 512,
                vec![header(), d(DATA, 512, 0), status()],
            ),
            (
                VIRTIO_BLK_T_FLUSH,
                0,
                vec![header(), d(DATA, 512, W), status()],
            ),
            (
                VIRTIO_BLK_T_GET_ID,
                0,
                vec![header(), d(DATA, 512, 0), status()],
            ),
            (
                VIRTIO_BLK_T_IN,
                0,
                vec![d(HDR, 8, 0), d(DATA, 512, W), status()],
            ),
        ];
        for (kind, sector, descs) in cases {
            let mut disk = fresh_disk();
            let before = disk.data.clone();
            let run = Run::new(kind, sector, &descs, &mut disk);
            run.answered(S_IOERR, 1);
            assert_eq!(run.data(1024), vec![0xaa; 1024], "{kind} {sector}");
            assert_eq!(disk.data, before);
            assert_eq!(disk.flushes, 0);
        }
    }

    #[test]
    fn host_io_errors_are_reported() {
        let mut disk = MemDisk {
            fail: true,
            ..fresh_disk()
        };
        Run::new(
            VIRTIO_BLK_T_IN,
            0,
            &[header(), d(DATA, 512, W), status()],
            &mut disk,
        )
        .answered(S_IOERR, 1);
        Run::new(VIRTIO_BLK_T_FLUSH, 0, &[header(), status()], &mut disk).answered(S_IOERR, 1);
    }

    #[test]
    fn unanswerable_chains_write_nothing() {
        let cases: [(Vec<RawDescriptor>, &str); 5] = [
            (vec![header(), d(DATA, 512, 0)], "NoStatus"),
            (vec![header(), d(STATUS, 0, W)], "NoStatus"),
            (vec![header(), status(), d(DATA, 512, 0)], "Chain(Order)"),
            (
                vec![header(), d(0x3f_ff00, 0x200, W), status()],
                "Chain(OutOfBounds(",
            ),
            (
                vec![header(), d(u64::MAX - 8, 512, W), status()],
                "Chain(OutOfBounds(",
            ),
        ];
        for (descs, expected) in cases {
            let mut disk = fresh_disk();
            let run = Run::new(VIRTIO_BLK_T_IN, 0, &descs, &mut disk);
            let err = run.result.as_ref().expect_err("chain must be refused");
            let err = format!("{err:?}");
            assert!(err.starts_with(expected), "{err} is not {expected}");
            assert_eq!(run.status(), 0xff);
            assert_eq!(run.data(512), vec![0xaa; 512]);
        }
    }

    #[test]
    fn loops_are_refused() {
        let mut disk = fresh_disk();
        let mut descs = vec![header(), d(DATA, 512, W), status()];
        // The status descriptor points at itself: the walk runs out at the queue size.
        descs[2] = RawDescriptor::from(Descriptor::new(STATUS, 1, W | NEXT, 2));
        let run = Run::new(VIRTIO_BLK_T_IN, 0, &descs, &mut disk);
        assert!(matches!(
            run.result,
            Err(UnanswerableError::Chain(ChainError::Unterminated {
                descriptors: 256,
                next: 2
            }))
        ));
        assert_eq!(run.status(), 0xff);
        assert_eq!(run.data(512), vec![0xaa; 512]);
        // Back to the (readable) header: refused as soon as the walk comes back to it.
        descs[2] = RawDescriptor::from(Descriptor::new(STATUS, 1, W | NEXT, 0));
        let run = Run::new(VIRTIO_BLK_T_IN, 0, &descs, &mut disk);
        assert!(matches!(
            run.result,
            Err(UnanswerableError::Chain(ChainError::Order))
        ));
        assert_eq!(run.status(), 0xff);
    }
}
