//! KVM state: the VM (memory slots, irqchip, PIT) and the vCPU threads, plus the run control
//! they share with the event loop (pause, resume, stop, exit reason).

pub mod control;
pub mod vcpu;
pub mod vm;
