//! Saving and restoring the KVM state of one x86_64 vCPU, for snapshots.
//!
//! A [`VcpuState`] is everything KVM holds for a vCPU that the guest can see: CPUID, general and
//! special registers, the FPU/SSE/AVX area (XSAVE) and XCR0, debug registers, the local APIC, the
//! MP state (running, halted, waiting for SIPI), pending events (exceptions, NMIs, interrupt
//! shadow), the MSRs worth keeping and the TSC frequency. Guest memory and device state are saved
//! elsewhere.
//!
//! Order matters both ways (the same as Firecracker's, from KVM's own constraints):
//! - save: `KVM_GET_MP_STATE` first (it makes the LAPIC accept pending INIT/SIPI, which changes
//!   other state), `KVM_GET_VCPU_EVENTS` last (other GETs may still change what it reports).
//! - restore: CPUID first (what MSRs and XSAVE accept depends on it), the TSC frequency when it
//!   differs (before `IA32_TSC` is written: KVM computes the TSC offset with the current rate),
//!   MP state, REGS, SREGS
//!   (which also set the APIC base), XSAVE, XCRS, DEBUGREGS, LAPIC (after SREGS, before the MSRs:
//!   the TSC deadline only takes when the LAPIC is in TSC-deadline mode), MSRs with `IA32_TSC`
//!   before `IA32_TSC_DEADLINE` (KVM arms the deadline timer against the current TSC), then
//!   VCPU_EVENTS (REGS clears pending exceptions, so events come after it).
//!
//! Saving needs the vCPU stopped outside `KVM_RUN`, with any I/O or MMIO exit completed: after an
//! exit KVM finishes the instruction (advances RIP, stores the value read) only on the next
//! `KVM_RUN`. Run it once with `immediate_exit` set (it then returns EINTR) before saving, or the
//! restored guest repeats the last OUT (on KVM's fast port-I/O path) or asks its new VMM again
//! for the last IN, losing the value the old one gave. Every vCPU of the VM must be stopped
//! while any of them is saved or restored (`KVM_{GET,SET}_VCPU_EVENTS` are not safe otherwise).
//!
//! After restoring, and before the first `KVM_RUN`, [`kvmclock_ctrl`] tells a guest using kvmclock
//! that it was paused, so its soft-lockup watchdog does not fire for the time spent in the
//! snapshot.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, CpuId, Msrs, Xsave, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

const MSR_IA32_TSC: u32 = 0x10;
/// MSRs per `KVM_GET_MSRS`/`KVM_SET_MSRS`: KVM refuses 256 (`MAX_IO_MSRS`) or more with E2BIG,
/// so kvm-bindings' `KVM_MAX_MSR_ENTRIES` (256) is one too many.
const MSRS_PER_CALL: usize = 255;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Bytes of the classic `struct kvm_xsave` (`__u32 region[1024]`), what `KVM_GET_XSAVE` copies.
const XSAVE_REGION_BYTES: usize = 4096;
const XSAVE_REGION_WORDS: usize = XSAVE_REGION_BYTES / 4;

