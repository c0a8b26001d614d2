//! COM1: a 16550A whose output goes straight to the console log file (each byte already cost a
//! VM exit; partial lines such as prompts must show up at once).

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;
use vm_superio::Serial;

use super::EventFdTrigger;
use crate::bus::BusDevice;

/// A 16550A's registers and receive FIFO (vm-superio's `SerialState` as serde data).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UartState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register (a pending THRE interrupt lives here).
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Received bytes the guest has not read.
    pub in_buffer: Vec<u8>,
}

/// A saved UART could not be restored.
#[derive(Debug, thiserror::Error)]
#[error("saved serial FIFO of {0} bytes exceeds the 16550A's")]
pub struct UartStateError(pub usize);

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

    /// The UART's registers and receive FIFO, for a snapshot.
    pub fn save(&self) -> UartState {
        let s = self.uart.state();
        UartState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// A UART where `state` left off (a pending transmit-empty interrupt included), raising
    /// `irq` and writing to `out`.
    ///
    /// # Errors
    /// [`UartStateError`] when the saved receive FIFO is longer than a 16550A's.
    pub fn restore(state: &UartState, irq: EventFdTrigger, out: W) -> Result<Self, UartStateError> {
        let s = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Serial::from_state(&s, irq, vm_superio::serial::NoEvents, out)
            .map_err(|_| UartStateError(state.in_buffer.len()))?;
        Ok(Self { uart })
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

    #[test]
    fn uart_registers_survive_save_and_restore() {
        let sink = Sink::default();
        let mut console =
            SerialConsole::new(EventFdTrigger(EventFd::new(0).expect("evt")), sink.clone());
        // Line control: 8N1 with DLAB, divisor 3, then interrupts on; scratch holds a byte.
        for (off, v) in [
            (3u64, 0x83u8),
            (0, 3),
            (1, 0),
            (3, 0x03),
            (1, 0x02),
            (7, 0x5a),
        ] {
            console.write(off, &[v]);
        }
        let saved = console.save();
        let json = serde_json::to_string(&saved).expect("encode");
        let back: UartState = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, saved);
        let out = Sink::default();
        let mut restored = SerialConsole::restore(
            &back,
            EventFdTrigger(EventFd::new(0).expect("evt")),
            out.clone(),
        )
        .expect("restore");
        assert_eq!(restored.save(), saved);
        let mut b = [0u8];
        restored.read(7, &mut b);
        assert_eq!(b, [0x5a]);
        restored.write(0, b"x");
        restored.flush();
        assert_eq!(&*out.0.lock().expect("lock"), b"x");
        let too_long = UartState {
            in_buffer: vec![0; 65],
            ..saved
        };
        assert!(SerialConsole::restore(
            &too_long,
            EventFdTrigger(EventFd::new(0).expect("evt")),
            Sink::default()
        )
        .is_err());
    }
}
