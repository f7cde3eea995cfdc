//! Emulated devices and the buses that route vCPU I/O exits to them.
//!
//! Port I/O is fixed legacy hardware (COM1, i8042); everything else is virtio-mmio on the MMIO bus.

pub mod i8042;
pub mod serial;
pub mod virtio;

use std::sync::{Arc, Mutex};

use self::i8042::I8042;
use self::serial::{SerialDevice, COM1_BASE, UART_PORTS};

/// A device on the MMIO bus: accesses arrive with the offset inside its window.
pub trait MmioDevice: Send {
    /// Guest read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// An MMIO window: base, length, device.
type MmioWindow = (u64, u64, Arc<Mutex<dyn MmioDevice>>);

/// Routes I/O exits from all vCPUs to the devices.
pub struct Bus {
    serial: Mutex<SerialDevice>,
    i8042: Mutex<I8042>,
    mmio: Vec<MmioWindow>,
}

impl Bus {
    /// A bus with the two legacy port devices and no MMIO devices.
    pub fn new(serial: SerialDevice, i8042: I8042) -> Self {
        Bus {
            serial: Mutex::new(serial),
            i8042: Mutex::new(i8042),
            mmio: Vec::new(),
        }
    }

    /// Adds an MMIO device decoding `[base, base + len)`.
    pub fn add_mmio(&mut self, base: u64, len: u64, dev: Arc<Mutex<dyn MmioDevice>>) {
        self.mmio.push((base, len, dev));
    }

    /// Handles an IN instruction; unclaimed ports read as all ones, like a floating ISA bus.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        if (COM1_BASE..COM1_BASE + UART_PORTS).contains(&port) && data.len() == 1 {
            data[0] = lock(&self.serial).read((port - COM1_BASE) as u8);
        } else if let (Some(off), 1) = (i8042::offset(port), data.len()) {
            data[0] = lock(&self.i8042).read(off);
        }
    }

    /// Handles an OUT instruction; writes to unclaimed ports are dropped.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        if (COM1_BASE..COM1_BASE + UART_PORTS).contains(&port) && data.len() == 1 {
            // An output error (full disk, closed pipe) must not take the guest down.
            let _ = lock(&self.serial).write((port - COM1_BASE) as u8, data[0]);
        } else if let (Some(off), 1) = (i8042::offset(port), data.len()) {
            let _ = lock(&self.i8042).write(off, data[0]);
        }
    }

    fn find_mmio(&self, addr: u64) -> Option<(u64, &Arc<Mutex<dyn MmioDevice>>)> {
        self.mmio
            .iter()
            .find(|(base, len, _)| addr >= *base && addr - base < *len)
            .map(|(base, _, dev)| (addr - base, dev))
    }

    /// Handles an MMIO read; holes read as zero.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some((off, dev)) = self.find_mmio(addr) {
            lock(dev).read(off, data);
        }
    }

    /// Handles an MMIO write; writes to holes are dropped.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((off, dev)) = self.find_mmio(addr) {
            lock(dev).write(off, data);
        }
    }
}

/// Locks a device even if a previous holder panicked: a device is still usable after a
/// poisoned access, and the alternative is taking every vCPU down.
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
