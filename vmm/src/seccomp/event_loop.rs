//! The main thread's allow-list, once setup is done: it runs the event loop until the VM
//! stops, then tears the VM down and exits.
//!
//! Setup (opening or adopting resources, the jail, guest memory, KVM, devices, vCPUs) happens
//! before this filter is installed, so nothing here creates a VM, a vCPU, an eventfd, a memory
//! region or a tap.

use seccompiler::BackendError;

use super::rules::{arg, common, Rules};
use super::VmContext;

/// The event-loop thread's rules.
///
/// # Errors
/// A condition seccompiler cannot express (a bug here).
pub fn rules(vm: &VmContext) -> Result<Rules, BackendError> {
    let mut r = Rules::default();
    // The event loop itself (event-manager over epoll): waiting, and devices adding or
    // removing descriptors (vsock connections, the virtio-fs call eventfds at activation).
    r.allow(libc::SYS_epoll_wait);
    r.allow(libc::SYS_epoll_pwait);
    r.allow(libc::SYS_epoll_ctl);
    // Queue eventfds, the signalfd, the tap, vsock streams, the control socket, the timer,
    // the console, log lines.
    r.allow(libc::SYS_read);
    r.allow(libc::SYS_write);
    r.allow(libc::SYS_readv);
    r.allow(libc::SYS_writev);
    // std's socket reads/writes may go through recv/send.
    r.allow(libc::SYS_recvfrom);
    r.allow(libc::SYS_sendto);
    // virtio-fs activation (the guest's DRIVER_OK, signalled by the vCPU that wrote it) sends
    // SET_FEATURES and the vring setup with their eventfds to virtiofsd and reads its replies:
    // only on the vhost-user sockets.
    let sockets: Vec<u64> = vm.vhost_user_sockets.iter().map(|&fd| arg(fd)).collect();
    if !sockets.is_empty() {
        r.allow_arg_in(libc::SYS_sendmsg, 0, &sockets)?;
        r.allow_arg_in(libc::SYS_recvmsg, 0, &sockets)?;
    }
    // Host connections on the vsock listener and the control socket.
    r.allow(libc::SYS_accept4);
    // Guest-initiated vsock connections reach `<uds>_<port>`: Unix sockets only.
    r.allow_arg_in(libc::SYS_socket, 0, &[arg(libc::AF_UNIX)])?;
    r.allow(libc::SYS_connect);
    r.allow(libc::SYS_shutdown);
    r.allow(libc::SYS_close);
    // set_nonblocking (FIONBIO) is the only ioctl: taps and KVM are configured during setup.
    r.allow_arg_in(libc::SYS_ioctl, 1, &[libc::FIONBIO])?;
    // Descriptor flags and duplication (try_clone).
    r.allow_arg_in(
        libc::SYS_fcntl,
        1,
        &[
            arg(libc::F_GETFL),
            arg(libc::F_SETFL),
            arg(libc::F_GETFD),
            arg(libc::F_SETFD),
            arg(libc::F_DUPFD_CLOEXEC),
        ],
    )?;
    // The vsock device's deadline timer (a guest that never answers a shutdown).
    r.allow(libc::SYS_timerfd_settime);
    r.allow(libc::SYS_timerfd_gettime);
    // virtio-blk: positioned reads and writes of the image, flush.
    r.allow(libc::SYS_pread64);
    r.allow(libc::SYS_pwrite64);
    r.allow(libc::SYS_preadv);
    r.allow(libc::SYS_pwritev);
    r.allow(libc::SYS_fdatasync);
    r.allow(libc::SYS_fsync);
    // Kicking vCPUs out of KVM_RUN (pause, stop): pthread_kill is getpid + tgkill, and only
    // the kick signal may be sent.
    r.allow(libc::SYS_getpid);
    r.allow_arg_in(libc::SYS_tgkill, 2, &[arg(vm.kick_signal)])?;
    // Run control and the event loop's shared device state.
    r.allow(libc::SYS_futex);
    // Waiting for vCPUs to park or finish.
    r.allow(libc::SYS_clock_nanosleep);
    r.allow(libc::SYS_nanosleep);
    // Teardown: the vsock muxer removes the listener socket it bound (inside the jail, only the
    // sandbox's socket directory exists).
    r.allow(libc::SYS_unlink);
    r.allow(libc::SYS_unlinkat);
    r.allow(libc::SYS_rt_sigreturn);
    common(&mut r)?;
    if let Some(files) = vm.snapshot {
        super::snapshot::add(&mut r, files)?;
    }
    // Process exit: Rust's runtime frees the main thread's alternate signal stack, then exits.
    r.allow(libc::SYS_sigaltstack);
    r.allow(libc::SYS_exit);
    r.allow(libc::SYS_exit_group);
    Ok(r)
}
