//! Saving and restoring the KVM state of the VM itself, for snapshots: the in-kernel PICs, IOAPIC
//! and PIT, and the kvmclock base. The VM must already have its irqchip and PIT (as
//! [`super::vm::Vm::with_kvm`] creates them); memory slots, irqfds and ioeventfds are set up by
//! whoever builds the VM, not restored from here. The vCPUs must be stopped.
//!
//! The clock is restored with flags 0, not `KVM_CLOCK_REALTIME`: with that flag KVM advances
//! the clock by the wall time since the save, so a template restored hours later would see its
//! monotonic clock jump by hours (Firecracker made it opt-in for this, #5809). With 0 the guest's
//! kvmclock carries on from the saved value, and the guest's wall clock stays behind by the time
//! the snapshot sat; correcting it is left to the guest side (e.g. set from the host's clock on
//! the first request after a restore).

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

/// Saving or restoring VM state failed.
#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    /// A KVM VM ioctl failed.
    #[error("{0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// A saved irqchip is not the chip it is saved as (a corrupt state).
    #[error("the saved {field} holds irqchip {found}, not {expected}")]
    WrongChip {
        /// Which field.
        field: &'static str,
        /// The chip id it must have.
        expected: u32,
        /// The chip id it has.
        found: u32,
    },
}

/// The KVM state of a VM.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// `KVM_GET_IRQCHIP` of the master 8259 PIC.
    pub pic_master: kvm_irqchip,
    /// `KVM_GET_IRQCHIP` of the slave 8259 PIC.
    pub pic_slave: kvm_irqchip,
    /// `KVM_GET_IRQCHIP` of the IOAPIC (redirection table, IRR).
    pub ioapic: kvm_irqchip,
    /// `KVM_GET_PIT2`: the three 8254 channels.
    pub pit: kvm_pit_state2,
    /// `KVM_GET_CLOCK`: the kvmclock base (and, as KVM reports them, flags, the host's realtime
    /// and TSC at the save, which restore does not pass back).
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // kvm_irqchip holds a union, without Debug.
        f.debug_struct("VmState")
            .field("pit", &self.pit)
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmStateError {
    move |e| VmStateError::Kvm(what, e)
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, VmStateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

fn set_chip(
    vm: &VmFd,
    field: &'static str,
    expected: u32,
    chip: &kvm_irqchip,
) -> Result<(), VmStateError> {
    if chip.chip_id != expected {
        return Err(VmStateError::WrongChip {
            field,
            expected,
            found: chip.chip_id,
        });
    }
    vm.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))
}

impl VmState {
    /// Reads the irqchips, the PIT and the clock of `vm`.
    ///
    /// # Errors
    /// [`VmStateError::Kvm`] naming the ioctl that failed (the VM has no irqchip or PIT).
    pub fn save(vm: &VmFd) -> Result<Self, VmStateError> {
        let pit = vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?;
        let clock = vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
        Ok(Self {
            pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit,
            clock,
        })
    }

    /// Writes this state into `vm`: the PIT, the clock (flags 0, see the module documentation),
    /// then the PICs and the IOAPIC.
    ///
    /// # Errors
    /// [`VmStateError::Kvm`] naming the ioctl that failed; [`VmStateError::WrongChip`] for a
    /// corrupt state.
    pub fn restore(&self, vm: &VmFd) -> Result<(), VmStateError> {
        vm.set_pit2(&self.pit).map_err(kvm("KVM_SET_PIT2"))?;
        // Only the clock value goes back. KVM_CLOCK_TSC_STABLE and KVM_CLOCK_HOST_TSC describe
        // the host at the save (KVM ignores them on set), and KVM_CLOCK_REALTIME would make KVM
        // add the wall time elapsed since the save; the realtime and host_tsc fields belong to
        // those flags.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
        set_chip(vm, "pic_master", KVM_IRQCHIP_PIC_MASTER, &self.pic_master)?;
        set_chip(vm, "pic_slave", KVM_IRQCHIP_PIC_SLAVE, &self.pic_slave)?;
        set_chip(vm, "ioapic", KVM_IRQCHIP_IOAPIC, &self.ioapic)
    }
}
