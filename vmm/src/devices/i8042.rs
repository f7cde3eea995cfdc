//! The i8042 keyboard controller at ports 0x60/0x64, just enough for `reboot=k`: the guest
//! pulses the CPU reset line (command 0xfe) and we turn that into [`VmExit::Reset`].

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use crate::exit::{ExitLatch, VmExit};

/// Data port.
pub const DATA_PORT: u16 = 0x60;
/// Command/status port.
pub const COMMAND_PORT: u16 = 0x64;

/// Reports a reset request to the exit latch.
#[derive(Debug)]
pub struct ResetLine(pub Arc<ExitLatch>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(VmExit::Reset);
        Ok(())
    }
}

/// The keyboard controller.
pub type I8042 = I8042Device<ResetLine>;

/// Creates the controller wired to `latch`.
pub fn new(latch: Arc<ExitLatch>) -> I8042 {
    I8042Device::new(ResetLine(latch))
}

/// Maps a port to the offset vm-superio's device expects (0 for data, 4 for command).
pub fn offset(port: u16) -> Option<u8> {
    match port {
        DATA_PORT => Some(0),
        COMMAND_PORT => Some(4),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_requests_vm_reset() {
        let latch = Arc::new(ExitLatch::default());
        let mut dev = new(latch.clone());
        // The kernel polls the status register before writing; input buffer must read empty.
        assert_eq!(dev.read(offset(COMMAND_PORT).unwrap()) & 0x2, 0);
        dev.write(offset(COMMAND_PORT).unwrap(), 0xfe).unwrap();
        assert_eq!(latch.get(), Some(VmExit::Reset));
    }

    #[test]
    fn other_commands_do_not_reset() {
        let latch = Arc::new(ExitLatch::default());
        let mut dev = new(latch.clone());
        dev.write(offset(COMMAND_PORT).unwrap(), 0xad).unwrap();
        assert_eq!(latch.get(), None);
        assert_eq!(offset(0x61), None);
    }
}
