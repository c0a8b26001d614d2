//! Creating the pod's tap: TUN/TAP devices have no netlink "add" (the kernel's tun driver
//! refuses `RTM_NEWLINK`), so this is the `/dev/net/tun` ioctl pair `ip tuntap add` makes.
//!
//! `TUNSETIFF` with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` creates the device in the network
//! namespace of the calling thread (the one `/dev/net/tun` is opened from), `IFF_TUN_EXCL`
//! makes that fail with `EBUSY` rather than attach to a device of the same name, and
//! `TUNSETPERSIST` keeps it after the descriptor closes. No owner or group is set: the VMM,
//! started later in the namespace as root, attaches with the same flags (QEMU's
//! `-netdev tap,ifname=..,vnet_hdr=on` or the built-in VMM's `Tap::open`).

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

/// Creates the persistent tap `name` in the calling thread's network namespace.
///
/// # Errors
/// `InvalidInput` for a name that is empty, too long or holds NUL; the kernel's error for the
/// open or either ioctl (`EBUSY` when a device of that name exists).
pub(crate) fn create_persistent(name: &str) -> std::io::Result<()> {
    let mut req = ifreq(name, tap_flags()?)?;
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    // SAFETY: TUNSETIFF reads and writes the `struct ifreq` `req` points to, which lives
    // across the call; the descriptor is an open /dev/net/tun.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &raw mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let persistent: libc::c_ulong = 1;
    // SAFETY: TUNSETPERSIST takes its argument by value on the descriptor TUNSETIFF just bound
    // to the new device.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, persistent) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A queue descriptor of the existing tap `name` in the calling thread's network namespace,
/// nonblocking, with the flags the VMM expects (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`): for a
/// jailed VMM, which cannot open `/dev/net/tun` itself.
///
/// # Errors
/// As [`create_persistent`] (`ENODEV`-like errors when no such tap exists).
pub(crate) fn open_queue(name: &str) -> std::io::Result<std::os::fd::OwnedFd> {
    let flags = attach_flags()?;
    let mut req = ifreq(name, flags)?;
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open("/dev/net/tun")?;
    // SAFETY: TUNSETIFF reads and writes the `struct ifreq` `req` points to, which lives
    // across the call; the descriptor is an open /dev/net/tun.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &raw mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(std::os::fd::OwnedFd::from(tun))
}

/// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`: attach to the tap, as the VMM would.
fn attach_flags() -> std::io::Result<libc::c_short> {
    let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    let bits = u16::try_from(flags).map_err(|_| std::io::Error::other("TUN flags over 16 bits"))?;
    Ok(libc::c_short::from_ne_bytes(bits.to_ne_bytes()))
}

/// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_TUN_EXCL` as the 16 bits of `ifr_flags`.
fn tap_flags() -> std::io::Result<libc::c_short> {
    let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_TUN_EXCL;
    let bits = u16::try_from(flags).map_err(|_| std::io::Error::other("TUN flags over 16 bits"))?;
    // ifr_flags is a C short; IFF_TUN_EXCL is its sign bit.
    Ok(libc::c_short::from_ne_bytes(bits.to_ne_bytes()))
}

fn ifreq(name: &str, flags: libc::c_short) -> std::io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain data (a name array and a union of plain data); all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= req.ifr_name.len() || bytes.contains(&0) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{name:?} is not an interface name (1-15 bytes, no NUL)"),
        ));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    req.ifr_ifru.ifru_flags = flags;
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_names_the_tap_with_the_vmms_flags_and_exclusive_creation() {
        let req = ifreq("tap0_pgn", tap_flags().expect("flags")).expect("ifreq");
        let name: Vec<u8> = req.ifr_name.iter().map(|c| c.to_ne_bytes()[0]).collect();
        assert_eq!(&name[..9], b"tap0_pgn\0");
        // SAFETY: the flags member was the one written.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        assert_eq!(
            u16::from_ne_bytes(flags.to_ne_bytes()),
            0x0002 | 0x1000 | 0x4000 | 0x8000
        );
    }

    #[test]
    fn bad_names_never_reach_the_kernel() {
        for bad in ["", "sixteen-chars-xx", "a\0b"] {
            let err = create_persistent(bad).expect_err(bad);
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{bad:?}");
        }
    }
}
