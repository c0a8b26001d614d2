//! One virtio-blk request: validating its descriptor chain and carrying it out.
//!
//! A request is a 16-byte header (`type`, reserved, `sector`, little-endian) in device-readable
//! memory, then the data (device-readable for OUT, device-writable for IN and GET_ID), then one
//! device-writable status byte. Virtio 1.x lets the driver split these across descriptors any way
//! it likes, so the chain is treated as two byte streams: the readable part followed by the
//! writable part. A chain we cannot safely answer (no status byte, memory outside the guest, a
//! readable buffer after a writable one, a loop) is returned with length 0 and nothing written.

use std::io;

use tracing::{debug, warn};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::backend::DiskBackend;
use super::QUEUE_SIZE;
use crate::memory::GuestMemoryMmap;

/// Bytes per sector; capacity and `sector` are in these units.
pub const SECTOR_SIZE: u64 = 512;
const HEADER_LEN: u64 = 16;
const ID_LEN: u64 = 20;

/// Request types (virtio 1.2 section 5.2.6).
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

/// Status values.
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// A chain the device cannot answer at all.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The chain loops, exceeds the queue size or points past the table.
    #[error("descriptor chain not terminated")]
    Unterminated,
    /// A buffer lies outside guest memory.
    #[error("buffer outside guest memory")]
    OutOfBounds,
    /// A device-readable buffer follows a device-writable one.
    #[error("readable buffer after writable one")]
    Order,
    /// No device-writable byte for the status.
    #[error("no status byte")]
    NoStatus,
    /// Writing the status byte failed.
    #[error("writing the status")]
    Status(#[source] vm_memory::GuestMemoryError),
}

/// Why a well-formed chain's request failed; reported to the driver in the status byte.
#[derive(Debug, thiserror::Error)]
enum RequestError {
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
    Memory(#[source] vm_memory::GuestMemoryError),
}

/// The fixed facts about the disk a request is checked against.
#[derive(Debug, Clone, Copy)]
pub struct DiskInfo {
    /// Capacity in sectors.
    pub capacity: u64,
    /// OUT requests are refused.
    pub read_only: bool,
}

/// A sequence of guest buffers seen as one byte stream.
#[derive(Default)]
struct Area {
    segments: Vec<(GuestAddress, u64)>,
    len: u64,
}

impl Area {
    fn push(&mut self, addr: GuestAddress, len: u32) {
        self.segments.push((addr, u64::from(len)));
        self.len += u64::from(len);
    }

    /// Calls `f(addr, len)` for each guest piece of the stream's bytes `[start, start + len)`.
    fn for_each<E>(
        &self,
        start: u64,
        len: u64,
        mut f: impl FnMut(GuestAddress, u64) -> Result<(), E>,
    ) -> Result<(), E> {
        let end = start.saturating_add(len);
        let mut seg_start = 0u64;
        for &(addr, seg_len) in &self.segments {
            let from = start.max(seg_start);
            let to = end.min(seg_start + seg_len);
            if from < to {
                f(addr.unchecked_add(from - seg_start), to - from)?;
            }
            seg_start += seg_len;
        }
        Ok(())
    }

    /// The guest address of the stream's byte `offset`.
    fn addr_at(&self, offset: u64) -> Option<GuestAddress> {
        let mut found = None;
        let _ = self.for_each(offset, 1, |addr, _| {
            found = Some(addr);
            Err(())
        });
        found
    }

