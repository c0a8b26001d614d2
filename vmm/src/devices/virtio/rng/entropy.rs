//! Where virtio-rng's bytes come from.

use std::io;

/// A source of random bytes for the guest.
pub trait EntropySource: Send {
    /// Fills all of `buf`.
    ///
    /// # Errors
    /// The source failed; the request then completes with no bytes.
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<()>;
}

/// The host kernel's CSPRNG through `getrandom(2)` (no file descriptor to keep open).
#[derive(Debug, Default, Clone, Copy)]
pub struct OsEntropy;

impl EntropySource for OsEntropy {
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while let Some(rest) = buf.get_mut(done..).filter(|r| !r.is_empty()) {
            // SAFETY: `rest` is a live, writable buffer of exactly `rest.len()` bytes, and
            // getrandom writes at most that many.
            let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
            match usize::try_from(n) {
                Ok(n) => done += n,
                Err(_) => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_entropy_fills_the_whole_buffer() {
        let mut a = [0u8; 4096];
        let mut b = [0u8; 4096];
        OsEntropy.fill(&mut a).expect("getrandom");
        OsEntropy.fill(&mut b).expect("getrandom");
        assert_ne!(a, b);
        assert!(a.iter().filter(|&&x| x == 0).count() < 100);
        OsEntropy.fill(&mut []).expect("empty");
    }
}
