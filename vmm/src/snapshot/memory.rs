//! Guest RAM to a sparse file and back. The file is laid out like the memfd `memory::create`
//! makes (each region at its memfd offset, the regions back to back), so its length is the RAM
//! size and a byte's file offset is its memfd offset. Only data is stored: ranges the memfd never
//! allocated and all-zero 4 KiB pages stay holes. Both directions walk the source's data extents
//! (`SEEK_DATA`/`SEEK_HOLE`) in 1 MiB chunks through one buffer and write only the nonzero pages,
//! so their cost follows what the guest touched, not its RAM size.

use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};
use vm_memory::bitmap::BS;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress, VolatileSlice};

use super::SnapshotError;
use crate::memory::{GuestMemoryMmap, MemoryError};

/// The unit of zero detection: a guest page.
pub const PAGE_SIZE: u64 = 4096;
/// Bytes copied per read.
const CHUNK: u64 = 1 << 20;

/// What a save or restore moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Guest RAM size: the memory file's length.
    pub total_bytes: u64,
    /// Bytes written: to the file on save, to guest RAM on restore.
    pub data_bytes_written: u64,
    /// Those bytes in 4 KiB pages.
    pub pages_written: u64,
}

/// Writes guest RAM into `out` as a sparse file laid out like its memfd; `out`'s previous
/// contents are discarded. The VM must be paused (nothing may write guest RAM meanwhile).
///
/// # Errors
/// [`SnapshotError::Layout`] when a region is not memfd-backed at the offset `memory::create`
/// gives it, [`SnapshotError::Extents`] when the memfd's extents cannot be found,
/// [`SnapshotError::Guest`] when reading RAM fails, [`SnapshotError::MemoryFile`] when writing
/// or sizing `out` fails.
pub fn save_memory(mem: &GuestMemoryMmap, out: &File) -> Result<MemoryStats, SnapshotError> {
    out.set_len(0).map_err(SnapshotError::MemoryFile)?;
    let mut stats = MemoryStats::default();
    let mut buf = vec![0u8; chunk_len(CHUNK)];
    for region in mem.iter() {
        let addr = region.start_addr().0;
        let base = stats.total_bytes;
        let end = base
            .checked_add(region.len())
            .ok_or(SnapshotError::Layout(addr))?;
        let file = match region.file_offset() {
            Some(fo) if fo.start() == base => fo.file(),
            _ => return Err(SnapshotError::Layout(addr)),
        };
        copy_extents(
            file,
            base..end,
            &mut buf,
            &mut stats,
            |buf, offset| {
                region.read_slice(buf, MemoryRegionAddress(offset - base))?;
                Ok(())
            },
            |run, offset| {
                out.write_all_at(run, offset)
                    .map_err(SnapshotError::MemoryFile)
            },
        )?;
        stats.total_bytes = end;
    }
    out.set_len(stats.total_bytes)
        .map_err(SnapshotError::MemoryFile)?;
    Ok(stats)
}

/// Creates `size_mib` MiB of guest RAM (`memory::create`) and fills it from a memory file
/// written by [`save_memory`], reading only the file's data extents, each straight into guest
/// RAM (`stats` counts the bytes read).
///
/// # Errors
/// [`SnapshotError::MemorySize`] when the file's length is not `size_mib` MiB,
/// [`SnapshotError::Memory`] when the RAM cannot be created (or `size_mib` MiB overflows),
/// [`SnapshotError::Extents`] or [`SnapshotError::MemoryFile`] when reading the file fails,
/// [`SnapshotError::Guest`] when writing RAM fails.
pub fn restore_memory(
    src: &File,
    size_mib: u64,
) -> Result<(GuestMemoryMmap, MemoryStats), SnapshotError> {
    let file = src.metadata().map_err(SnapshotError::MemoryFile)?.len();
    let expected = size_mib
        .checked_mul(1 << 20)
        .ok_or(SnapshotError::Memory(MemoryError::Layout(size_mib)))?;
    if file != expected {
        return Err(SnapshotError::MemorySize { file, expected });
    }
    let mem = crate::memory::create(size_mib)?;
    let mut stats = MemoryStats::default();
    for region in mem.iter() {
        let addr = region.start_addr().0;
        let base = stats.total_bytes;
        let end = base
            .checked_add(region.len())
            .ok_or(SnapshotError::Layout(addr))?;
        // Each data extent, by positioned reads (the descriptor's offset is never used: one
        // open template may serve several restores at once), straight into guest RAM, whose
        // pages are first populated in one call per chunk rather than a fault per page. The
        // save left zero pages out, so every extent is worth copying whole.
        let mut pos = base;
        while let Some((data, hole)) = next_extent(src, pos, end)? {
            let mut at = data;
            while at < hole {
                let len = chunk_len(hole - at);
                let slice = region.get_slice(MemoryRegionAddress(at - base), len)?;
                populate(&slice);
                read_exact_at_into(src, &slice, at).map_err(SnapshotError::MemoryFile)?;
                at += len as u64;
            }
            stats.data_bytes_written += hole - data;
            stats.pages_written += (hole - data).div_ceil(PAGE_SIZE);
            pos = hole;
        }
        stats.total_bytes = end;
    }
    Ok((mem, stats))
}