    fn read(&self, mem: &GuestMemoryMmap, start: u64, buf: &mut [u8]) -> Result<(), RequestError> {
        let mut done = 0usize;
        let len = u64::try_from(buf.len()).map_err(|_| RequestError::Header)?;
        self.for_each(start, len, |addr, n| {
            let n = usize::try_from(n).map_err(|_| RequestError::Header)?;
            let part = buf.get_mut(done..done + n).ok_or(RequestError::Header)?;
            mem.read_slice(part, addr).map_err(RequestError::Memory)?;
            done += n;
            Ok(())
        })
    }
}

/// The chain split into its readable and writable streams, all in guest memory.
struct Layout {
    readable: Area,
    writable: Area,
}

impl Layout {
    fn parse(
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<Self, ChainError> {
        let descs: Vec<Descriptor> = chain.take(usize::from(QUEUE_SIZE) + 1).collect();
        if descs.len() > usize::from(QUEUE_SIZE) || descs.last().is_some_and(Descriptor::has_next) {
            return Err(ChainError::Unterminated);
        }
        let mut layout = Layout {
            readable: Area::default(),
            writable: Area::default(),
        };
        for desc in &descs {
            let len = usize::try_from(desc.len()).map_err(|_| ChainError::OutOfBounds)?;
            if !GuestMemoryBackend::check_range(mem, desc.addr(), len) {
                return Err(ChainError::OutOfBounds);
            }
            if desc.is_write_only() {
                layout.writable.push(desc.addr(), desc.len());
            } else if layout.writable.len > 0 {
                return Err(ChainError::Order);
            } else {
                layout.readable.push(desc.addr(), desc.len());
            }
        }
        if layout.writable.len == 0 {
            return Err(ChainError::NoStatus);
        }
        Ok(layout)
    }
}

/// Validates and serves one request; returns the bytes written to the writable part (the used
/// length).
///
/// # Errors
/// [`ChainError`] if the chain cannot be answered; nothing was written then.
pub fn handle<D: DiskBackend>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    disk: &mut D,
    info: DiskInfo,
    scratch: &mut [u8],
) -> Result<u32, ChainError> {
    let layout = Layout::parse(mem, chain)?;
    // The status is the last writable byte; everything writable before it is data.
    let data_in = layout.writable.len - 1;
    let status_addr = layout
        .writable
        .addr_at(data_in)
        .ok_or(ChainError::NoStatus)?;
    let (status, written) = match execute(mem, &layout, disk, info, scratch) {
        Ok(written) => (S_OK, written),
        Err(e) => {
            match &e {
                RequestError::Io(_) => warn!(error = %e, "virtio-blk: request failed"),
                _ => debug!(error = %e, "virtio-blk: request refused"),
            }
            let status = match e {
                RequestError::Unsupported(_) => S_UNSUPP,
                _ => S_IOERR,
            };
            (status, 0)
        }
    };
    mem.write_obj(status, status_addr)
        .map_err(ChainError::Status)?;
    // `written` never exceeds the writable length (a u32 sum of descriptor lengths).
    Ok(u32::try_from(written + 1).unwrap_or(u32::MAX))
}

/// Carries out the request; returns data bytes written into the writable part.
fn execute<D: DiskBackend>(
    mem: &GuestMemoryMmap,
    layout: &Layout,
    disk: &mut D,
    info: DiskInfo,
    scratch: &mut [u8],
) -> Result<u64, RequestError> {
    let mut header = [0u8; 16];
    if layout.readable.len < HEADER_LEN {
        return Err(RequestError::Header);
    }
    layout.readable.read(mem, 0, &mut header)?;
    let (kind, sector) = parse_header(&header);
    let data_out = layout.readable.len - HEADER_LEN;
    let data_in = layout.writable.len - 1;
    match kind {
        T_IN => {
            if data_out != 0 {
                return Err(RequestError::Direction);
            }
            let mut offset = disk_offset(sector, data_in, info)?;
            layout.writable.for_each(0, data_in, |addr, len| {
                for_chunks(addr, len, scratch, |addr, buf| {
                    disk.read_at(buf, offset).map_err(RequestError::Io)?;
                    offset += u64::try_from(buf.len()).map_err(|_| RequestError::Range)?;
                    mem.write_slice(buf, addr).map_err(RequestError::Memory)
                })
            })?;
            Ok(data_in)
        }
        T_OUT => {
            if data_in != 0 {
                return Err(RequestError::Direction);
            }
            if info.read_only {
                return Err(RequestError::ReadOnly);
            }
            let mut offset = disk_offset(sector, data_out, info)?;
            layout
                .readable
                .for_each(HEADER_LEN, data_out, |addr, len| {
                    for_chunks(addr, len, scratch, |addr, buf| {
                        mem.read_slice(buf, addr).map_err(RequestError::Memory)?;
                        disk.write_at(buf, offset).map_err(RequestError::Io)?;
                        offset += u64::try_from(buf.len()).map_err(|_| RequestError::Range)?;
                        Ok(())
                    })
                })?;
            Ok(0)
        }
        T_FLUSH => {
            if data_in != 0 || data_out != 0 {
                return Err(RequestError::Direction);
            }
            disk.flush().map_err(RequestError::Io)?;
            Ok(0)
        }
        T_GET_ID => {
            if data_out != 0 {
                return Err(RequestError::Direction);
            }
            let id = disk.id();
            let n = data_in.min(ID_LEN);
            let mut done = 0usize;
            layout.writable.for_each(0, n, |addr, len| {
                let len = usize::try_from(len).map_err(|_| RequestError::Range)?;
                let part = id.get(done..done + len).ok_or(RequestError::Range)?;
                mem.write_slice(part, addr).map_err(RequestError::Memory)?;
                done += len;
                Ok(())
            })?;
            Ok(n)
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

fn parse_header(header: &[u8; 16]) -> (u32, u64) {
    let [t0, t1, t2, t3, _, _, _, _, s @ ..] = *header;
    (u32::from_le_bytes([t0, t1, t2, t3]), u64::from_le_bytes(s))
}

/// The byte offset of `sector`, if `len` bytes from there are whole sectors within the disk.
fn disk_offset(sector: u64, len: u64, info: DiskInfo) -> Result<u64, RequestError> {
    if len % SECTOR_SIZE != 0 {
        return Err(RequestError::Unaligned);
    }
    let end = sector.checked_add(len / SECTOR_SIZE);
    if end.is_none_or(|end| end > info.capacity) {
        return Err(RequestError::Range);
    }
    sector.checked_mul(SECTOR_SIZE).ok_or(RequestError::Range)
}

/// Splits the guest piece `[addr, addr + len)` into scratch-sized chunks for `f`.
fn for_chunks(
    addr: GuestAddress,
    len: u64,
    scratch: &mut [u8],
    mut f: impl FnMut(GuestAddress, &mut [u8]) -> Result<(), RequestError>,
) -> Result<(), RequestError> {
    let mut done = 0u64;
    while done < len {
        let n = usize::try_from(len - done).map_or(scratch.len(), |r| r.min(scratch.len()));
        let buf = scratch.get_mut(..n).filter(|b| !b.is_empty());
        let buf = buf.ok_or(RequestError::Range)?;
        f(addr.unchecked_add(done), buf)?;
        done += u64::try_from(n).map_err(|_| RequestError::Range)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::blk::backend::MemDisk;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};

    /// `VRING_DESC_F_WRITE`.
    const W: u16 = 2;
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
        result: Result<u32, ChainError>,
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
                    let flags = if last { desc.flags() } else { desc.flags() | 1 };
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

        /// A well-formed chain answered with `status` and used length `len`.
        fn answered(&self, status: u8, len: u32) {
            assert_eq!(self.result.as_ref().ok(), Some(&len), "{:?}", self.result);
            assert_eq!(self.status(), status);
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
        let run = Run::with(T_IN, 1, &descs, &mut disk, false, 200);
        run.answered(S_OK, 1537);
        assert_eq!(run.data(1536), disk.data[512..2048]);
    }

    #[test]
    fn out_writes_sectors() {
        let mut disk = fresh_disk();
        let descs = [header(), d(DATA, 1024, 0), status()];
        let run = Run::new(T_OUT, 6, &descs, &mut disk);
        run.answered(S_OK, 1);
        assert!(disk.data[3072..].iter().all(|&b| b == 0xaa));
        assert_eq!(disk.data[3071], u8::try_from(3071 % 251).expect("byte"));
    }

    #[test]
    fn any_framing_is_accepted() {
        // Header and data in one readable buffer; data and status in one writable buffer.
        let mut disk = fresh_disk();
        let run = Run::new(T_OUT, 0, &[d(HDR, 16 + 512, 0), status()], &mut disk);
        run.answered(S_OK, 1);
        let mut disk = fresh_disk();
        let run = Run::new(T_IN, 0, &[header(), d(DATA, 513, W)], &mut disk);
        assert_eq!(run.result.as_ref().ok(), Some(&513));
        assert_eq!(run.data(513)[..512], disk.data[..512]);
        assert_eq!(run.data(513)[512], S_OK);
    }

    #[test]
    fn read_only_disk_refuses_out() {
        let mut disk = fresh_disk();
        let before = disk.data.clone();
        let descs = [header(), d(DATA, 512, 0), status()];
        let run = Run::with(T_OUT, 0, &descs, &mut disk, true, 4096);
        run.answered(S_IOERR, 1);
        assert_eq!(disk.data, before);
    }

    #[test]
    fn flush_and_get_id() {
        let mut disk = fresh_disk();
        Run::new(T_FLUSH, 0, &[header(), status()], &mut disk).answered(S_OK, 1);
        assert_eq!(disk.flushes, 1);
        let run = Run::new(
            T_GET_ID,
            0,
            &[header(), d(DATA, 20, W), status()],
            &mut disk,
        );
        run.answered(S_OK, 21);
        assert_eq!(run.data(20), disk.id());
        let run = Run::new(T_GET_ID, 0, &[header(), d(DATA, 4, W), status()], &mut disk);
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
            (T_IN, 0, vec![header(), d(DATA, 100, W), status()]),
            (T_IN, 7, vec![header(), d(DATA, 1024, W), status()]),
            (T_IN, SECTORS, vec![header(), d(DATA, 512, W), status()]),
            (T_IN, u64::MAX, vec![header(), d(DATA, 512, W), status()]),
            (
                T_IN,
                0,
                vec![header(), d(DATA, 512, 0), d(DATA, 512, W), status()],
            ),
            (
                T_OUT,
                0,
                vec![header(), d(DATA, 512, 0), d(DATA, 512, W), status()],
            ),
            (
                T_OUT,
                u64::MAX / 512,
                vec![header(), d(DATA, 512, 0), status()],
            ),
            (T_FLUSH, 0, vec![header(), d(DATA, 512, W), status()]),
            (T_GET_ID, 0, vec![header(), d(DATA, 512, 0), status()]),
            (T_IN, 0, vec![d(HDR, 8, 0), d(DATA, 512, W), status()]),
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
        Run::new(T_IN, 0, &[header(), d(DATA, 512, W), status()], &mut disk).answered(S_IOERR, 1);
        Run::new(T_FLUSH, 0, &[header(), status()], &mut disk).answered(S_IOERR, 1);
    }

    #[test]
    fn unanswerable_chains_write_nothing() {
        let cases: [(Vec<RawDescriptor>, &str); 5] = [
            (vec![header(), d(DATA, 512, 0)], "NoStatus"),
            (vec![header(), d(STATUS, 0, W)], "NoStatus"),
            (vec![header(), status(), d(DATA, 512, 0)], "Order"),
            (
                vec![header(), d(0x3f_ff00, 0x200, W), status()],
                "OutOfBounds",
            ),
            (
                vec![header(), d(u64::MAX - 8, 512, W), status()],
                "OutOfBounds",
            ),
        ];
        for (descs, expected) in cases {
            let mut disk = fresh_disk();
            let run = Run::new(T_IN, 0, &descs, &mut disk);
            let err = run.result.as_ref().expect_err("chain must be refused");
            assert_eq!(format!("{err:?}"), expected);
            assert_eq!(run.status(), 0xff);
            assert_eq!(run.data(512), vec![0xaa; 512]);
        }
    }

    #[test]
    fn loops_are_refused() {
        let mut disk = fresh_disk();
        let mut descs = vec![header(), d(DATA, 512, W), status()];
        // The last descriptor points back at the first: the walk runs out at the queue size.
        descs[2] = RawDescriptor::from(Descriptor::new(STATUS, 1, W | 1, 0));
        let run = Run::new(T_IN, 0, &descs, &mut disk);
        assert!(matches!(run.result, Err(ChainError::Unterminated)));
        assert_eq!(run.status(), 0xff);
    }
}
