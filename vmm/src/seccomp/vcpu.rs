//! The vCPU threads' allow-list.
//!
//! A vCPU thread runs `KVM_RUN` in a loop and handles each exit on the spot: port I/O and MMIO
//! reads/writes go to the buses (serial console, i8042, virtio-mmio registers). What the
//! devices do in those handlers is bounded: write to the console log, signal an eventfd (irqfd,
//! activation, reset), log. Everything else a device does runs on the event loop, activation
//! included (virtio-fs hands its rings to virtiofsd there), so a vCPU makes no socket call.

use seccompiler::BackendError;

use super::rules::{arg, common, Rules};

/// `KVM_RUN`, `_IO(KVMIO, 0x80)`.
pub const KVM_RUN: u64 = 0xae80;

/// The vCPU threads' rules (the same for every VM: they name no descriptor).
///
/// # Errors
/// A condition seccompiler cannot express (a bug here).
pub fn rules() -> Result<Rules, BackendError> {
    let mut r = Rules::default();
    // The one ioctl: entering the guest. Registers are set up before the filter; interrupts
    // reach KVM through irqfds (a write), so no other KVM ioctl is needed at run time.
    r.allow_arg_in(libc::SYS_ioctl, 1, &[KVM_RUN])?;
    // Eventfd signals (irqfd, activation, i8042 reset, exit), the serial console's output, and
    // log lines on stderr.
    r.allow(libc::SYS_write);
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
