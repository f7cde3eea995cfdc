//! The 16550A UART at COM1 (ports 0x3f8..=0x3ff, IRQ 4), from vm-superio; its interrupt is an
//! eventfd KVM injects through an irqfd, so raising it never leaves the vCPU thread.

use std::io::Write;

use vm_superio::{serial::NoEvents, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// First I/O port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Number of ports a UART decodes.
pub const UART_PORTS: u16 = 8;

/// An interrupt line backed by an eventfd registered as a KVM irqfd.
#[derive(Debug)]
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The console UART writing guest output to `W`.
pub type SerialDevice = Serial<IrqLine, NoEvents, Box<dyn Write + Send>>;

/// Creates the UART; `irq` is the eventfd to register as irqfd for [`crate::arch::x86_64::layout::SERIAL_IRQ`].
pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> SerialDevice {
    Serial::new(IrqLine(irq), out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer the test can look into.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_written_to_thr_reach_the_output_and_raise_thre_interrupt() {
        let out = Shared::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut uart = new(irq.try_clone().unwrap(), Box::new(out.clone()));
        uart.write(1, 0x02).unwrap(); // IER: transmitter-holding-register-empty interrupt
        for b in b"Linux version" {
            uart.write(0, *b).unwrap();
        }
        assert_eq!(&*out.0.lock().unwrap(), b"Linux version");
        assert!(
            irq.read().unwrap() >= 1,
            "THRE interrupt raised through the eventfd"
        );
        // LSR says the transmitter is empty, so a polling driver keeps writing.
        assert_ne!(uart.read(5) & 0x20, 0);
    }
}
