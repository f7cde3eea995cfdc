//! rootcell's built-in VMM: a KVM microVM on rust-vmm crates.
//!
//! It boots a Linux guest the way Firecracker does — no firmware, straight into the kernel's
//! 64-bit entry point — with a serial console and virtio-mmio devices.
//!
//! # Reading order
//! - [`vm`]: the whole life of a VM ([`vm::VmConfig`] -> [`vm::Vm::create`] -> [`vm::Vm::start`]
//!   -> [`vm::RunningVm::stop`]); start here.
//! - [`memory`]: guest RAM (one memfd, shareable with device back ends).
//! - [`loader`]: kernel (ELF or bzImage), initramfs, command line into guest RAM.
//! - [`arch::x86_64`]: the boot-time structures — [`arch::x86_64::layout`] (where everything
//!   goes), `boot_params`, `gdt`, `paging`, `mptable`, `cpuid`, `regs`.
//! - [`vcpu`]: the vCPU threads and how they are stopped; [`pause`]: how they are parked while
//!   the VM is paused ([`vm::RunningVm::pause`]).
//! - [`devices`]: the I/O bus, COM1 serial, i8042 (a controller with nothing plugged in; its
//!   reset line ends the VM), and the virtio devices:
//!   [`devices::virtio::vsock`] and [`devices::virtio::fs`] wrap the device logic the QEMU backend
//!   serves over vhost-user, [`devices::virtio::net`] moves frames to and from a tap; each runs
//!   on its own I/O thread.
//! - [`builder`]: the entry point for the runtime: one container's configuration in, its
//!   running VM with the vsock, virtio-fs and virtio-net devices out.
//! - [`seccomp`]: the syscall allowlists for vCPU, device I/O and VMM control threads;
//!   [`jail`]: the hook through which the runtime jails those threads.
//! - [`exit`]: why a VM ended; [`error`]: why it could not start.
//!
//! # Example
//! ```no_run
//! use std::time::Duration;
//! use rootcell_vmm::vm::{SerialOutput, Vm, VmConfig};
//! let mut config = VmConfig::new("/path/to/vmlinux", "console=ttyS0 reboot=k panic=-1");
//! config.serial = SerialOutput::File("/tmp/console.log".into());
//! let running = Vm::create(config)?.start()?;
//! let exit = running.wait_timeout(Duration::from_secs(30));
//! let report = running.stop();
//! println!("{exit:?} {report:?}");
//! # Ok::<(), rootcell_vmm::Error>(())
//! ```

pub mod arch;
pub mod builder;
pub mod devices;
pub mod error;
pub mod exit;
pub mod jail;
pub mod loader;
pub mod memory;
pub mod pause;
pub mod seccomp;
pub mod vcpu;
pub mod vm;

pub use error::{Error, Result};
pub use exit::VmExit;
pub use vm::{RunningVm, SerialOutput, Vm, VmConfig, VmReport};
