//! The vCPU threads' allow-list.
//!
//! A vCPU thread runs `KVM_RUN` in a loop and handles each exit on the spot: port I/O and MMIO
//! reads/writes go to the buses (serial console, i8042, virtio-mmio registers). What the
//! devices do in those handlers is bounded: write to the console log, signal an eventfd (irqfd,
//! activation, reset), log, and for virtio-fs hand the rings to virtiofsd when the driver
//! sets DRIVER_OK. Everything else a device does runs on the event loop.

use seccompiler::BackendError;

use super::rules::{arg, Rules};
use super::VmContext;

/// `KVM_RUN`, `_IO(KVMIO, 0x80)`.
pub const KVM_RUN: u64 = 0xae80;

/// The vCPU threads' rules.
///
/// # Errors
/// A condition seccompiler cannot express (a bug here).
pub fn rules(vm: &VmContext) -> Result<Rules, BackendError> {
    let mut r = Rules::default();
    // The one ioctl: entering the guest. Registers are set up before the filter; interrupts
    // reach KVM through irqfds (a write), so no other KVM ioctl is needed at run time.
    r.allow_arg_in(libc::SYS_ioctl, 1, &[KVM_RUN])?;
    // Eventfd signals (irqfd, activation, i8042 reset, exit), the serial console's output, and
    // log lines on stderr.
    r.allow(libc::SYS_write);
    // virtio-fs activation (the guest's DRIVER_OK write) sends SET_FEATURES and the vring
    // setup to virtiofsd and reads its replies: only on the vhost-user sockets.
    let sockets: Vec<u64> = vm.vhost_user_sockets.iter().map(|&fd| arg(fd)).collect();
    if !sockets.is_empty() {
        r.allow_arg_in(libc::SYS_sendmsg, 0, &sockets)?;
        r.allow_arg_in(libc::SYS_recvmsg, 0, &sockets)?;
    }
    // Mutexes and condvars (the buses' devices, run control: pause parks here) and the start
    // barrier.
    r.allow(libc::SYS_futex);
    // The kick signal's handler returns (it only knocks the thread out of KVM_RUN).
    r.allow(libc::SYS_rt_sigreturn);
    common(&mut r)?;
    // Thread end: Rust's runtime frees the alternate signal stack, glibc releases the stack
    // (madvise in `common`) and the vCPU descriptor is closed.
    r.allow(libc::SYS_sigaltstack);
    r.allow(libc::SYS_close);
    // std checks a descriptor is open before closing it (F_GETFD, in debug builds).
    r.allow_arg_in(libc::SYS_fcntl, 1, &[arg(libc::F_GETFD)])?;
    r.allow(libc::SYS_exit);
    Ok(r)
}

/// What any Rust thread of this process needs, whatever it does.
///
/// # Errors
/// A condition seccompiler cannot express (a bug here).
pub fn common(r: &mut Rules) -> Result<(), BackendError> {
    // The allocator: glibc's per-thread arenas grow and shrink with these. Never executable.
    let exec = arg(libc::PROT_EXEC);
    r.allow_arg_without(libc::SYS_mmap, 2, exec)?;
    r.allow_arg_without(libc::SYS_mprotect, 2, exec)?;
    r.allow(libc::SYS_munmap);
    r.allow(libc::SYS_mremap);
    r.allow(libc::SYS_madvise);
    r.allow(libc::SYS_brk);
    // glibc blocks signals around pthread_kill and thread exit.
    r.allow(libc::SYS_rt_sigprocmask);
    // std's HashMap seeds (once per thread), and the clocks when the host's clocksource has no
    // vDSO fast path (log timestamps, Instant).
    r.allow(libc::SYS_getrandom);
    r.allow(libc::SYS_clock_gettime);
    r.allow(libc::SYS_gettimeofday);
    // Spinning locks back off with a yield.
    r.allow(libc::SYS_sched_yield);
    Ok(())
}
