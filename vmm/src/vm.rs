//! The VM as a whole: validate the configuration, open KVM, build memory, boot structures and
//! devices, then run one thread per vCPU until something ends it.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::{boot_params, cpuid, layout, mptable, paging, regs};
use crate::devices::virtio::{mmio::MmioTransport, VirtioDevice};
use crate::devices::{i8042, serial, Bus, MmioDevice};
use crate::error::{kvm, Error, Result};
use crate::exit::ExitLatch;
use crate::loader;
use crate::memory::{self, GuestMemoryMmap};
use crate::pause::PauseGate;
use crate::vcpu::{self, Vcpu};

mod config;
mod running;

pub use config::{SerialOutput, VmConfig, KVM_PATH, MAX_MEM_MIB, MIN_MEM_MIB, PAUSE_TIMEOUT};
pub use running::{RunningVm, VmReport};

/// Opens the KVM device, telling "absent" from "present but unusable".
pub fn open_kvm(path: &Path) -> Result<Kvm> {
    let file = match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::KvmAbsent),
        Err(e) => return Err(Error::KvmAccess(e)),
    };
    // SAFETY: we own the descriptor we just opened; Kvm takes it over.
    let kvm_fd = unsafe { Kvm::from_raw_fd(file.into_raw_fd()) };
    let version = kvm_fd.get_api_version();
    if version != 12 {
        return Err(Error::KvmApiVersion(version));
    }
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    ] {
        if !kvm_fd.check_extension(cap) {
            return Err(Error::KvmCapability(name));
        }
    }
    Ok(kvm_fd)
}

/// Writes the command line and the zero page that points at it.
fn write_boot_params(
    mem: &GuestMemoryMmap,
    cmdline: &str,
    kernel: &loader::LoadedKernel,
    initramfs: Option<(u64, u64)>,
    mem_size: u64,
) -> Result<()> {
    let len = loader::load_cmdline(mem, cmdline)?;
    let params = boot_params::build(&boot_params::BootParamsInput {
        setup_header: kernel.setup_header,
        cmdline_addr: layout::CMDLINE_ADDR,
        cmdline_len: len,
        initramfs,
        mem_size,
    });
    boot_params::write(mem, &params)
}

/// A VM built and ready to run.
pub struct Vm {
    _kvm: Kvm,
    vm_fd: VmFd,
    mem: GuestMemoryMmap,
    bus: Bus,
    vcpus: Vec<Vcpu>,
    latch: Arc<ExitLatch>,
    created: Instant,
    boot: BootInputs,
    /// The virtio transports (also on the bus), to quiesce their devices on pause.
    virtio: Vec<Arc<Mutex<MmioTransport>>>,
    seccomp: Option<seccompiler::BpfProgram>,
}

/// What the zero page is built from, kept so attaching a device can extend the command line.
struct BootInputs {
    cmdline: String,
    kernel: loader::LoadedKernel,
    initramfs: Option<(u64, u64)>,
    mem_size: u64,
}

/// Where an attached virtio-mmio device lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioSlot {
    /// Guest physical base of its register window.
    pub base: u64,
    /// Its IRQ (IO-APIC pin and KVM GSI).
    pub irq: u32,
}

impl VirtioSlot {
    /// The kernel parameter that declares this device (`virtio_mmio.device=<size>@<addr>:<irq>`).
    pub fn cmdline_param(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            layout::MMIO_DEVICE_SIZE >> 10,
            self.base,
            self.irq
        )
    }
}

