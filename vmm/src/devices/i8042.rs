//! The i8042 keyboard controller at ports 0x60/0x64: a controller with nothing plugged in.
//!
//! The guest needs it for one thing, `reboot=k`: the kernel pulses the CPU reset line (command
//! 0xfe) and we turn that into [`VmExit::Reset`], the VMM's clean exit. But a guest kernel with
//! the PS/2 driver (`CONFIG_SERIO_I8042`, on in tinyconfig and in every distribution kernel) also
//! probes the controller at boot, and Linux waits for each answer by polling the status register
//! for up to 10000 x 50 us. A controller that never answers (vm-superio's reset-only one) costs
//! every boot half a second or more in `i8042: Can't read CTR while initializing i8042`, measured
//! at ~1.1 s on nested KVM. So this one answers the controller's own commands as a real 8042
//! does, at once: read/write the configuration byte (CTR), the self tests, enable/disable of the
//! two interfaces, the output port, the loop-back writes, the reset pulse.
//!
//! No keyboard or mouse is attached, and no interrupt is wired: bytes meant for a device behind
//! the controller (data-port writes outside a command, `0xd4`) end as a real controller ends them
//! when nothing answers, with the time-out bit and `0xff`. The base command line also passes
//! `i8042.nokbd i8042.noaux`, so the kernel does not look for devices that cannot be there.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::exit::{ExitLatch, VmExit};

/// Data port.
pub const DATA_PORT: u16 = 0x60;
/// Command/status port.
pub const COMMAND_PORT: u16 = 0x64;

/// Offsets of the two ports as the bus passes them.
const DATA_OFFSET: u8 = 0;
const COMMAND_OFFSET: u8 = 4;

// Status register bits (read from port 0x64).
/// Output buffer full: a byte waits at port 0x60.
pub const STR_OBF: u8 = 0x01;
/// Input buffer full: never, we take every byte at once.
pub const STR_IBF: u8 = 0x02;
/// System flag: POST passed (mirrors the CTR bit).
pub const STR_SYS: u8 = 0x04;
/// The last write went to the command port.
pub const STR_CMDDAT: u8 = 0x08;
/// Keyboard not inhibited (the key lock is open).
pub const STR_KEYLOCK: u8 = 0x10;
/// The byte in the output buffer comes from the auxiliary (mouse) port.
pub const STR_AUXDATA: u8 = 0x20;
/// No device answered a byte sent to it.
pub const STR_TIMEOUT: u8 = 0x40;

// Controller configuration byte (CTR) bits.
const CTR_SYS: u8 = 0x04;
const CTR_KBDDIS: u8 = 0x10;
const CTR_AUXDIS: u8 = 0x20;
/// What firmware leaves: system flag, scan-code translation, no interrupts (none are wired).
pub const CTR_INITIAL: u8 = CTR_SYS | 0x40;

// Controller commands (port 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_INPUT_PORT: u8 = 0xc0;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_KBD_LOOP: u8 = 0xd2;
const CMD_AUX_LOOP: u8 = 0xd3;
const CMD_AUX_SEND: u8 = 0xd4;
/// 0xf0-0xff pulse output-port lines low for 6 us; a clear bit 0 pulses the CPU reset line.
const CMD_PULSE_BASE: u8 = 0xf0;

/// Self-test passed.
pub const SELF_TEST_OK: u8 = 0x55;
/// Interface test passed.
const INTERFACE_TEST_OK: u8 = 0x00;
/// What the controller hands back when no device answered.
const NO_DEVICE: u8 = 0xff;
/// Output port: bit 0 is the CPU reset line (high = running), bit 1 the A20 gate.
const OUTPUT_PORT: u8 = 0x03;
/// Input port: bit 7 set = keyboard not inhibited.
const INPUT_PORT: u8 = 0x80;
/// Bytes a guest could queue (loop-back writes) before we drop the oldest, like a 16-byte FIFO.
const QUEUE_MAX: usize = 16;

/// The controller's response to a data-port write, chosen by the command that preceded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    None,
    WriteCtr,
    WriteOutputPort,
    KbdLoop,
    AuxLoop,
    AuxSend,
}

