//! The CPUID a vCPU reports: KVM's supported set (which includes the KVM paravirt leaves), with the
//! vCPU's own APIC id and topology patched in and the hypervisor bit set.
//!
//! KVM leaves one bit it emulates out of that set, as its API documents: the TSC-deadline timer
//! (`KVM_CAP_TSC_DEADLINE_TIMER`). Where the capability is there the bit is set, as QEMU and
//! Firecracker set it. Without it, Linux calibrates its local APIC timer against the PIT at boot:
//! two 100 ms busy waits of real time (`calibrate_APIC_clock`, then its verification).

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

/// CPUID could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("KVM_GET_SUPPORTED_CPUID")]
    Supported(#[source] kvm_ioctls::Error),
}

const HYPERVISOR_BIT: u32 = 1 << 31; // leaf 1 ECX
const HTT_BIT: u32 = 1 << 28; // leaf 1 EDX
const TSC_DEADLINE_BIT: u32 = 1 << 24; // leaf 1 ECX

/// KVM's supported CPUID with the TSC-deadline timer where KVM emulates it, read once and
/// patched per vCPU with [`for_vcpu`].
pub fn supported(kvm: &Kvm) -> Result<CpuId, CpuidError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError::Supported)?;
    if kvm.check_extension(Cap::TscDeadlineTimer) {
        with_tsc_deadline(&mut cpuid);
    }
    Ok(cpuid)
}

/// Sets the TSC-deadline timer bit of leaf 1.
fn with_tsc_deadline(cpuid: &mut CpuId) {
    for entry in cpuid.as_mut_slice() {
        if entry.function == 1 {
            entry.ecx |= TSC_DEADLINE_BIT;
        }
    }
}

/// `base` adjusted for vCPU `id` of `count`.
pub fn for_vcpu(base: &CpuId, id: u8, count: u8) -> CpuId {
    let mut cpuid = base.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ecx |= HYPERVISOR_BIT;
                // EBX[31:24] initial APIC id, EBX[23:16] logical processors per package.
                entry.ebx =
                    (entry.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                if count > 1 {
                    entry.edx |= HTT_BIT;
                } else {
                    entry.edx &= !HTT_BIT;
                }
            }
            // Extended topology: x2APIC id in EDX; one thread per core, `count` cores.
            0xb | 0x1f => {
                entry.edx = u32::from(id);
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = 0x100;
                    }
                    1 => {
                        entry.eax = bits_for(count);
                        entry.ebx = u32::from(count);
                        entry.ecx = 0x201;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
            }
            _ => {}
        }
    }
    cpuid
}

/// Bits of APIC id needed to number `count` CPUs.
fn bits_for(count: u8) -> u32 {
    let mut bits = 0;
    while (1u32 << bits) < u32::from(count) {
        bits += 1;
    }
    bits
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn apic_id_and_hypervisor_bit_are_patched() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xffff_1234,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
        ];
        let base = CpuId::from_entries(&entries).expect("cpuid");
        let c = for_vcpu(&base, 3, 4);
        let e = c.as_slice();
        assert_eq!(e[0].ebx, 0x0304_1234);
        assert_ne!(e[0].ecx & HYPERVISOR_BIT, 0);
        assert_ne!(e[0].edx & HTT_BIT, 0);
        assert_eq!((e[1].eax, e[1].ebx, e[1].edx), (2, 4, 3));
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(16), 4);
        assert_eq!(bits_for(5), 3);
    }

    #[test]
    fn the_tsc_deadline_bit_is_set_in_leaf_1_only() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ecx: 0x1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                ..Default::default()
            },
        ];
        let mut cpuid = CpuId::from_entries(&entries).expect("cpuid");
        with_tsc_deadline(&mut cpuid);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ecx, 0x1 | TSC_DEADLINE_BIT);
        assert_eq!(e[1].ecx, 0);
    }
}