/// Copies the nonzero pages of `extents`' data extents within `range` (file offsets): each
/// chunk is read with `read(buf, offset)` and each run of nonzero pages in it written with
/// `write(run, offset)`, counted in `stats`.
fn copy_extents(
    extents: &File,
    range: Range<u64>,
    buf: &mut [u8],
    stats: &mut MemoryStats,
    mut read: impl FnMut(&mut [u8], u64) -> Result<(), SnapshotError>,
    mut write: impl FnMut(&[u8], u64) -> Result<(), SnapshotError>,
) -> Result<(), SnapshotError> {
    let mut pos = range.start;
    while let Some((data, hole)) = next_extent(extents, pos, range.end)? {
        let mut at = data;
        while at < hole {
            let len = chunk_len(hole - at).min(buf.len());
            let chunk = &mut buf[..len];
            read(chunk, at)?;
            for (skip, run) in nonzero_runs(chunk) {
                write(run, at + skip)?;
                let run_len = run.len() as u64;
                stats.data_bytes_written += run_len;
                stats.pages_written += run_len.div_ceil(PAGE_SIZE);
            }
            at += len as u64;
        }
        pos = hole;
    }
    Ok(())
}

/// Asks the kernel to allocate and map `slice`'s pages for writing (`MADV_POPULATE_WRITE`,
/// Linux 5.14): the read that follows then takes no page fault per page. Only a speed-up: where
/// the kernel refuses, the read faults the pages in as before.
fn populate(slice: &VolatileSlice<'_, BS<'_, ()>>) {
    let guard = slice.ptr_guard_mut();
    // SAFETY: the range is one mapping of guest RAM that `slice` borrows for the call, and
    // MADV_POPULATE_WRITE only faults its pages in (as a write to them would): it changes no
    // byte and no mapping.
    let _ = unsafe {
        libc::madvise(
            guard.as_ptr().cast(),
            slice.len(),
            libc::MADV_POPULATE_WRITE,
        )
    };
}

/// Fills `slice` from `file` at `offset` by positioned reads straight into the guest memory it
/// names (no bounce buffer).
fn read_exact_at_into(
    file: &File,
    slice: &VolatileSlice<'_, BS<'_, ()>>,
    offset: u64,
) -> std::io::Result<()> {
    let guard = slice.ptr_guard_mut();
    let mut done = 0usize;
    while done < slice.len() {
        let at = offset
            .checked_add(done as u64)
            .and_then(|at| libc::off_t::try_from(at).ok())
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: `guard` points at `slice.len()` bytes of guest RAM mapped for writing, which
        // `slice` borrows for the call; the kernel writes at most `slice.len() - done` bytes
        // from `done` on. No vCPU runs yet: nothing else writes guest RAM meanwhile.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                guard.as_ptr().add(done).cast(),
                slice.len() - done,
                at,
            )
        };
        match n {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n if n < 0 => {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
            n => done += n.unsigned_abs(),
        }
    }
    Ok(())
}

/// `n` as a buffer length, at most one chunk.
fn chunk_len(n: u64) -> usize {
    usize::try_from(n.min(CHUNK)).unwrap_or(usize::MAX)
}

