//! The real tap backend of virtio-net: creating a tap by name, adopting an open descriptor, and
//! the interface going away with the descriptor. Needs root and `/dev/net/tun`.
#![allow(clippy::tests_outside_test_module)] // integration tests live at the top of their file

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use pangolin_vmm::devices::virtio::net::{Tap, TapBackend, TapError};

mod common;

/// Whether `test` can run: a tap needs `/dev/net/tun` and root (else the test fails, unless
/// the skip is expected: [`common::cannot_run`]).
fn available(test: &str) -> bool {
    if !Path::new("/dev/net/tun").exists() {
        return !common::cannot_run(test, "/dev/net/tun does not exist on this machine");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return !common::cannot_run(test, "creating a tap interface needs root");
    }
    true
}

fn exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

#[test]
fn tap_is_created_by_name_and_vanishes_on_drop() {
    if !available("tap_is_created_by_name_and_vanishes_on_drop") {
        return;
    }
    let name = format!("pgtest{}", std::process::id() % 100_000);
    let mut tap = Tap::open(&name).expect("open tap");
    assert_eq!(tap.name(), name);
    assert!(exists(&name));
    // Non-blocking: nothing to read.
    let mut buf = [0u8; 2048];
    let err = tap.read_frame(&mut buf).expect_err("empty");
    assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
    assert!(tap.raw_fd() >= 0);
    drop(tap);
    assert!(!exists(&name), "tap {name} outlived its descriptor");
}

fn open_raw(name: &str, flags: libc::c_int) -> OwnedFd {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .expect("tun");
    let mut req = IfReq {
        name: [0; 16],
        flags: libc::c_short::try_from(flags).expect("flags"),
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes the 40-byte ifreq in `req`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    assert!(rc >= 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    OwnedFd::from(file)
}

#[test]
fn an_open_tap_descriptor_is_adopted_if_it_has_a_vnet_header() {
    if !available("an_open_tap_descriptor_is_adopted_if_it_has_a_vnet_header") {
        return;
    }
    let name = format!("pgfd{}", std::process::id() % 100_000);
    let fd = open_raw(&name, libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR);
    let tap = Tap::from_fd(fd).expect("adopt");
    assert_eq!(tap.name(), name);
    drop(tap);
    assert!(!exists(&name));

    let name = format!("pgnh{}", std::process::id() % 100_000);
    let fd = open_raw(&name, libc::IFF_TAP | libc::IFF_NO_PI);
    assert!(matches!(Tap::from_fd(fd), Err(TapError::WrongKind)));
    assert!(!exists(&name));
}
