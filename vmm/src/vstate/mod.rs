//! KVM state: the VM (memory slots, irqchip, PIT) and the vCPU threads, plus the run control
//! they share with the event loop (pause, resume, stop, exit reason), and the saving and
//! restoring of both for snapshots (`vcpu_state`, `vm_state`).

pub mod control;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
pub mod vm_state;
