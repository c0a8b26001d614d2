//! Test helpers: an in-memory disk.

use std::io;

use super::backend::{DiskBackend, ID_BYTES};

/// An in-memory disk for tests, with a switch to make every I/O fail.
#[derive(Debug, Default)]
pub struct MemDisk {
    /// The image.
    pub data: Vec<u8>,
    /// Number of flushes served.
    pub flushes: usize,
    /// Every operation fails while set.
    pub fail: bool,
}

impl MemDisk {
    fn check(&self, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let end = start.checked_add(len).filter(|&e| e <= self.data.len());
        match end {
            Some(end) if !self.fail => Ok(start..end),
            _ => Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

impl DiskBackend for MemDisk {
    fn size(&self) -> u64 {
        u64::try_from(self.data.len()).unwrap_or(0)
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let range = self.check(offset, buf.len())?;
        buf.copy_from_slice(&self.data[range]);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let range = self.check(offset, buf.len())?;
        self.data[range].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.check(0, 0)?;
        self.flushes += 1;
        Ok(())
    }
    fn id(&self) -> [u8; ID_BYTES] {
        *b"pangolin-test-disk\0\0"
    }
}
