//! What the event-loop thread of a template's VMM may do beyond [`super::event_loop`]: take the
//! snapshot. Only a VMM whose configuration has `snapshot` gets these; every other VMM's filter
//! has none of them.
//!
//! The vCPU threads hand their vCPUs over and end, so the vCPU filter is unchanged: the KVM
//! reads all happen here.

use super::rules::{arg, Rules};
use seccompiler::BackendError;

/// The ioctl numbers (linux/kvm.h), computed from their argument types by vmm-sys-util.
#[allow(missing_docs, non_snake_case)]
mod nr {
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

    const KVMIO: u32 = 0xae;
    // vCPU state, in the order `VcpuState::save` reads it (linux/kvm.h).
    ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_bindings::kvm_mp_state);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_bindings::kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_bindings::kvm_sregs);
    ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_bindings::kvm_xsave);
    ioctl_ior_nr!(KVM_GET_XSAVE2, KVMIO, 0xcf, kvm_bindings::kvm_xsave);
    ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_bindings::kvm_xcrs);
    ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_bindings::kvm_debugregs);
    ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_bindings::kvm_lapic_state);
    ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
    ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_bindings::kvm_cpuid2);
    ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_bindings::kvm_msrs);
    ioctl_ior_nr!(
        KVM_GET_VCPU_EVENTS,
        KVMIO,
        0x9f,
        kvm_bindings::kvm_vcpu_events
    );
    // VM state.
    ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_bindings::kvm_irqchip);
    ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_bindings::kvm_pit_state2);
    ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_bindings::kvm_clock_data);
    // The XSAVE area's size (KVM_CAP_XSAVE2) is asked of the VM.
    ioctl_io_nr!(KVM_CHECK_EXTENSION, KVMIO, 0x03);
}

/// Every ioctl a snapshot makes, for the filter and its tests.
pub fn ioctls() -> Vec<u64> {
    [
        nr::KVM_GET_MP_STATE(),
        nr::KVM_GET_REGS(),
        nr::KVM_GET_SREGS(),
        nr::KVM_GET_XSAVE(),
        nr::KVM_GET_XSAVE2(),
        nr::KVM_GET_XCRS(),
        nr::KVM_GET_DEBUGREGS(),
        nr::KVM_GET_LAPIC(),
        nr::KVM_GET_TSC_KHZ(),
        nr::KVM_GET_CPUID2(),
        nr::KVM_GET_MSRS(),
        nr::KVM_GET_VCPU_EVENTS(),
        nr::KVM_GET_IRQCHIP(),
        nr::KVM_GET_PIT2(),
        nr::KVM_GET_CLOCK(),
        nr::KVM_CHECK_EXTENSION(),
    ]
    .into_iter()
    .collect()
}

/// Adds the snapshot's calls to the event loop's rules; `files` are the state and memory files.
///
/// # Errors
/// A condition seccompiler cannot express (a bug here).
pub fn add(r: &mut Rules, files: [std::os::fd::RawFd; 2]) -> Result<(), BackendError> {
    // Reading the vCPUs' and the VM's KVM state: these reads only, no KVM_SET_*.
    r.allow_arg_in(libc::SYS_ioctl, 1, &ioctls())?;
    // The files the host opened: truncating the two snapshot files (and no other descriptor:
    // not the guest memfd), rewinding the state file, finding the guest memfd's data extents
    // (SEEK_DATA/SEEK_HOLE), the files' lengths (fstat, or statx on the descriptor itself).
    r.allow_arg_in(libc::SYS_ftruncate, 0, &files.map(arg))?;
    r.allow_arg_in(
        libc::SYS_lseek,
        2,
        &[
            arg(libc::SEEK_SET),
            arg(libc::SEEK_DATA),
            arg(libc::SEEK_HOLE),
        ],
    )?;
    r.allow(libc::SYS_fstat);
    r.allow_arg_in(libc::SYS_statx, 2, &[arg(libc::AT_EMPTY_PATH)])?;
    Ok(())
}