/// The MSRs kept across a snapshot, as inclusive ranges: guest state KVM lets userspace read and
/// write back. This is a subset of what Firecracker keeps, so everything it drops is dropped
/// here too; of what `KVM_GET_MSR_INDEX_LIST` reports that goes: PMU counters and controls
/// (0xc1.., 0x186.., 0x309.., 0x38d..; they fail depending on CPUID leaf 0xa), VMX capability
/// MSRs (0x480..0x491, nested only), Hyper-V (0x4000_0000..), `IA32_MCG_CTL` (0x17b, readable
/// only with MCG_CAP.CTL_P), the last-branch records (0x1db..0x1de; `DEBUGCTL` is kept), MPX
/// `BNDCFGS`, Processor Trace, AMX `XFD`, CET, `UMWAIT_CONTROL`, the AMD nested and
/// virtualisation MSRs (`VM_HSAVE_PA`, `VIRT_SPEC_CTRL`, `TSC_RATIO`), the read-only capability
/// MSRs (`ARCH_CAPABILITIES`, `PERF_CAPABILITIES`) which describe the host, and the old kvmclock
/// MSRs 0x11/0x12 (guests use the `_NEW` ones, KVM's CPUID advertising `KVM_FEATURE_CLOCKSOURCE2`).
/// The kvmclock, steal-time, async-PF, PV-EOI and poll-control MSRs live in the KVM paravirtual
/// range 0x4b56_4d00..=0x4b56_4dff, kept whole (so are hypervisor-specific ones there, e.g. PVM's).
const SAVED_MSR_RANGES: &[(u32, u32)] = &[
    (MSR_IA32_TSC, MSR_IA32_TSC),
    (0x1b, 0x1b),   // IA32_APIC_BASE
    (0x34, 0x34),   // MSR_SMI_COUNT
    (0x3a, 0x3a),   // IA32_FEAT_CTL
    (0x3b, 0x3b),   // IA32_TSC_ADJUST
    (0x48, 0x48),   // IA32_SPEC_CTRL
    (0x8b, 0x8b),   // IA32_UCODE_REV
    (0x9e, 0x9e),   // IA32_SMBASE
    (0xce, 0xce),   // MSR_PLATFORM_INFO
    (0x122, 0x122), // IA32_TSX_CTRL
    (0x140, 0x140), // MSR_MISC_FEATURES_ENABLES
    (0x174, 0x176), // IA32_SYSENTER_CS, _ESP, _EIP
    (0x179, 0x17a), // IA32_MCG_CAP, IA32_MCG_STATUS
    (0x1a0, 0x1a0), // IA32_MISC_ENABLE
    (0x1d9, 0x1d9), // IA32_DEBUGCTL
    (0x1fc, 0x1fc), // MSR_IA32_POWER_CTL
    (0x200, 0x2ff), // MTRRs, IA32_PAT
    (0x400, 0x47f), // machine-check banks
    (MSR_IA32_TSC_DEADLINE, MSR_IA32_TSC_DEADLINE),
    (0x800, 0xbff),             // x2APIC registers
    (0xda0, 0xda0),             // IA32_XSS
    (0x4b56_4d00, 0x4b56_4dff), // KVM paravirtual MSRs
    (0xc000_0080, 0xc000_0084), // EFER, STAR, LSTAR, CSTAR, SFMASK
    (0xc000_0100, 0xc000_0103), // FS_BASE, GS_BASE, KERNEL_GS_BASE, TSC_AUX
    (0xc001_0015, 0xc001_0015), // AMD HWCR
];

/// Saving or restoring vCPU state failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM ioctl failed.
    #[error("{0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// `KVM_GET_MSRS` read fewer MSRs than asked: it stopped at this one.
    #[error("KVM_GET_MSRS could not read MSR {0:#x}")]
    MsrRead(u32),
    /// `KVM_SET_MSRS` wrote fewer MSRs than given: it stopped at this one.
    #[error("KVM_SET_MSRS could not write MSR {0:#x}")]
    MsrWrite(u32),
    /// A KVM array (CPUID, MSRs, XSAVE) could not be built.
    #[error("building a KVM array")]
    Array(#[from] vmm_sys_util::fam::Error),
    /// The saved XSAVE area is smaller than what this host's KVM reads on `KVM_SET_XSAVE`.
    #[error("the saved XSAVE area has {saved} bytes, this host's KVM needs {needed}")]
    XsaveSize {
        /// Bytes in the state.
        saved: usize,
        /// Bytes `KVM_CAP_XSAVE2` asks for.
        needed: usize,
    },
    /// The host cannot run the guest's TSC at the saved frequency (no TSC scaling, or a rate
    /// KVM refuses).
    #[error("KVM_SET_TSC_KHZ: cannot run the guest TSC at {saved} kHz on this host ({host} kHz)")]
    TscKhz {
        /// The frequency in the state.
        saved: u32,
        /// This vCPU's frequency before the attempt.
        host: u32,
        /// What KVM said.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// One saved MSR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    /// The MSR index.
    pub index: u32,
    /// Its value.
    pub data: u64,
}

/// The KVM state of one x86_64 vCPU (see the module documentation for what and in which order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// `KVM_GET_CPUID2`: the CPUID the vCPU was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// `KVM_GET_MSRS` of [`msr_indices_to_save`], in that order (`IA32_TSC_DEADLINE` last).
    pub msrs: Vec<MsrValue>,
    /// `KVM_GET_DEBUGREGS`.
    pub debugregs: kvm_debugregs,
    /// `KVM_GET_LAPIC`: the local APIC's register page.
    pub lapic: kvm_lapic_state,
    /// `KVM_GET_MP_STATE`.
    pub mp_state: kvm_mp_state,
    /// `KVM_GET_REGS`.
    pub regs: kvm_regs,
    /// `KVM_GET_SREGS`.
    pub sregs: kvm_sregs,
    /// `KVM_GET_VCPU_EVENTS`.
    pub vcpu_events: kvm_vcpu_events,
    /// `KVM_GET_XCRS` (`nr_xcrs` 0 when the host has no XSAVE).
    pub xcrs: kvm_xcrs,
    /// The XSAVE area in KVM's (non-compacted) layout, as 32-bit words: the 4096-byte
    /// `kvm_xsave.region`, then the `extra` words `KVM_GET_XSAVE2` adds when `KVM_CAP_XSAVE2`
    /// reports more than 4096 bytes (dynamically enabled features such as AMX; none otherwise).
    pub xsave: Vec<u32>,
    /// `KVM_GET_TSC_KHZ`: the guest TSC frequency.
    pub tsc_khz: u32,
}

