//! The KVM VM: guest memory slots, in-kernel irqchip (PIC + IOAPIC + LAPICs) and PIT.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::layout::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};
use crate::memory::GuestMemoryMmap;

/// Setting up the VM failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("opening /dev/kvm")]
    Open(#[source] kvm_ioctls::Error),
    /// The host KVM lacks a capability the VMM needs.
    #[error("KVM lacks {0:?}")]
    Capability(Cap),
    /// A VM ioctl failed.
    #[error("{0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Guest memory does not fit a KVM memory slot.
    #[error("guest memory region too large")]
    Region,
}

/// The KVM handles of one VM.
pub struct Vm {
    /// /dev/kvm (CPUID queries).
    pub kvm: Kvm,
    /// The VM.
    pub fd: VmFd,
}

const REQUIRED: [Cap; 6] = [
    Cap::Irqchip,
    Cap::Ioeventfd,
    Cap::Irqfd,
    Cap::UserMemory,
    Cap::SetTssAddr,
    Cap::Pit2,
];

impl Vm {
    /// Creates the VM with `mem` registered as its memory slots, then its irqchip and PIT.
    ///
    /// # Errors
    /// [`VmError`] naming the KVM call or capability that failed.
    pub fn new(mem: &GuestMemoryMmap) -> Result<Self, VmError> {
        Self::with_kvm(Kvm::new().map_err(VmError::Open)?, mem)
    }

    /// As [`Vm::new`] on an already-open `/dev/kvm` (a jailed VMM gets it from the host side).
    ///
    /// # Errors
    /// As [`Vm::new`].
    pub fn with_kvm(kvm: Kvm, mem: &GuestMemoryMmap) -> Result<Self, VmError> {
        for cap in REQUIRED {
            if !kvm.check_extension(cap) {
                return Err(VmError::Capability(cap));
            }
        }
        let fd = kvm
            .create_vm()
            .map_err(|e| VmError::Kvm("KVM_CREATE_VM", e))?;
        // Memory first: a slot added once the irqchip exists waits out an SRCU grace period
        // (7 ms for 256 MiB on this project's PVM hosts, whatever the size); added before it,
        // 0.2 ms. Firecracker keeps the same order.
        register_memory(&fd, mem)?;
        let tss = usize::try_from(KVM_TSS_ADDR).map_err(|_| VmError::Region)?;
        fd.set_tss_address(tss)
            .map_err(|e| VmError::Kvm("KVM_SET_TSS_ADDR", e))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(|e| VmError::Kvm("KVM_SET_IDENTITY_MAP_ADDR", e))?;
        fd.create_irq_chip()
            .map_err(|e| VmError::Kvm("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(|e| VmError::Kvm("KVM_CREATE_PIT2", e))?;
        Ok(Self { kvm, fd })
    }
}

/// Registers every region of `mem` as a KVM memory slot of the VM `fd`.
fn register_memory(fd: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: u32::try_from(slot).map_err(|_| VmError::Region)?,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes of `mem`, whose mappings
        // the VMM keeps for the VM's whole lifetime.
        unsafe { fd.set_user_memory_region(region) }
            .map_err(|e| VmError::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
    }
    Ok(())
}
