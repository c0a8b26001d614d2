//! The KVM VM: guest memory slots, in-kernel irqchip (PIC + IOAPIC + LAPICs) and PIT.

use std::os::fd::{AsRawFd, BorrowedFd, IntoRawFd};

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
    /// The thread registering guest memory could not start or did not finish.
    #[error("guest memory registration thread")]
    Registration(#[source] Option<std::io::Error>),
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

/// Guest memory being registered with KVM on a helper thread (`KVM_SET_USER_MEMORY_REGION` for
/// every region). A new memory slot waits for the kernel's grace period (3-8 ms on this
/// project's hosts, whatever its size), which the rest of the VM's setup need not wait for: only
/// the guest's first instruction does. [`MemoryRegistration::wait`] before any vCPU runs.
#[must_use = "no vCPU may run before its memory is registered: wait() for it"]
pub struct MemoryRegistration(std::thread::JoinHandle<Result<(), VmError>>);

impl MemoryRegistration {
    /// Waits until every region is registered.
    ///
    /// # Errors
    /// The failed `KVM_SET_USER_MEMORY_REGION`, or [`VmError::Registration`] when the thread
    /// panicked.
    pub fn wait(self) -> Result<(), VmError> {
        self.0.join().map_err(|_| VmError::Registration(None))?
    }
}

impl Vm {
    /// Creates the VM with its irqchip and PIT, and starts registering `mem` with it (see
    /// [`MemoryRegistration`]).
    ///
    /// # Errors
    /// [`VmError`] naming the KVM call or capability that failed.
    pub fn new(mem: &GuestMemoryMmap) -> Result<(Self, MemoryRegistration), VmError> {
        Self::with_kvm(Kvm::new().map_err(VmError::Open)?, mem)
    }

    /// As [`Vm::new`] on an already-open `/dev/kvm` (a jailed VMM gets it from the host side).
    ///
    /// # Errors
    /// As [`Vm::new`].
    pub fn with_kvm(
        kvm: Kvm,
        mem: &GuestMemoryMmap,
    ) -> Result<(Self, MemoryRegistration), VmError> {
        for cap in REQUIRED {
            if !kvm.check_extension(cap) {
                return Err(VmError::Capability(cap));
            }
        }
        let fd = kvm
            .create_vm()
            .map_err(|e| VmError::Kvm("KVM_CREATE_VM", e))?;
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
        let registration = register_memory(&kvm, &fd, mem)?;
        Ok((Self { kvm, fd }, registration))
    }
}

/// Starts a thread that registers every region of `mem` with the VM `fd`, through a duplicate
/// of `fd` and a clone of `mem` (the thread keeps both alive whatever happens to the caller's).
fn register_memory(
    kvm: &Kvm,
    fd: &VmFd,
    mem: &GuestMemoryMmap,
) -> Result<MemoryRegistration, VmError> {
    let mut regions = Vec::new();
    for (slot, region) in mem.iter().enumerate() {
        regions.push(kvm_userspace_memory_region {
            slot: u32::try_from(slot).map_err(|_| VmError::Region)?,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        });
    }
    // SAFETY: `fd` is an open VM descriptor for the duration of this borrow.
    let dup = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) }
        .try_clone_to_owned()
        .map_err(|e| VmError::Registration(Some(e)))?;
    // SAFETY: `dup` is a VM descriptor of our own; the new VmFd becomes its only owner.
    let vm = unsafe { kvm.create_vmfd_from_rawfd(dup.into_raw_fd()) }
        .map_err(|e| VmError::Kvm("duplicating the VM descriptor", e))?;
    let mem = mem.clone();
    let thread = std::thread::Builder::new()
        .name("memory".into())
        .spawn(move || {
            for region in regions {
                // SAFETY: the region is a live mapping of `memory_size` bytes of `mem`, whose
                // mappings the VMM keeps for the VM's whole lifetime (and this thread until it
                // returns).
                unsafe { vm.set_user_memory_region(region) }
                    .map_err(|e| VmError::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
            }
            drop(mem);
            Ok(())
        })
        .map_err(|e| VmError::Registration(Some(e)))?;
    Ok(MemoryRegistration(thread))
}