/// Whether `index` is one of the MSRs a snapshot keeps.
fn is_saved(index: u32) -> bool {
    SAVED_MSR_RANGES
        .iter()
        .any(|&(first, last)| (first..=last).contains(&index))
}

/// `listed` (KVM's MSR index list) reduced to the MSRs a snapshot keeps, in KVM's order except
/// that `IA32_TSC_DEADLINE` goes last, after `IA32_TSC`; duplicates dropped.
pub fn filter_msr_indices(listed: &[u32]) -> Vec<u32> {
    let mut kept: Vec<u32> = Vec::with_capacity(listed.len());
    for &index in listed {
        if is_saved(index) && !kept.contains(&index) {
            kept.push(index);
        }
    }
    // Stable: everything else keeps its order.
    kept.sort_by_key(|&index| index == MSR_IA32_TSC_DEADLINE);
    kept
}

/// The MSRs a snapshot saves on this host: `KVM_GET_MSR_INDEX_LIST` through
/// [`filter_msr_indices`]. Query once per process and reuse it for every vCPU.
///
/// # Errors
/// [`StateError::Kvm`] when the list cannot be read.
pub fn msr_indices_to_save(kvm: &Kvm) -> Result<Vec<u32>, StateError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(|e| StateError::Kvm("KVM_GET_MSR_INDEX_LIST", e))?;
    Ok(filter_msr_indices(list.as_slice()))
}

/// The XSAVE buffer KVM reads and writes for a vCPU of `vm`, in bytes: what `KVM_CAP_XSAVE2`
/// reports, never less than the classic 4096 (0, a kernel without the capability, means 4096).
///
/// The size grows only when the process asks for dynamically enabled XSTATE features for its
/// guests (`arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM)`, AMX); Pangolin never does, so on its hosts
/// this is 4096 and the plain `KVM_GET_XSAVE`/`KVM_SET_XSAVE` carry the whole state. The larger
/// path is kept so a host where it is not stays correct rather than losing state.
pub fn xsave_size(vm: &VmFd) -> usize {
    usize::try_from(vm.check_extension_int(Cap::Xsave2))
        .unwrap_or(0)
        .max(XSAVE_REGION_BYTES)
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |e| StateError::Kvm(what, e)
}

