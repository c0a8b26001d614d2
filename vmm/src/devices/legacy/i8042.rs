//! The i8042 keyboard controller, reduced to what a guest without a keyboard touches: status reads
//! and the CPU reset command (0xfe), which signals the VMM to stop.

use vm_superio::I8042Device;

use super::EventFdTrigger;
use crate::bus::BusDevice;

/// i8042 on ports 0x60-0x64.
pub struct I8042 {
    dev: I8042Device<EventFdTrigger>,
}

impl I8042 {
    /// A controller that signals `reset` when the guest asks for a CPU reset.
    pub fn new(reset: EventFdTrigger) -> Self {
        Self {
            dev: I8042Device::new(reset),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(off), 1) => data[0] = self.dev.read(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [value]) = (u8::try_from(offset), data) {
            if let Err(e) = self.dev.write(off, *value) {
                tracing::warn!(error = ?e, "i8042 reset signal");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn reset_command_signals_the_vmm() {
        let evt = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let mut dev = I8042::new(EventFdTrigger(evt.try_clone().expect("clone")));
        dev.write(4, &[0x00]);
        assert!(evt.read().is_err());
        dev.write(4, &[0xfe]);
        assert_eq!(evt.read().expect("signalled"), 1);
    }
}
