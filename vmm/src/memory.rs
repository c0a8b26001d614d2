//! Guest RAM: one memfd-backed, shared mapping per region, so vhost-user daemons can map it and a
//! snapshot can save it sparse and copy it back into a fresh memfd (`snapshot::memory`).

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap as Mmap};

/// The guest memory type every device and the boot code use.
pub type GuestMemoryMmap = Mmap<()>;

/// Guest RAM could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create or ftruncate failed.
    #[error("guest memory file")]
    Memfd(#[source] std::io::Error),
    /// Mapping the regions failed.
    #[error("mapping guest memory")]
    Map(#[from] vm_memory::mmap::FromRangesError),
    /// The requested layout does not fit the address space.
    #[error("guest memory of {0} MiB does not fit the layout")]
    Layout(u64),
}

/// Where RAM lives in the guest physical address space for `size` bytes (split around the
/// 32-bit MMIO hole).
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    use crate::arch::layout::{MMIO_HOLE_END, MMIO_HOLE_START};
    if size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START),
            (GuestAddress(MMIO_HOLE_END), size - MMIO_HOLE_START),
        ]
    }
}

/// Creates `size_mib` MiB of guest RAM in one memfd, mapped shared.
pub fn create(size_mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let size = size_mib
        .checked_mul(1 << 20)
        .ok_or(MemoryError::Layout(size_mib))?;
    let file = memfd(size)?;
    let mut offset = 0u64;
    let mut ranges = Vec::new();
    for (start, len) in ram_ranges(size) {
        let len_usize = usize::try_from(len).map_err(|_| MemoryError::Layout(size_mib))?;
        let file = file.try_clone().map_err(MemoryError::Memfd)?;
        ranges.push((start, len_usize, Some(FileOffset::new(file, offset))));
        offset += len;
    }
    Ok(GuestMemoryMmap::from_ranges_with_files(ranges)?)
}

fn memfd(size: u64) -> Result<File, MemoryError> {
    // SAFETY: the name is a valid NUL-terminated string; flags are valid.
    let fd = unsafe { libc::memfd_create(c"pangolin-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: memfd_create returned a fresh descriptor we now own.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size).map_err(MemoryError::Memfd)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn ram_is_memfd_backed_and_split_around_the_hole() {
        let mem = create(8).expect("memory");
        assert_eq!(mem.num_regions(), 1);
        for region in mem.iter() {
            assert!(region.file_offset().is_some());
        }
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .expect("write");
        let v: u32 = mem.read_obj(GuestAddress(0x1000)).expect("read");
        assert_eq!(v, 0xdead_beef);
        let ranges = ram_ranges(4 << 30);
        assert_eq!(ranges.len(), 2);
        assert_eq!(ranges[0].1 + ranges[1].1, 4 << 30);
    }
}
