//! The host → VMM descriptor handoff: the descriptors [`crate::InheritedFds`] names travel in one
//! `SCM_RIGHTS` message with a one-byte payload on the VMM's standard input (a Unix socket),
//! in the order their positions give. Both ends link this module, so neither writes the wire
//! format by hand.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Most descriptors one message carries (the kernel's `SCM_MAX_FD` is 253).
pub const MAX_FDS: usize = 64;

/// Sends `fds` in one message on the Unix socket `sock`.
///
/// # Errors
/// The kernel's error for `sendmsg`; [`std::io::ErrorKind::InvalidInput`] for more than
/// [`MAX_FDS`] descriptors.
pub fn send(sock: BorrowedFd<'_>, fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
    if fds.len() > MAX_FDS {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} descriptors, at most {MAX_FDS} per handoff", fds.len()),
        ));
    }
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let iov = [std::io::IoSlice::new(b"f")];
    sendmsg::<UnixAddr>(
        sock.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&raw)],
        MsgFlags::empty(),
        None,
    )?;
    Ok(())
}

/// Receives one message's descriptors on the Unix socket `sock`, each marked close-on-exec.
///
/// # Errors
/// The kernel's error for `recvmsg`, or a control message it could not decode.
pub fn receive(sock: BorrowedFd<'_>) -> std::io::Result<Vec<OwnedFd>> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let msg = recvmsg::<UnixAddr>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut out = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            // SAFETY: the kernel just installed these descriptors in this process for us.
            out.extend(fds.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    use super::*;

    #[test]
    fn descriptors_arrive_in_order_in_one_message_close_on_exec() {
        let (ours, theirs) = UnixStream::pair().expect("pair");
        let a = File::open("/dev/null").expect("null");
        let b = File::open("/dev/zero").expect("zero");
        send(ours.as_fd(), &[a.as_fd(), b.as_fd()]).expect("send");
        let got = receive(theirs.as_fd()).expect("receive");
        assert_eq!(got.len(), 2);
        let target = |fd: &OwnedFd| std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        assert_eq!(
            target(&got[0]).expect("link"),
            std::path::Path::new("/dev/null")
        );
        assert_eq!(
            target(&got[1]).expect("link"),
            std::path::Path::new("/dev/zero")
        );
        for fd in &got {
            // SAFETY: F_GETFD only reads the flags of a descriptor we own.
            let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
            assert_ne!(flags & libc::FD_CLOEXEC, 0);
        }
        let many: Vec<BorrowedFd<'_>> = (0..=MAX_FDS).map(|_| a.as_fd()).collect();
        let err = send(ours.as_fd(), &many).expect_err("too many");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    }
}
