//! Host entropy for the guest's random number generator: added to the input pool, credited,
//! and the CRNG reseeded from it at once.
//!
//! Why: a VM restored from a template starts with the template's CRNG state, so without this
//! every clone would produce the same "random" numbers until the kernel reseeds on its own
//! (minutes later). `RNDADDENTROPY` mixes the host's bytes into the input pool and credits
//! them; `RNDRESEEDCRNG` then re-keys the base CRNG from that pool, and the per-CPU CRNGs follow
//! at their next use (Linux 5.18+ `random.c`). Both need CAP_SYS_ADMIN (the agent is PID 1).

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

/// Most host bytes taken per request (the kernel pool is 256 bits; more adds nothing).
pub const MAX_ENTROPY_BYTES: usize = 512;

// linux/random.h: _IOW('R', 0x03, int[2]) and _IO('R', 0x07).
nix::ioctl_write_ptr_bad!(
    rnd_add_entropy,
    nix::request_code_write!(b'R', 0x03, 2 * std::mem::size_of::<libc::c_int>()),
    libc::c_int
);
nix::ioctl_none!(rnd_reseed_crng, b'R', 0x07);

/// Adding the host's bytes failed.
#[derive(Debug, thiserror::Error)]
pub enum EntropyError {
    /// More bytes than [`MAX_ENTROPY_BYTES`].
    #[error("{0} entropy bytes, at most {MAX_ENTROPY_BYTES} are taken")]
    TooLong(usize),
    /// `/dev/urandom` could not be opened.
    #[error("opening /dev/urandom")]
    Open(#[source] std::io::Error),
    /// The kernel refused `RNDADDENTROPY`.
    #[error("RNDADDENTROPY")]
    Add(#[source] nix::Error),
    /// The kernel refused `RNDRESEEDCRNG`.
    #[error("RNDRESEEDCRNG")]
    Reseed(#[source] nix::Error),
}

/// `struct rand_pool_info` with its buffer inline: entropy_count (bits), buf_size (bytes), buf.
#[repr(C)]
struct PoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; MAX_ENTROPY_BYTES],
}

/// Adds `bytes` to the guest's entropy pool, credited in full, and reseeds the CRNG; nothing
/// for an empty slice.
///
/// # Errors
/// [`EntropyError`] naming the step that failed.
pub fn reseed(bytes: &[u8]) -> Result<(), EntropyError> {
    if bytes.is_empty() {
        return Ok(());
    }
    if bytes.len() > MAX_ENTROPY_BYTES {
        return Err(EntropyError::TooLong(bytes.len()));
    }
    let mut info = PoolInfo {
        entropy_count: 0,
        buf_size: 0,
        buf: [0; MAX_ENTROPY_BYTES],
    };
    info.buf[..bytes.len()].copy_from_slice(bytes);
    // Both fit: at most 512 bytes, 4096 bits.
    info.buf_size =
        libc::c_int::try_from(bytes.len()).map_err(|_| EntropyError::TooLong(bytes.len()))?;
    info.entropy_count = info.buf_size.saturating_mul(8);
    let urandom = OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(EntropyError::Open)?;
    let fd = urandom.as_raw_fd();
    // SAFETY: `info` is a live `rand_pool_info` whose `buf_size` bytes of `buf` are valid; the
    // kernel only reads it. The descriptor is open for the call.
    unsafe { rnd_add_entropy(fd, std::ptr::from_ref(&info).cast()) }.map_err(EntropyError::Add)?;
    // SAFETY: an argument-less ioctl on an open descriptor.
    unsafe { rnd_reseed_crng(fd) }.map_err(EntropyError::Reseed)?;
    // This copy of the host bytes is not kept (the request's own goes with the request).
    info.buf.fill(0);
    std::hint::black_box(&info);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_many_bytes_are_refused_and_none_is_nothing() {
        assert!(matches!(
            reseed(&[7; MAX_ENTROPY_BYTES + 1]),
            Err(EntropyError::TooLong(513))
        ));
        reseed(&[]).expect("nothing to add");
    }

    #[test]
    fn the_kernel_takes_the_bytes_and_reseeds() {
        // Needs CAP_SYS_ADMIN, which the agent has as the guest's PID 1 and the test has as
        // root (CI runs as root). Adding entropy to a pool never weakens it.
        if !caps::has_cap(
            None,
            caps::CapSet::Effective,
            caps::Capability::CAP_SYS_ADMIN,
        )
        .unwrap_or(false)
        {
            panic!("this test needs CAP_SYS_ADMIN (run the agent's tests as root)");
        }
        reseed(&[0x5a; 64]).expect("reseed");
    }
}
