//! The host side of virtio-net: a Linux tap interface, behind the small [`TapBackend`] trait so
//! tests can use a socket pair instead.
//!
//! The tap is opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and a 12-byte vnet header
//! (`virtio_net_hdr_v1`, with `num_buffers`): every read or write is one Ethernet frame preceded by
//! exactly the header a virtio 1.x driver puts before it, so frames map 1:1 to virtio buffers.
//! No offloads are enabled, so the kernel never hands over frames larger than the MTU.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use virtio_bindings::virtio_net::virtio_net_hdr_v1;

/// Size of the vnet header on the tap and in every virtio-net buffer (`virtio_net_hdr_v1`: 12).
pub const VNET_HDR_LEN: usize = std::mem::size_of::<virtio_net_hdr_v1>();
/// `IFNAMSIZ`: interface names are at most 15 bytes plus NUL.
const IFNAMSIZ: usize = 16;
// The configuration accepts the names the kernel does.
const _: () = assert!(IFNAMSIZ - 1 == crate::config::MAX_TAP_NAME_LEN);

/// Frames in and out of the host network.
pub trait TapBackend: Send {
    /// Reads one frame (vnet header included) into `buf`; `WouldBlock` when none is pending.
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// Writes one frame (vnet header included).
    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize>;
    /// The descriptor the event loop polls for readability.
    fn raw_fd(&self) -> RawFd;
}

/// The tap could not be opened or configured.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is empty, too long or contains NUL.
    #[error("invalid tap interface name")]
    Name,
    /// Opening `/dev/net/tun` failed.
    #[error("opening /dev/net/tun")]
    Open(#[source] std::io::Error),
    /// A `TUN*` ioctl or `fcntl` failed.
    #[error("configuring the tap")]
    Ioctl(#[source] std::io::Error),
    /// An adopted descriptor is not a tap with `IFF_NO_PI | IFF_VNET_HDR`.
    #[error("descriptor is not a tap with IFF_NO_PI and IFF_VNET_HDR")]
    WrongKind,
}

/// `struct ifreq` as `TUNSETIFF`/`TUNGETIFF` use it: name, then flags in the union.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A tap interface; it disappears when dropped unless someone made it persistent.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// The flags every tap here needs.
fn tap_flags() -> libc::c_short {
    // The three flags fit in 16 bits (0x0002 | 0x1000 | 0x4000).
    let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    libc::c_short::try_from(flags).unwrap_or(libc::c_short::MAX)
}

impl Tap {
    /// Creates (or attaches to) the tap interface `name`.
    ///
    /// # Errors
    /// [`TapError`] when the name is invalid or the kernel refuses.
    pub fn open(name: &str) -> Result<Self, TapError> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= IFNAMSIZ || bytes.contains(&0) {
            return Err(TapError::Name);
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags: tap_flags(),
            _pad: [0; 22],
        };
        req.name[..bytes.len()].copy_from_slice(bytes);
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req` lays out (40 bytes).
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if rc < 0 {
            return Err(TapError::Ioctl(std::io::Error::last_os_error()));
        }
        let tap = Self {
            file,
            name: ifname(&req.name),
        };
        tap.configure()?;
        Ok(tap)
    }

    /// Adopts an already-open tap descriptor (opened by a more privileged process, say).
    ///
    /// # Errors
    /// [`TapError::WrongKind`] when `fd` is not a tap with `IFF_NO_PI | IFF_VNET_HDR`.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, TapError> {
        let file = File::from(fd);
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF writes a `struct ifreq` into `req`.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNGETIFF, &mut req) };
        if rc < 0 {
            return Err(TapError::WrongKind);
        }
        let want = tap_flags();
        if req.flags & want != want {
            return Err(TapError::WrongKind);
        }
        // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
        let rc = unsafe {
            let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            if fl < 0 {
                fl
            } else {
                libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK)
            }
        };
        if rc < 0 {
            return Err(TapError::Ioctl(std::io::Error::last_os_error()));
        }
        let tap = Self {
            file,
            name: ifname(&req.name),
        };
        tap.configure()?;
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// 12-byte vnet header, no offloads.
    fn configure(&self) -> Result<(), TapError> {
        let hdr_len = libc::c_int::try_from(VNET_HDR_LEN).unwrap_or(libc::c_int::MAX);
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
        if rc < 0 {
            return Err(TapError::Ioctl(std::io::Error::last_os_error()));
        }
        // SAFETY: TUNSETOFFLOAD takes its flags by value; 0 turns every offload off.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETOFFLOAD, 0u64) };
        if rc < 0 {
            return Err(TapError::Ioctl(std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

fn ifname(raw: &[u8; IFNAMSIZ]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

impl TapBackend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        self.file.write(frame)
    }

    fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_the_kernel_sees_them() {
        assert!(matches!(Tap::open(""), Err(TapError::Name)));
        assert!(matches!(Tap::open("sixteen-chars-xx"), Err(TapError::Name)));
        assert!(matches!(Tap::open("a\0b"), Err(TapError::Name)));
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }

    #[test]
    fn a_non_tap_descriptor_is_refused() {
        let file = File::open("/dev/null").expect("null");
        assert!(matches!(
            Tap::from_fd(OwnedFd::from(file)),
            Err(TapError::WrongKind)
        ));
    }
}
