//! COM1: a 16550A whose output goes straight to the console log file (each byte already cost a
//! VM exit; partial lines such as prompts must show up at once).

use std::io::Write;

use vm_superio::Serial;

use super::EventFdTrigger;
use crate::bus::BusDevice;

/// The console UART on the port-I/O bus.
pub struct SerialConsole<W: Write + Send> {
    uart: Serial<EventFdTrigger, vm_superio::serial::NoEvents, W>,
}

impl<W: Write + Send> SerialConsole<W> {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: EventFdTrigger, out: W) -> Self {
        Self {
            uart: Serial::new(irq, out),
        }
    }

    /// Flushes buffered output (at VMM exit).
    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}

impl<W: Write + Send> BusDevice for SerialConsole<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(off), 1) => data[0] = self.uart.read(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [value]) = (u8::try_from(offset), data) {
            if let Err(e) = self.uart.write(off, *value) {
                tracing::debug!(error = ?e, "serial write");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_written_to_thr_reach_the_log_at_once() {
        let sink = Sink::default();
        let evt = EventFd::new(0).expect("eventfd");
        let mut console = SerialConsole::new(EventFdTrigger(evt), sink.clone());
        for b in b"hello\nwor" {
            console.write(0, &[*b]);
        }
        console.flush();
        assert_eq!(&*sink.0.lock().expect("lock"), b"hello\nwor");
        // wide accesses are ignored, out-of-range reads return all ones
        console.write(0, &[1, 2]);
        let mut d = [0u8; 2];
        console.read(0, &mut d);
        assert_eq!(d, [0xff, 0xff]);
    }
}