/// The next data extent of `file` at or after `from` and before `end`, widened to whole pages
/// (and clipped to `[from, end)`), or `None` when the rest is a hole.
fn next_extent(file: &File, from: u64, end: u64) -> Result<Option<(u64, u64)>, SnapshotError> {
    if from >= end {
        return Ok(None);
    }
    let data = match seek(file, from, Whence::SeekData) {
        Ok(data) => data,
        // ENXIO: no data at or after `from`.
        Err(SnapshotError::Extents(Errno::ENXIO)) => return Ok(None),
        Err(e) => return Err(e),
    };
    if data >= end {
        return Ok(None);
    }
    let hole = seek(file, data, Whence::SeekHole)?;
    let data = (data - data % PAGE_SIZE).max(from);
    let hole = hole
        .checked_next_multiple_of(PAGE_SIZE)
        .unwrap_or(u64::MAX)
        .min(end);
    Ok(Some((data, hole)))
}

fn seek(file: &File, offset: u64, whence: Whence) -> Result<u64, SnapshotError> {
    let offset = i64::try_from(offset).map_err(|_| SnapshotError::Extents(Errno::EOVERFLOW))?;
    let found = lseek(file, offset, whence).map_err(SnapshotError::Extents)?;
    u64::try_from(found).map_err(|_| SnapshotError::Extents(Errno::EOVERFLOW))
}

/// The runs of consecutive pages of `buf` that are not all zero, each with its offset in `buf`
/// (a last partial page counts as a page).
fn nonzero_runs(buf: &[u8]) -> impl Iterator<Item = (u64, &[u8])> {
    let page = chunk_len(PAGE_SIZE);
    let mut pages = buf.chunks(page).enumerate().peekable();
    std::iter::from_fn(move || {
        // Skip zero pages, then take nonzero ones while they last.
        let (first, _) = pages.find(|(_, p)| !is_zero(p))?;
        let mut last = first;
        while let Some((i, _)) = pages.next_if(|(_, p)| !is_zero(p)) {
            last = i;
        }
        let start = first * page;
        let stop = ((last + 1) * page).min(buf.len());
        Some((start as u64, &buf[start..stop]))
    })
}