/// The keyboard controller.
#[derive(Debug)]
pub struct I8042 {
    latch: Arc<ExitLatch>,
    ctr: u8,
    /// Bytes for the guest to read at port 0x60, each with the status bits it comes with.
    out: VecDeque<(u8, u8)>,
    pending: Pending,
    last_was_command: bool,
}

/// Creates the controller wired to `latch`.
pub fn new(latch: Arc<ExitLatch>) -> I8042 {
    I8042 {
        latch,
        ctr: CTR_INITIAL,
        out: VecDeque::new(),
        pending: Pending::None,
        last_was_command: false,
    }
}

/// Maps a port to the offset [`I8042::read`]/[`I8042::write`] expect (0 for data, 4 for command).
pub fn offset(port: u16) -> Option<u8> {
    match port {
        DATA_PORT => Some(DATA_OFFSET),
        COMMAND_PORT => Some(COMMAND_OFFSET),
        _ => None,
    }
}

impl I8042 {
    /// A guest read at `offset`: status at 4, the next output byte at 0.
    pub fn read(&mut self, offset: u8) -> u8 {
        match offset {
            COMMAND_OFFSET => self.status(),
            DATA_OFFSET => match self.out.pop_front() {
                Some((byte, _)) => byte,
                // An empty buffer reads as the last byte on real parts; 0 is as good.
                None => 0,
            },
            _ => 0xff,
        }
    }

    /// A guest write of `value` at `offset`. Never fails; the `Result` keeps the bus's shape.
    pub fn write(&mut self, offset: u8, value: u8) -> Result<(), std::convert::Infallible> {
        match offset {
            COMMAND_OFFSET => {
                self.last_was_command = true;
                self.command(value);
            }
            DATA_OFFSET => {
                self.last_was_command = false;
                self.data(value);
            }
            _ => {}
        }
        Ok(())
    }

    /// The status register.
    fn status(&self) -> u8 {
        let mut s = STR_KEYLOCK | (self.ctr & CTR_SYS);
        if self.last_was_command {
            s |= STR_CMDDAT;
        }
        if let Some(&(_, bits)) = self.out.front() {
            s |= STR_OBF | bits;
        }
        s
    }

    fn push(&mut self, byte: u8, bits: u8) {
        if self.out.len() == QUEUE_MAX {
            self.out.pop_front();
        }
        self.out.push_back((byte, bits));
    }

    fn reset(&self) {
        self.latch.request(VmExit::Reset);
    }

    fn command(&mut self, cmd: u8) {
        // A new command cancels one still waiting for its parameter, as on real parts.
        self.pending = Pending::None;
        match cmd {
            CMD_READ_CTR => self.push(self.ctr, 0),
            CMD_WRITE_CTR => self.pending = Pending::WriteCtr,
            CMD_AUX_DISABLE => self.ctr |= CTR_AUXDIS,
            CMD_AUX_ENABLE => self.ctr &= !CTR_AUXDIS,
            CMD_AUX_TEST | CMD_KBD_TEST => self.push(INTERFACE_TEST_OK, 0),
            CMD_SELF_TEST => {
                // A self test leaves the system flag set, as POST does.
                self.ctr |= CTR_SYS;
                self.push(SELF_TEST_OK, 0)
            }
            CMD_KBD_DISABLE => self.ctr |= CTR_KBDDIS,
            CMD_KBD_ENABLE => self.ctr &= !CTR_KBDDIS,
            CMD_READ_INPUT_PORT => self.push(INPUT_PORT, 0),
            CMD_READ_OUTPUT_PORT => self.push(OUTPUT_PORT, 0),
            CMD_WRITE_OUTPUT_PORT => self.pending = Pending::WriteOutputPort,
            CMD_KBD_LOOP => self.pending = Pending::KbdLoop,
            CMD_AUX_LOOP => self.pending = Pending::AuxLoop,
            CMD_AUX_SEND => self.pending = Pending::AuxSend,
            // Pulsing output-port bit 0 (the CPU's reset line) low resets the machine.
            c if c >= CMD_PULSE_BASE && c & 0x1 == 0 => self.reset(),
            // Anything else (vendor commands, the multiplexer's 0x90-0x93) does nothing.
            _ => {}
        }
    }

