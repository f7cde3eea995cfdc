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

/// Most console bytes kept by [`Capped`] when the console goes to a file.
pub const CONSOLE_LOG_CAP: u64 = 8 << 20;

/// Guest console output limited to a number of bytes, then one line saying so, then nothing.
///
/// The guest decides how much it prints: root in a privileged container can write to
/// /dev/kmsg or the UART, a compromised guest kernel to the UART directly, without end. The
/// console log lives in the runtime's state directory (on /run, RAM, by default), so it is
/// capped; the guest never sees a difference (writes past the cap succeed and are dropped).
/// The head is kept: it has the boot messages the runtime quotes in its errors.
pub struct Capped<W> {
    inner: W,
    left: u64,
    cut: bool,
}

impl<W: Write> Capped<W> {
    /// Passes at most `cap` bytes to `inner`.
    pub fn new(inner: W, cap: u64) -> Self {
        Capped {
            inner,
            left: cap,
            cut: false,
        }
    }
}

impl<W: Write> Write for Capped<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            if !self.cut {
                self.cut = true;
                let _ = self.inner.write_all(
                    b"\n[rootcell: console log cut here: the guest wrote more than the cap]\n",
                );
            }
            return Ok(buf.len());
        }
        let n = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        self.inner.write_all(&buf[..n])?;
        self.left -= n as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

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

    #[test]
    fn a_capped_console_keeps_the_head_says_where_it_was_cut_and_drops_the_rest() {
        let out = Shared::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut uart = new(irq, Box::new(Capped::new(out.clone(), 16)));
        // A guest printing without end: every byte is taken, only the cap is kept.
        for i in 0..100_000u32 {
            uart.write(0, b"0123456789"[(i % 10) as usize]).unwrap();
        }
        let kept = out.0.lock().unwrap().clone();
        let text = String::from_utf8(kept).unwrap();
        assert!(
            text.starts_with("0123456789012345\n[rootcell: console log cut here"),
            "{text}"
        );
        assert_eq!(
            text.lines().count(),
            2,
            "one marker line, nothing after it: {text}"
        );
        assert!(uart.read(5) & 0x20 != 0, "the guest can still write");
    }
}