/// Whether every byte is zero (an OR over the whole page, which vectorises).
fn is_zero(page: &[u8]) -> bool {
    page.iter().fold(0u8, |acc, b| acc | b) == 0
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use vm_memory::GuestAddress;

    use super::*;

    const MIB: u64 = 1 << 20;

    /// A file in the temp directory, removed on drop.
    struct TempFile(PathBuf, File);

    impl TempFile {
        fn new(tag: &str) -> TempFile {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let path =
                std::env::temp_dir().join(format!("pg-snapmem-{tag}-{}-{n}", std::process::id()));
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .expect("temp file");
            TempFile(path, file)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn page(addr: u64, fill: u8) -> Vec<u8> {
        let mut p = vec![fill; 4096];
        p[..8].copy_from_slice(&addr.to_le_bytes());
        p
    }

    fn read_page(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let mut p = vec![0u8; 4096];
        mem.read_slice(&mut p, GuestAddress(addr)).expect("read");
        p
    }

    fn allocated(file: &File) -> u64 {
        file.metadata().expect("metadata").blocks() * 512
    }

    /// Pages touched in a 64 MiB guest: the first, the last, one in the middle, a run of three.
    const TOUCHED: [u64; 6] = [
        0,
        64 * MIB - 4096,
        17 * MIB + 3 * 4096,
        40 * MIB,
        40 * MIB + 4096,
        40 * MIB + 2 * 4096,
    ];

    fn touched_memory() -> GuestMemoryMmap {
        let mem = crate::memory::create(64).expect("memory");
        for (i, addr) in TOUCHED.into_iter().enumerate() {
            let fill = u8::try_from(i + 1).expect("small");
            mem.write_slice(&page(addr, fill), GuestAddress(addr))
                .expect("write");
        }
        mem
    }

    #[test]
    fn saved_file_is_sparse_and_restores_every_page() {
        let mem = touched_memory();
        // One byte on a page that is otherwise zero.
        mem.write_obj(0x5au8, GuestAddress(50 * MIB + 4095))
            .expect("write");
        let out = TempFile::new("save");
        let stats = save_memory(&mem, &out.1).expect("save");
        assert_eq!(stats.total_bytes, 64 * MIB);
        assert_eq!(stats.pages_written, 7);
        assert_eq!(stats.data_bytes_written, 7 * 4096);
        assert_eq!(out.1.metadata().expect("metadata").len(), 64 * MIB);
        let on_disk = allocated(&out.1);
        assert!(on_disk >= 4096, "{on_disk} bytes allocated");
        assert!(on_disk <= MIB, "{on_disk} bytes allocated for 7 pages");

        let (restored, rstats) = restore_memory(&out.1, 64).expect("restore");
        assert_eq!(rstats, stats);
        for (i, addr) in TOUCHED.into_iter().enumerate() {
            let fill = u8::try_from(i + 1).expect("small");
            assert_eq!(
                read_page(&restored, addr),
                page(addr, fill),
                "page {addr:#x}"
            );
        }
        let v: u8 = restored
            .read_obj(GuestAddress(50 * MIB + 4095))
            .expect("read");
        assert_eq!(v, 0x5a);
        for addr in [4096, 17 * MIB, 39 * MIB, 41 * MIB, 64 * MIB - 8192] {
            assert!(is_zero(&read_page(&restored, addr)), "page {addr:#x}");
        }
        // The restored memfd holds only what was copied.
        let region = restored.iter().next().expect("a region");
        let memfd = region.file_offset().expect("memfd").file();
        assert!(allocated(memfd) <= MIB);
    }

    #[test]
    fn both_regions_around_the_hole_are_saved_at_their_memfd_offsets() {
        use crate::arch::layout::{MMIO_HOLE_END, MMIO_HOLE_START};
        // 4 GiB of RAM, of which only a few pages are ever allocated (memfd and file both).
        let mem = crate::memory::create(4096).expect("memory");
        assert_eq!(mem.num_regions(), 2);
        let high_end = MMIO_HOLE_END + (4 << 30) - MMIO_HOLE_START;
        let pages = [MMIO_HOLE_START - 4096, MMIO_HOLE_END, high_end - 4096];
        for (i, addr) in pages.into_iter().enumerate() {
            let fill = u8::try_from(i + 1).expect("small");
            mem.write_slice(&page(addr, fill), GuestAddress(addr))
                .expect("write");
        }
        let out = TempFile::new("regions");
        let stats = save_memory(&mem, &out.1).expect("save");
        assert_eq!(stats.total_bytes, 4 << 30);
        assert_eq!(stats.pages_written, 3);
        assert!(allocated(&out.1) <= MIB);
        // The first page above the hole is at the memfd offset that follows the low region.
        let mut at_offset = vec![0u8; 4096];
        out.1
            .read_exact_at(&mut at_offset, MMIO_HOLE_START)
            .expect("read");
        assert_eq!(at_offset, page(MMIO_HOLE_END, 2));

        let (restored, rstats) = restore_memory(&out.1, 4096).expect("restore");
        assert_eq!(rstats, stats);
        for (i, addr) in pages.into_iter().enumerate() {
            let fill = u8::try_from(i + 1).expect("small");
            assert_eq!(
                read_page(&restored, addr),
                page(addr, fill),
                "page {addr:#x}"
            );
        }
        assert!(is_zero(&read_page(&restored, MMIO_HOLE_END + 4096)));
    }

    #[test]
    fn a_page_zeroed_again_is_not_stored() {
        let mem = touched_memory();
        let addr = 30 * MIB;
        mem.write_slice(&page(addr, 0xff), GuestAddress(addr))
            .expect("write");
        mem.write_slice(&[0u8; 4096], GuestAddress(addr))
            .expect("zero");
        // The memfd still holds the page, the snapshot does not.
        let memfd = mem
            .iter()
            .next()
            .expect("region")
            .file_offset()
            .expect("memfd");
        assert!(next_extent(memfd.file(), addr, addr + 4096)
            .expect("extents")
            .is_some());
        let out = TempFile::new("zeroed");
        let stats = save_memory(&mem, &out.1).expect("save");
        assert_eq!(stats.pages_written, 6);
        assert!(next_extent(&out.1, addr, addr + 4096)
            .expect("extents")
            .is_none());
    }

    #[test]
    fn untouched_memory_saves_to_an_empty_sparse_file() {
        let mem = crate::memory::create(64).expect("memory");
        let out = TempFile::new("empty");
        let stats = save_memory(&mem, &out.1).expect("save");
        assert_eq!(
            stats,
            MemoryStats {
                total_bytes: 64 * MIB,
                data_bytes_written: 0,
                pages_written: 0,
            }
        );
        assert_eq!(out.1.metadata().expect("metadata").len(), 64 * MIB);
        let (restored, rstats) = restore_memory(&out.1, 64).expect("restore");
        assert_eq!(rstats.data_bytes_written, 0);
        assert!(is_zero(&read_page(&restored, 0)));
    }

    #[test]
    fn saving_over_an_old_file_discards_its_contents() {
        let out = TempFile::new("reuse");
        out.1
            .write_all_at(&[0xee; 4096], 8 * MIB)
            .expect("old contents");
        let mem = crate::memory::create(64).expect("memory");
        save_memory(&mem, &out.1).expect("save");
        let (restored, _) = restore_memory(&out.1, 64).expect("restore");
        assert!(is_zero(&read_page(&restored, 8 * MIB)));
    }

    #[test]
    fn a_file_of_another_size_is_refused() {
        let mem = touched_memory();
        let out = TempFile::new("size");
        save_memory(&mem, &out.1).expect("save");
        let err = restore_memory(&out.1, 32).expect_err("32 MiB");
        assert!(matches!(
            err,
            SnapshotError::MemorySize {
                file,
                expected
            } if file == 64 * MIB && expected == 32 * MIB
        ));
        assert_eq!(
            err.to_string(),
            "memory file is 67108864 bytes, the VM's RAM is 33554432 bytes"
        );
        out.1.set_len(64 * MIB + 1).expect("grow");
        assert!(matches!(
            restore_memory(&out.1, 64),
            Err(SnapshotError::MemorySize { .. })
        ));
        assert!(matches!(
            restore_memory(&out.1, u64::MAX),
            Err(SnapshotError::Memory(MemoryError::Layout(u64::MAX)))
        ));
    }

    #[test]
    fn data_extents_hold_zero_pages_too() {
        // A file written densely (no holes) restores the same: its data extents are copied
        // whole (zero pages included; `save_memory` never writes them).
        let out = TempFile::new("dense");
        out.1
            .write_all_at(&vec![0u8; 2 * 1024 * 1024], 0)
            .expect("zeros");
        out.1
            .write_all_at(&page(MIB + 4096, 9), MIB + 4096)
            .expect("page");
        out.1.set_len(32 * MIB).expect("size");
        let (restored, stats) = restore_memory(&out.1, 32).expect("restore");
        assert_eq!(stats.pages_written, 512);
        assert_eq!(read_page(&restored, 0), vec![0u8; 4096]);
        assert_eq!(read_page(&restored, MIB + 4096), page(MIB + 4096, 9));
    }

    #[test]
    fn memory_not_laid_out_like_the_memfd_is_refused() {
        let anonymous: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("anonymous memory");
        let out = TempFile::new("layout");
        assert!(matches!(
            save_memory(&anonymous, &out.1),
            Err(SnapshotError::Layout(0))
        ));
    }

    #[test]
    fn nonzero_runs_group_consecutive_pages() {
        let mut buf = vec![0u8; 8 * 4096];
        for p in [1, 2, 5, 7] {
            buf[p * 4096 + 100] = 1;
        }
        let runs: Vec<(u64, usize)> = nonzero_runs(&buf).map(|(o, r)| (o, r.len())).collect();
        assert_eq!(runs, [(4096, 8192), (5 * 4096, 4096), (7 * 4096, 4096)]);
        assert_eq!(nonzero_runs(&[0u8; 4096]).count(), 0);
        let short = [0u8, 0, 3];
        let runs: Vec<(u64, usize)> = nonzero_runs(&short).map(|(o, r)| (o, r.len())).collect();
        assert_eq!(runs, [(0, 3)]);
    }
}