impl Vm {
    /// Attaches a virtio device behind a new virtio-mmio window: registers an ioeventfd per
    /// queue on QueueNotify and an irqfd for its interrupt, and declares it on the kernel
    /// command line. Must be called before [`Vm::start`].
    pub fn add_virtio_device(&mut self, device: Box<dyn VirtioDevice>) -> Result<VirtioSlot> {
        let index = self.virtio.len() as u32;
        let irq = layout::VIRTIO_IRQ_BASE + index;
        if irq > layout::IRQ_MAX {
            return Err(Error::Device(format!(
                "no IRQ left for another virtio device (max {})",
                layout::IRQ_MAX - layout::VIRTIO_IRQ_BASE + 1
            )));
        }
        let slot = VirtioSlot {
            base: layout::MMIO_DEVICES_START + u64::from(index) * layout::MMIO_DEVICE_SIZE,
            irq,
        };
        let transport = MmioTransport::new(device, self.mem.clone())
            .map_err(|e| Error::Device(format!("virtio-mmio transport: {e}")))?;
        for (i, evt) in transport.queue_evts().iter().enumerate() {
            let addr = IoEventAddress::Mmio(slot.base + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY));
            self.vm_fd
                .register_ioevent(evt, &addr, i as u32)
                .map_err(kvm("KVM_IOEVENTFD"))?;
        }
        self.vm_fd
            .register_irqfd(transport.interrupt().irq_fd(), irq)
            .map_err(kvm("KVM_IRQFD (virtio)"))?;
        let mut cmdline = self.boot.cmdline.clone();
        cmdline.push(' ');
        cmdline.push_str(&slot.cmdline_param());
        write_boot_params(
            &self.mem,
            &cmdline,
            &self.boot.kernel,
            self.boot.initramfs,
            self.boot.mem_size,
        )?;
        self.boot.cmdline = cmdline;
        let transport = Arc::new(Mutex::new(transport));
        self.bus
            .add_mmio(slot.base, layout::MMIO_DEVICE_SIZE, transport.clone());
        self.virtio.push(transport);
        Ok(slot)
    }

    /// The kernel command line as the guest will see it.
    pub fn cmdline(&self) -> &str {
        &self.boot.cmdline
    }

    /// Builds the VM: everything up to (not including) the first KVM_RUN.
    pub fn create(config: VmConfig) -> Result<Vm> {
        let created = Instant::now();
        config.validate()?;
        let kvm_fd = open_kvm(&config.kvm_path)?;
        let max_vcpus = kvm_fd.get_max_vcpus().min(mptable::MAX_CPUS as usize);
        if usize::from(config.vcpus) > max_vcpus {
            return Err(Error::VcpuCount {
                got: config.vcpus.into(),
                max: max_vcpus as u64,
            });
        }
        let vm_fd = kvm_fd.create_vm().map_err(kvm("KVM_CREATE_VM"))?;
        let mem_size = config.mem_mib << 20;
        let mem = memory::create_guest_memory(mem_size)?;
        memory::register_with_kvm(&vm_fd, &mem)?;
        vm_fd
            .set_tss_address(layout::KVM_TSS_ADDR as usize)
            .map_err(kvm("KVM_SET_TSS_ADDR"))?;
        vm_fd.create_irq_chip().map_err(kvm("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm("KVM_CREATE_PIT2"))?;

        // The kernel and initramfs go in RAM below the MMIO hole.
        let low_end = memory::low_ram_end(mem_size);
        let kernel = loader::load_kernel(&mem, low_end, &config.kernel)?;
        let initramfs = match &config.initramfs {
            Some(p) => Some(loader::load_initramfs(&mem, low_end, &kernel, p)?),
            None => None,
        };
        regs::write_descriptor_tables(&mem)?;
        paging::setup(&mem)?;
        mptable::setup(&mem, config.vcpus)?;

        let base_cpuid = cpuid::supported(&kvm_fd)?;
        let guest = Arc::new(vcpu::GuestView {
            mem: mem.clone(),
            symbols: kernel.symbols,
            phys_bits: cpuid::phys_bits(base_cpuid.as_slice()),
        });
        let mut vcpus = Vec::with_capacity(config.vcpus.into());
        for cpu in 0..config.vcpus {
            let fd = vm_fd
                .create_vcpu(cpu.into())
                .map_err(kvm("KVM_CREATE_VCPU"))?;
            fd.set_cpuid2(&cpuid::for_vcpu(&base_cpuid, cpu, config.vcpus))
                .map_err(kvm("KVM_SET_CPUID2"))?;
            regs::setup_lint(&fd)?;
            // Only the boot CPU starts at the kernel entry; the others wait for INIT/SIPI, but
            // giving them sane long-mode state costs nothing.
            regs::setup(&fd, kernel.entry)?;
            vcpus.push(Vcpu {
                cpu,
                fd,
                guest: guest.clone(),
            });
        }

        write_boot_params(&mem, &config.cmdline, &kernel, initramfs, mem_size)?;

        let latch = Arc::new(ExitLatch::default());
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| Error::Host {
            what: "serial eventfd",
            source,
        })?;
        vm_fd
            .register_irqfd(&irq, layout::SERIAL_IRQ)
            .map_err(kvm("KVM_IRQFD (serial)"))?;
        // Opened last so a failure above leaves no console file behind.
        let out: Box<dyn Write + Send> = match config.serial {
            SerialOutput::Sink => Box::new(std::io::sink()),
            SerialOutput::Writer(w) => w,
            SerialOutput::File(p) => Box::new(serial::Capped::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&p)
                    .map_err(|source| Error::SerialOutput {
                        path: p.clone(),
                        source,
                    })?,
                serial::CONSOLE_LOG_CAP,
            )),
        };
        let bus = Bus::new(serial::new(irq, out), i8042::new(latch.clone()));

        let seccomp = if config.seccomp {
            Some(crate::seccomp::vcpu_filter(
                seccompiler::SeccompAction::KillProcess,
            )?)
        } else {
            None
        };
        let boot = BootInputs {
            cmdline: config.cmdline,
            kernel,
            initramfs,
            mem_size,
        };
        Ok(Vm {
            _kvm: kvm_fd,
            vm_fd,
            mem,
            bus,
            vcpus,
            latch,
            created,
            boot,
            virtio: Vec::new(),
            seccomp,
        })
    }

    /// Guest memory (for device back ends).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The KVM VM fd (for ioeventfd/irqfd registration by devices).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }

    /// Puts an MMIO device on the bus.
    pub fn add_mmio_device(&mut self, base: u64, len: u64, dev: Arc<Mutex<dyn MmioDevice>>) {
        self.bus.add_mmio(base, len, dev);
    }

    /// Starts one thread per vCPU.
    pub fn start(self) -> Result<RunningVm> {
        vcpu::install_kick_handler()?;
        let bus = Arc::new(self.bus);
        let stop = Arc::new(AtomicBool::new(false));
        let gate = Arc::new(PauseGate::default());
        let mut threads = Vec::new();
        for v in self.vcpus {
            match v.spawn(
                bus.clone(),
                self.latch.clone(),
                stop.clone(),
                gate.clone(),
                self.seccomp.clone(),
            ) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    stop.store(true, Ordering::Release);
                    for t in &mut threads {
                        t.stop_and_join(Duration::from_secs(2));
                    }
                    return Err(e);
                }
            }
        }
        Ok(RunningVm {
            _kvm: self._kvm,
            _vm_fd: self.vm_fd,
            _mem: self.mem,
            _bus: bus,
            threads,
            latch: self.latch,
            stop,
            gate,
            virtio: self.virtio,
            created: self.created,
        })
    }
}