impl VcpuState {
    /// Reads the state of the stopped vCPU `fd` of `vm`, with the MSRs `msr_indices` (normally
    /// [`msr_indices_to_save`]).
    ///
    /// # Errors
    /// [`StateError::Kvm`] naming the ioctl that failed; [`StateError::MsrRead`] naming the first
    /// MSR KVM would not read.
    pub fn save(vm: &VmFd, fd: &VcpuFd, msr_indices: &[u32]) -> Result<Self, StateError> {
        let mp_state = fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(kvm("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        let xsave = save_xsave(vm, fd)?;
        let xcrs = fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?;
        let debugregs = fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?;
        let lapic = fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
        let tsc_khz = fd.get_tsc_khz().map_err(kvm("KVM_GET_TSC_KHZ"))?;
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let msrs = save_msrs(fd, msr_indices)?;
        let vcpu_events = fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
        Ok(Self {
            cpuid,
            msrs,
            debugregs,
            lapic,
            mp_state,
            regs,
            sregs,
            vcpu_events,
            xcrs,
            xsave,
            tsc_khz,
        })
    }

    /// Writes this state into the vCPU `fd` of `vm`, which has not run yet (a fresh
    /// `KVM_CREATE_VCPU`, or one only configured for boot). Call [`kvmclock_ctrl`] before its
    /// first `KVM_RUN`.
    ///
    /// # Errors
    /// [`StateError::Kvm`] naming the ioctl that failed; [`StateError::MsrWrite`] naming the first
    /// MSR KVM would not take; [`StateError::XsaveSize`]; [`StateError::TscKhz`] when the host
    /// cannot run the TSC at the saved frequency.
    pub fn restore(&self, vm: &VmFd, fd: &VcpuFd) -> Result<(), StateError> {
        fd.set_cpuid2(&CpuId::from_entries(&self.cpuid)?)
            .map_err(kvm("KVM_SET_CPUID2"))?;
        self.restore_tsc_khz(vm, fd)?;
        fd.set_mp_state(self.mp_state)
            .map_err(kvm("KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        self.restore_xsave(vm, fd)?;
        // KVM_GET_XCRS reports none when the host has no XSAVE, and KVM_SET_XCRS then fails:
        // nothing to restore.
        if self.xcrs.nr_xcrs > 0 {
            fd.set_xcrs(&self.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        }
        fd.set_debug_regs(&self.debugregs)
            .map_err(kvm("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        restore_msrs(fd, &msrs_in_restore_order(&self.msrs))?;
        fd.set_vcpu_events(&self.vcpu_events)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    /// Runs the guest TSC at the saved frequency when this vCPU's differs (another host, or one
    /// that calibrated its TSC differently). KVM itself ignores differences within 250 ppm.
    /// Without TSC scaling (`KVM_CAP_TSC_CONTROL`) KVM refuses a slower rate and takes a faster
    /// one by catching the guest TSC up at every VM entry, which is coarse: that is logged.
    fn restore_tsc_khz(&self, vm: &VmFd, fd: &VcpuFd) -> Result<(), StateError> {
        let host = fd.get_tsc_khz().map_err(kvm("KVM_GET_TSC_KHZ"))?;
        if host == self.tsc_khz {
            return Ok(());
        }
        tracing::info!(
            saved = self.tsc_khz,
            host,
            "guest TSC frequency differs from this host's"
        );
        fd.set_tsc_khz(self.tsc_khz)
            .map_err(|source| StateError::TscKhz {
                saved: self.tsc_khz,
                host,
                source,
            })?;
        if beyond_kvm_tolerance(self.tsc_khz, host) && !vm.check_extension(Cap::TscControl) {
            tracing::warn!(
                saved = self.tsc_khz,
                host,
                "no TSC scaling on this host: KVM catches the guest TSC up at each VM entry"
            );
        }
        Ok(())
    }

    fn restore_xsave(&self, vm: &VmFd, fd: &VcpuFd) -> Result<(), StateError> {
        let saved = self.xsave.len().saturating_mul(4);
        let needed = xsave_size(vm);
        let (Some(region), Some(extra)) = (
            self.xsave.get(..XSAVE_REGION_WORDS),
            self.xsave.get(XSAVE_REGION_WORDS..),
        ) else {
            return Err(StateError::XsaveSize { saved, needed });
        };
        if saved < needed {
            return Err(StateError::XsaveSize { saved, needed });
        }
        let mut xsave = Xsave::from_entries(extra)?;
        // SAFETY: only the region is written; the length of the flexible array stays as built.
        unsafe { xsave.as_mut_fam_struct() }
            .xsave
            .region
            .copy_from_slice(region);
        // SAFETY: KVM_SET_XSAVE reads the vCPU's XSAVE size, at most what KVM_CAP_XSAVE2 reports
        // (`needed`), and the buffer holds `saved` >= `needed` bytes. Pangolin enables no XSTATE
        // feature (arch_prctl) after the size was read.
        unsafe { fd.set_xsave2(&xsave) }.map_err(kvm("KVM_SET_XSAVE"))
    }
}

/// Whether `saved` differs from `host` by more than the 250 ppm within which KVM runs the guest
/// TSC at the host's rate rather than scaling or catching it up (`tsc_tolerance_ppm`).
fn beyond_kvm_tolerance(saved: u32, host: u32) -> bool {
    u64::from(saved.abs_diff(host)) * 1_000_000 > u64::from(host) * 250
}

/// Reads the XSAVE area: `KVM_GET_XSAVE2` into a buffer of the size `KVM_CAP_XSAVE2` reports
/// when that is larger than 4096 bytes, else the plain `KVM_GET_XSAVE` (the same bytes).
fn save_xsave(vm: &VmFd, fd: &VcpuFd) -> Result<Vec<u32>, StateError> {
    let size = xsave_size(vm);
    if size <= XSAVE_REGION_BYTES {
        let xsave = fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?;
        return Ok(xsave.region.to_vec());
    }
    let extra_words = (size - XSAVE_REGION_BYTES).div_ceil(4);
    let mut xsave = Xsave::new(extra_words)?;
    // SAFETY: the buffer holds 4096 + 4 * extra_words >= `size` bytes, the size KVM_CAP_XSAVE2
    // reports and the most KVM_GET_XSAVE2 writes; Pangolin enables no XSTATE feature (arch_prctl)
    // after the size was read.
    unsafe { fd.get_xsave2(&mut xsave) }.map_err(kvm("KVM_GET_XSAVE2"))?;
    let mut words = xsave.as_fam_struct_ref().xsave.region.to_vec();
    words.extend_from_slice(xsave.as_slice());
    Ok(words)
}

/// Reads `indices` in chunks KVM accepts; a short read names the MSR it stopped at.
fn save_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<MsrValue>, StateError> {
    let mut values = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(MSRS_PER_CALL) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        if let Some(&stopped) = chunk.get(read) {
            return Err(StateError::MsrRead(stopped));
        }
        values.extend(msrs.as_slice().iter().map(|e| MsrValue {
            index: e.index,
            data: e.data,
        }));
    }
    Ok(values)
}

/// The saved MSRs as they are written back: in saved order, but `IA32_TSC_DEADLINE` after
/// everything else (so after `IA32_TSC`); a zero deadline becomes the saved TSC.
///
/// The zero replacement is Firecracker's workaround for a vCPU that stops getting timer
/// interrupts after a restore: it saw the deadline read back as 0 with the timer interrupt never
/// delivered. A deadline at the saved TSC fires at once; KVM ignores it unless the guest's LAPIC
/// timer is in TSC-deadline mode, and a guest that had disarmed it gets one spurious tick.
fn msrs_in_restore_order(saved: &[MsrValue]) -> Vec<kvm_msr_entry> {
    let tsc = saved
        .iter()
        .filter(|m| m.index == MSR_IA32_TSC)
        .map(|m| m.data)
        .max();
    let entry = |m: &MsrValue| kvm_msr_entry {
        index: m.index,
        data: m.data,
        ..Default::default()
    };
    let mut entries: Vec<kvm_msr_entry> = saved
        .iter()
        .filter(|m| m.index != MSR_IA32_TSC_DEADLINE)
        .map(entry)
        .collect();
    for deadline in saved.iter().filter(|m| m.index == MSR_IA32_TSC_DEADLINE) {
        let mut e = entry(deadline);
        if e.data == 0 {
            if let Some(tsc) = tsc {
                tracing::debug!(tsc, "IA32_TSC_DEADLINE saved as 0: restoring it as the TSC");
                e.data = tsc;
            }
        }
        entries.push(e);
    }
    entries
}

/// Writes `entries` in order, in chunks KVM accepts; a short write names the MSR it stopped at.
fn restore_msrs(fd: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), StateError> {
    for chunk in entries.chunks(MSRS_PER_CALL) {
        let written = fd
            .set_msrs(&Msrs::from_entries(chunk)?)
            .map_err(kvm("KVM_SET_MSRS"))?;
        if let Some(stopped) = chunk.get(written) {
            return Err(StateError::MsrWrite(stopped.index));
        }
    }
    Ok(())
}

/// `KVM_KVMCLOCK_CTRL`: tells a guest using kvmclock that its vCPU was paused, so the time spent
/// in the snapshot is not taken for a soft lockup. Call it for every vCPU after restoring and
/// before resuming. Returns false when the guest has no kvmclock enabled on this vCPU (KVM says
/// EINVAL: the guest booted with `no-kvmclock`, or the vCPU never ran): nothing to tell.
///
/// # Errors
/// [`StateError::Kvm`] on any other failure.
pub fn kvmclock_ctrl(fd: &VcpuFd) -> Result<bool, StateError> {
    match fd.kvmclock_ctrl() {
        Ok(()) => Ok(true),
        Err(e) if e.errno() == libc::EINVAL => {
            tracing::debug!("KVM_KVMCLOCK_CTRL: the guest has no kvmclock on this vCPU");
            Ok(false)
        }
        Err(e) => Err(StateError::Kvm("KVM_KVMCLOCK_CTRL", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msr_list_keeps_saved_msrs_in_order_with_the_tsc_deadline_after_the_tsc() {
        let listed = [
            MSR_IA32_TSC_DEADLINE,
            0x174,       // SYSENTER_CS: kept
            0x17b,       // IA32_MCG_CTL: dropped
            0x186,       // PERFEVTSEL0: dropped
            0x38f,       // PERF_GLOBAL_CTRL: dropped
            0x480,       // VMX_BASIC: dropped
            0x4000_0001, // HV_X64_MSR_HYPERCALL: dropped
            0x10a,       // ARCH_CAPABILITIES: dropped
            0xd90,       // BNDCFGS: dropped
            0x1c4,       // XFD: dropped
            0x4b56_4d01, // kvmclock: kept
            0x4b56_4dff, // end of the KVM range: kept
            0x4b56_4e00, // past it: dropped
            MSR_IA32_TSC,
            0x277, // PAT: kept
            0x174, // duplicate: dropped
            0xc000_0082,
        ];
        assert_eq!(
            filter_msr_indices(&listed),
            [
                0x174,
                0x4b56_4d01,
                0x4b56_4dff,
                MSR_IA32_TSC,
                0x277,
                0xc000_0082,
                MSR_IA32_TSC_DEADLINE
            ]
        );
    }

    #[test]
    fn restore_writes_the_deadline_last_and_a_zero_deadline_as_the_tsc() {
        let m = |index, data| MsrValue { index, data };
        let order = |saved: &[MsrValue]| -> Vec<(u32, u64)> {
            msrs_in_restore_order(saved)
                .iter()
                .map(|e| (e.index, e.data))
                .collect()
        };
        let saved = [
            m(MSR_IA32_TSC_DEADLINE, 0),
            m(0x174, 8),
            m(MSR_IA32_TSC, 500),
        ];
        assert_eq!(
            order(&saved),
            [
                (0x174, 8),
                (MSR_IA32_TSC, 500),
                (MSR_IA32_TSC_DEADLINE, 500)
            ]
        );
        let armed = [m(MSR_IA32_TSC_DEADLINE, 900), m(MSR_IA32_TSC, 500)];
        assert_eq!(
            order(&armed),
            [(MSR_IA32_TSC, 500), (MSR_IA32_TSC_DEADLINE, 900)]
        );
        // Without a saved TSC there is nothing to put in a zero deadline.
        assert_eq!(
            order(&[m(MSR_IA32_TSC_DEADLINE, 0)]),
            [(MSR_IA32_TSC_DEADLINE, 0)]
        );
    }

    #[test]
    fn tsc_tolerance_is_kvms_250_ppm() {
        // 250 ppm of 2596148 kHz is 649 kHz (KVM rounds its bounds down, so one kHz either way
        // of that is not worth matching exactly: this only decides a warning).
        assert!(!beyond_kvm_tolerance(2_596_148, 2_596_148));
        assert!(!beyond_kvm_tolerance(2_596_148 + 600, 2_596_148));
        assert!(!beyond_kvm_tolerance(2_596_148 - 600, 2_596_148));
        assert!(beyond_kvm_tolerance(2_596_148 + 700, 2_596_148));
        assert!(beyond_kvm_tolerance(2_596_148 - 700, 2_596_148));
        assert!(beyond_kvm_tolerance(u32::MAX, 1));
    }

    #[test]
    fn state_errors_name_the_ioctl_and_the_msr() {
        let e = StateError::MsrWrite(0x4b56_4d42);
        assert_eq!(e.to_string(), "KVM_SET_MSRS could not write MSR 0x4b564d42");
        let e = StateError::Kvm("KVM_GET_XCRS", kvm_ioctls::Error::new(libc::EINVAL));
        assert_eq!(e.to_string(), "KVM_GET_XCRS");
    }
}
