//! VM snapshots on disk: a state file and a guest-memory file, and the VM state they hold
//! ([`mod@vm`]: taking one, loading one).
//!
//! **State file** ([`mod@format`]): a fixed 28-byte header, then the payload; integers
//! little-endian.
//!
//! ```text
//! offset  size  field
//!      0     8  magic b"PANGSNAP"
//!      8     2  format major version (1)
//!     10     2  format minor version (0)
//!     12     8  payload length in bytes (at most MAX_PAYLOAD, 64 MiB)
//!     20     8  CRC-64/ECMA-182 of the payload
//!     28     -  payload: JSON of SnapshotFile { fingerprint, state }
//! ```
//!
//! A reader refuses, in this order: a wrong magic; another major version or a newer minor one
//! (an older minor is read, so a minor version may only add fields with serde defaults); a
//! payload longer than the bound (checked before anything is allocated); a file cut short; a
//! checksum mismatch; a payload that is not the JSON of a `SnapshotFile`; and a `Fingerprint`
//! that differs in any field (kernel, initramfs and VMM digests, vCPUs, memory size, command
//! line, host CPU model and kernel) from the one the restoring VM's configuration expects (the
//! host computes both; see `config::snapshot`). The fingerprint is compared before the
//! state is decoded, so a snapshot from another VMM build is refused for that, not for some state
//! field that build defined differently. The state (`T`) is defined by the vCPU, VM and device
//! code; this module only carries it. The CRC catches corruption, not tampering: state files are
//! trusted input (root-owned, read-only), like the kernel they were booted from.
//!
//! **Memory file** ([`mod@memory`]): guest RAM as a sparse file laid out like the memfd (region
//! after region at the memfd's own offsets, so its length is the guest's RAM size). Ranges the
//! memfd never allocated stay holes, found with `SEEK_DATA`/`SEEK_HOLE`; inside allocated ranges,
//! 4 KiB pages that are all zero are left out too. A restore creates a fresh memfd of the same
//! size and reads only the file's data extents into it, straight into guest RAM, so its cost follows
//! what the guest had touched, not its RAM size, and the restored RAM is again a plain shared
//! memfd that vhost-user daemons can map. (A MAP_PRIVATE mapping of the file would be faster, but
//! an out-of-process virtiofsd maps the memfd and would never see the guest's private copies.)

pub mod format;
pub mod memory;
pub mod vm;

pub use format::{
    peek_fingerprint, read_state, read_state_unchecked, write_state, FormatVersion, SnapshotFile,
    MAGIC, MAX_PAYLOAD, VERSION,
};
pub use memory::{restore_memory, save_memory, MemoryStats, PAGE_SIZE};

/// A snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The state file does not start with [`MAGIC`].
    #[error("not a snapshot state file (magic {found:02x?})")]
    BadMagic {
        /// The first eight bytes found.
        found: [u8; 8],
    },
    /// The state file's format version is another major or a newer minor than this VMM reads.
    #[error("snapshot format {found} is not readable by this VMM (format {supported})")]
    Version {
        /// The file's version.
        found: FormatVersion,
        /// The version this VMM writes and reads.
        supported: FormatVersion,
    },
    /// The payload is longer than [`MAX_PAYLOAD`].
    #[error("snapshot payload of {len} bytes exceeds the {max} byte bound")]
    Oversized {
        /// The payload's length.
        len: u64,
        /// The bound.
        max: u64,
    },
    /// The state file ends inside its header.
    #[error("snapshot state file ends inside its header")]
    TruncatedHeader,
    /// The state file ends before its payload does.
    #[error("snapshot payload truncated: {found} of {expected} bytes")]
    TruncatedPayload {
        /// The length the header gives.
        expected: u64,
        /// The bytes there were.
        found: u64,
    },
    /// The payload's CRC64 is not the header's.
    #[error("snapshot checksum mismatch: header {expected:#018x}, payload {found:#018x}")]
    Checksum {
        /// The checksum in the header.
        expected: u64,
        /// The checksum of the payload read.
        found: u64,
    },
    /// The payload is not the JSON of a snapshot of this kind.
    #[error("decoding the snapshot payload")]
    Decode(#[source] serde_json::Error),
    /// The state could not be turned into JSON.
    #[error("encoding the snapshot payload")]
    Encode(#[source] serde_json::Error),
    /// The snapshot was taken from something other than the VM restoring it.
    #[error("snapshot taken with another {field}")]
    Fingerprint {
        /// The first [`Fingerprint`](crate::config::Fingerprint) field that differs.
        field: &'static str,
    },
    /// Reading the state file failed.
    #[error("reading the snapshot state")]
    Read(#[source] std::io::Error),
    /// Writing the state file failed.
    #[error("writing the snapshot state")]
    Write(#[source] std::io::Error),
    /// The memory file's length is not the restoring VM's RAM size.
    #[error("memory file is {file} bytes, the VM's RAM is {expected} bytes")]
    MemorySize {
        /// The file's length.
        file: u64,
        /// The RAM size in bytes.
        expected: u64,
    },
    /// Guest RAM is not laid out as `memory::create` makes it: a region without a backing
    /// file, or not at the file offset that follows the region before it.
    #[error("guest RAM region at {0:#x} is not where its memfd layout puts it")]
    Layout(u64),
    /// Finding the data extents of a file (`lseek` `SEEK_DATA`/`SEEK_HOLE`) failed.
    #[error("finding data extents")]
    Extents(#[source] nix::Error),
    /// Reading or writing the memory file failed.
    #[error("memory file I/O")]
    MemoryFile(#[source] std::io::Error),
    /// Copying to or from guest RAM failed.
    #[error("guest RAM access")]
    Guest(#[from] vm_memory::GuestMemoryError),
    /// Fresh guest RAM for the restore could not be created.
    #[error("creating guest RAM")]
    Memory(#[from] crate::memory::MemoryError),
}