    fn data(&mut self, value: u8) {
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::WriteCtr => self.ctr = value,
            Pending::WriteOutputPort => {
                if value & 0x1 == 0 {
                    self.reset();
                }
            }
            Pending::KbdLoop => self.push(value, 0),
            Pending::AuxLoop => self.push(value, STR_AUXDATA),
            // Nothing is plugged into either port: the byte times out.
            Pending::AuxSend => self.push(NO_DEVICE, STR_AUXDATA | STR_TIMEOUT),
            Pending::None => self.push(NO_DEVICE, STR_TIMEOUT),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CMD: u8 = COMMAND_OFFSET;
    const DATA: u8 = DATA_OFFSET;

    /// Linux's `i8042_wait_read`: polls the status for OBF, at most 10000 times (50 us apart).
    fn wait_read(dev: &mut I8042) -> Option<u8> {
        (0..10_000)
            .find(|_| dev.read(CMD) & STR_OBF != 0)
            .map(|_| dev.read(DATA))
    }

    /// Linux's `__i8042_command`: `params` bytes out, `replies` bytes back, every wait bounded.
    fn command(dev: &mut I8042, cmd: u8, params: &[u8], replies: usize) -> Option<Vec<u8>> {
        assert_eq!(dev.read(CMD) & STR_IBF, 0, "input buffer must read empty");
        dev.write(CMD, cmd).unwrap();
        for &p in params {
            assert_eq!(dev.read(CMD) & STR_IBF, 0);
            dev.write(DATA, p).unwrap();
        }
        (0..replies).map(|_| wait_read(dev)).collect()
    }

    fn controller() -> (Arc<ExitLatch>, I8042) {
        let latch = Arc::new(ExitLatch::default());
        let dev = new(latch.clone());
        (latch, dev)
    }

    #[test]
    fn kernel_probe_sequence_gets_answers_at_once() {
        // What i8042_controller_check + i8042_controller_init do at boot.
        let (latch, mut dev) = controller();
        // i8042_flush: nothing pending.
        assert_eq!(dev.read(CMD) & STR_OBF, 0);
        // Two CTR reads that must agree.
        let a = command(&mut dev, CMD_READ_CTR, &[], 1).expect("CTR read answered");
        let b = command(&mut dev, CMD_READ_CTR, &[], 1).expect("CTR read answered");
        assert_eq!(a, b);
        assert_eq!(a[0], CTR_INITIAL);
        // The key lock is open (else Linux warns "Keylock active"), the system flag set.
        assert_ne!(dev.read(CMD) & STR_KEYLOCK, 0);
        assert_ne!(dev.read(CMD) & STR_SYS, 0);
        // Write a new CTR (keyboard disabled), read it back.
        let new_ctr = (a[0] | CTR_KBDDIS) & !0x01;
        command(&mut dev, CMD_WRITE_CTR, &[new_ctr], 0).unwrap();
        assert_eq!(command(&mut dev, CMD_READ_CTR, &[], 1), Some(vec![new_ctr]));
        // The buffer is drained: nothing left for the flush.
        assert_eq!(dev.read(CMD) & STR_OBF, 0);
        assert_eq!(latch.get(), None);
    }

    #[test]
    fn self_tests_pass() {
        let (_, mut dev) = controller();
        assert_eq!(command(&mut dev, CMD_SELF_TEST, &[], 1), Some(vec![0x55]));
        assert_eq!(command(&mut dev, CMD_KBD_TEST, &[], 1), Some(vec![0x00]));
        assert_eq!(command(&mut dev, CMD_AUX_TEST, &[], 1), Some(vec![0x00]));
    }

    #[test]
    fn interfaces_enable_and_disable_through_the_ctr() {
        let (_, mut dev) = controller();
        command(&mut dev, CMD_KBD_DISABLE, &[], 0).unwrap();
        command(&mut dev, CMD_AUX_DISABLE, &[], 0).unwrap();
        let ctr = command(&mut dev, CMD_READ_CTR, &[], 1).unwrap()[0];
        assert_eq!(ctr & (CTR_KBDDIS | CTR_AUXDIS), CTR_KBDDIS | CTR_AUXDIS);
        command(&mut dev, CMD_KBD_ENABLE, &[], 0).unwrap();
        command(&mut dev, CMD_AUX_ENABLE, &[], 0).unwrap();
        let ctr = command(&mut dev, CMD_READ_CTR, &[], 1).unwrap()[0];
        assert_eq!(ctr & (CTR_KBDDIS | CTR_AUXDIS), 0);
    }

    #[test]
    fn loop_back_writes_come_back_from_the_right_port() {
        let (_, mut dev) = controller();
        dev.write(CMD, CMD_AUX_LOOP).unwrap();
        dev.write(DATA, 0x5a).unwrap();
        assert_eq!(
            dev.read(CMD) & (STR_OBF | STR_AUXDATA),
            STR_OBF | STR_AUXDATA
        );
        assert_eq!(dev.read(DATA), 0x5a);
        assert_eq!(
            command(&mut dev, CMD_KBD_LOOP, &[0xa5], 1),
            Some(vec![0xa5])
        );
        assert_eq!(dev.read(CMD) & STR_OBF, 0);
    }

    #[test]
    fn bytes_for_absent_devices_time_out() {
        let (_, mut dev) = controller();
        // A keyboard command (reset) with no keyboard, then a mouse byte with no mouse.
        dev.write(DATA, 0xff).unwrap();
        assert_eq!(
            dev.read(CMD) & (STR_OBF | STR_TIMEOUT),
            STR_OBF | STR_TIMEOUT
        );
        assert_eq!(dev.read(DATA), 0xff);
        dev.write(CMD, CMD_AUX_SEND).unwrap();
        dev.write(DATA, 0xf2).unwrap();
        assert_ne!(dev.read(CMD) & STR_AUXDATA, 0);
        assert_eq!(dev.read(DATA), 0xff);
        assert_eq!(dev.read(CMD) & (STR_OBF | STR_TIMEOUT), 0);
    }

    #[test]
    fn output_queue_is_bounded() {
        let (_, mut dev) = controller();
        for i in 0..100u8 {
            command(&mut dev, CMD_KBD_LOOP, &[i], 0).unwrap();
        }
        let drained: Vec<u8> = std::iter::from_fn(|| wait_read(&mut dev))
            .take(200)
            .collect();
        assert_eq!(drained, (84..100).collect::<Vec<u8>>());
    }

    #[test]
    fn reset_command_requests_vm_reset() {
        // arch/x86/kernel/reboot.c: wait for an empty input buffer, then 0xfe.
        let (latch, mut dev) = controller();
        assert_eq!(dev.read(CMD) & STR_IBF, 0);
        dev.write(CMD, 0xfe).unwrap();
        assert_eq!(latch.get(), Some(VmExit::Reset));
    }

    #[test]
    fn output_port_write_with_reset_line_low_resets() {
        let (latch, mut dev) = controller();
        assert_eq!(
            command(&mut dev, CMD_READ_OUTPUT_PORT, &[], 1),
            Some(vec![OUTPUT_PORT])
        );
        command(&mut dev, CMD_WRITE_OUTPUT_PORT, &[OUTPUT_PORT], 0).unwrap();
        assert_eq!(latch.get(), None, "reset line kept high");
        command(&mut dev, CMD_WRITE_OUTPUT_PORT, &[OUTPUT_PORT & !1], 0).unwrap();
        assert_eq!(latch.get(), Some(VmExit::Reset));
    }

    #[test]
    fn other_commands_do_not_reset() {
        let (latch, mut dev) = controller();
        for cmd in [0xad, 0xae, 0xa7, 0xa8, 0x20, 0xaa, 0xff, 0xf1, 0x90] {
            dev.write(CMD, cmd).unwrap();
        }
        assert_eq!(latch.get(), None);
        assert_eq!(offset(0x61), None);
    }
}
