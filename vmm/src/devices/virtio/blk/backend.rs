//! The disk behind virtio-blk: a trait so tests can use memory, and a raw image file.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

/// Length of the identification string `GET_ID` returns.
pub const ID_BYTES: usize = virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;

/// Positioned I/O on a fixed-size disk image.
pub trait DiskBackend: Send {
    /// Size of the image in bytes, fixed for the device's lifetime.
    fn size(&self) -> u64;
    /// Reads exactly `buf.len()` bytes at `offset`.
    ///
    /// # Errors
    /// The host read failed or hit the end of the image.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    ///
    /// # Errors
    /// The host write failed.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes completed writes durable.
    ///
    /// # Errors
    /// The host flush failed.
    fn flush(&mut self) -> io::Result<()>;
    /// The serial number reported to the guest (`GET_ID`), NUL-padded.
    fn id(&self) -> [u8; ID_BYTES] {
        [0; ID_BYTES]
    }
}

/// A raw image file, accessed with `pread`/`pwrite`/`fdatasync`.
#[derive(Debug)]
pub struct FileDisk {
    file: File,
    size: u64,
    id: [u8; ID_BYTES],
}

impl FileDisk {
    /// Opens `path`, writable unless `read_only`.
    ///
    /// # Errors
    /// Opening or `stat`ing the file failed.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        Self::from_file(file)
    }

    /// Serves an already-open image (a jailed VMM gets it from the host side).
    ///
    /// # Errors
    /// `stat`ing the file failed.
    pub fn from_file(file: File) -> io::Result<Self> {
        let meta = file.metadata()?;
        // The id only has to be stable for one image on one host: device and inode numbers.
        let text = format!("{:x}{:x}", meta.dev(), meta.ino());
        let mut id = [0u8; ID_BYTES];
        for (slot, byte) in id.iter_mut().zip(text.bytes()) {
            *slot = byte;
        }
        Ok(Self {
            file,
            size: meta.len(),
            id,
        })
    }
}

impl DiskBackend for FileDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn id(&self) -> [u8; ID_BYTES] {
        self.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_disk_reads_writes_and_flushes() {
        let path = std::env::temp_dir().join(format!("pangolin-blk-{}.img", std::process::id()));
        std::fs::write(&path, vec![7u8; 4096]).expect("create image");
        let mut disk = FileDisk::open(&path, false).expect("open");
        assert_eq!(disk.size(), 4096);
        assert!(disk.id().iter().any(|&b| b != 0));
        disk.write_at(b"hello", 512).expect("write");
        disk.flush().expect("flush");
        let mut buf = [0u8; 6];
        disk.read_at(&mut buf, 511).expect("read");
        assert_eq!(&buf, b"\x07hello");
        assert!(disk.read_at(&mut buf, 4094).is_err(), "past the end");
        let mut ro = FileDisk::open(&path, true).expect("open read-only");
        assert!(ro.write_at(b"x", 0).is_err());
        std::fs::remove_file(&path).expect("cleanup");
    }
}
