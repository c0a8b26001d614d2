//! Legacy PC devices the kernel expects: the COM1 console and the i8042 controller (whose reset
//! command is how a `reboot=k` guest asks to stop).

pub mod i8042;
pub mod serial;

use vmm_sys_util::eventfd::EventFd;

/// An eventfd as a vm-superio interrupt or reset line.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
