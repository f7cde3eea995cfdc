//! One vCPU thread: runs KVM_RUN in a loop, hands I/O exits to the bus, and turns the exits
//! that end a VM into a [`VmExit`]. The owner stops it by setting the stop flag and kicking the
//! thread with a signal, which makes KVM_RUN return EINTR; it pauses it the same way through a
//! [`PauseGate`], where the thread parks until resumed.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::x86_64::ptwalk::{self, FaultRegs, KernelSymbols};
use crate::devices::{lock, Bus};
use crate::error::{Error, Result};
use crate::exit::{ExitLatch, VmExit};
use crate::memory::GuestMemoryMmap;
use crate::pause::PauseGate;

/// What a vCPU was last seen doing, for reports when a guest does not get where it should.
#[derive(Debug, Clone, Default)]
pub struct VcpuStatus {
    /// vCPU index.
    pub cpu: u8,
    /// When the first KVM_RUN was issued.
    pub first_run: Option<Instant>,
    /// CPU time the whole process had used at the first KVM_RUN.
    pub first_run_cpu: Option<Duration>,
    /// Number of exits to user space.
    pub exits: u64,
    /// The last exit (or ioctl error), as text.
    pub last_exit: String,
    /// Instruction pointer read after the thread stopped.
    pub rip: Option<u64>,
    /// CR3 read after the thread stopped: with the RIP, whether the state KVM holds for the
    /// guest is the guest's at all (in L1, a hung guest was seen with L1's own RIP and page
    /// tables as its state).
    pub cr3: Option<u64>,
    /// Whether the guest could take interrupts when the thread stopped, read then: RFLAGS.IF
    /// and its local APIC's priorities and interrupts in service and pending
    /// ([`interrupt_state`]). A guest that waits for ever on a device with an interrupt
    /// pending here, or an in-service vector that never ended, was not taking interrupts.
    pub interrupts: Option<String>,
    /// The exits before the last one, oldest first (at most [`RECENT_EXITS`]): what the guest
    /// was doing just before it ended the VM.
    pub recent_exits: VecDeque<String>,
    /// The vCPU's registers read right at a KVM_EXIT_SHUTDOWN (a triple fault), as text; see
    /// [`shutdown_state`].
    pub shutdown_state: Option<String>,
    /// The guest's page tables read from its memory at that exit (a few lines, see
    /// [`ptwalk::shutdown_report`]): whether the kernel's top-level table is sane.
    pub page_walk: Option<String>,
}

/// How many exits before the last one a [`VcpuStatus`] keeps.
pub const RECENT_EXITS: usize = 4;

/// Whether `regs`/`sregs` are the INIT state (CS:IP F000:FFF0): on AMD, KVM re-initialises a
/// vCPU when it reports KVM_EXIT_SHUTDOWN (SVM leaves the VMCB undefined after a shutdown
/// intercept), so there the registers say nothing about where the guest faulted; on Intel they
/// are the faulting context.
pub fn is_init_state(regs: &kvm_regs, sregs: &kvm_sregs) -> bool {
    regs.rip == 0xfff0 && sregs.cs.selector == 0xf000
}

/// One line with the registers that tell where and how a guest triple-faulted: the
/// instruction and stack, the paging and mode registers, CR2 (the last page-fault address),
/// the descriptor tables and the code segment.
pub fn shutdown_state(regs: &kvm_regs, sregs: &kvm_sregs) -> String {
    let mut s = format!(
        "rip={:#x} rsp={:#x} rflags={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} \
         cs={:#x}(base {:#x}, l={}) idt={:#x}/{:#x} gdt={:#x}/{:#x} rax={:#x} rsi={:#x}",
        regs.rip,
        regs.rsp,
        regs.rflags,
        sregs.cr0,
        sregs.cr2,
        sregs.cr3,
        sregs.cr4,
        sregs.efer,
        sregs.cs.selector,
        sregs.cs.base,
        sregs.cs.l,
        sregs.idt.base,
        sregs.idt.limit,
        sregs.gdt.base,
        sregs.gdt.limit,
        regs.rax,
        regs.rsi,
    );
    if is_init_state(regs, sregs) {
        s.push_str(
            " (the INIT state: KVM reset the vCPU at the shutdown, as it does on AMD; not where it faulted)",
        );
    }
    s
}

/// The vectors set in the local APIC's 256-bit register that starts at `offset` (ISR, TMR,
/// IRR: eight 32-bit words, 16 bytes apart).
fn apic_vectors(regs: &[std::os::raw::c_char], offset: usize) -> Vec<String> {
    (0..8)
        .flat_map(|word| {
            let at = offset + word * 16;
            let bytes: Vec<u8> = regs[at..at + 4].iter().map(|&b| b as u8).collect();
            let bits = u32::from_le_bytes(bytes.try_into().expect("four bytes"));
            (0..32)
                .filter(move |bit| bits & (1 << bit) != 0)
                .map(move |bit| format!("{:#x}", word * 32 + bit))
        })
        .collect()
}

/// `if <RFLAGS.IF> tpr <TPR> ppr <PPR> isr [<vectors in service>] irr [<vectors pending>]`, or
/// without the APIC part if it could not be read. Linux's vectors: 0x30 + n for ISA IRQ n
/// (the virtio-mmio devices' IRQs 5.. are 0x35..), the local timer 0xec.
pub fn interrupt_state(rflags: u64, lapic: Option<&kvm_bindings::kvm_lapic_state>) -> String {
    const RFLAGS_IF: u64 = 1 << 9;
    let mut s = format!("if {}", u8::from(rflags & RFLAGS_IF != 0));
    if let Some(l) = lapic {
        let reg = |off: usize| l.regs[off] as u8;
        s.push_str(&format!(
            " tpr {:#x} ppr {:#x} isr [{}] irr [{}]",
            reg(0x80),
            reg(0xa0),
            apic_vectors(&l.regs, 0x100).join(" "),
            apic_vectors(&l.regs, 0x200).join(" "),
        ));
    }
    s
}

/// The registers as [`ptwalk::shutdown_report`] uses them, if they are the faulting context
/// (not the INIT state).
pub fn fault_regs(regs: &kvm_regs, sregs: &kvm_sregs) -> Option<FaultRegs> {
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const CR4_LA57: u64 = 1 << 12;
    const EFER_LMA: u64 = 1 << 10;
    (!is_init_state(regs, sregs)).then_some(FaultRegs {
        rip: regs.rip,
        cr3: sregs.cr3,
        idt_base: sregs.idt.base,
        four_level: sregs.cr0 & CR0_PG != 0
            && sregs.cr4 & CR4_PAE != 0
            && sregs.cr4 & CR4_LA57 == 0
            && sregs.efer & EFER_LMA != 0,
    })
}

/// What a vCPU thread reads of the guest at a triple fault, besides its registers.
#[derive(Debug, Clone)]
pub struct GuestView {
    /// Guest RAM.
    pub mem: GuestMemoryMmap,
    /// The guest kernel's symbols (empty without an ELF symbol table).
    pub symbols: KernelSymbols,
    /// The guest's physical-address width (CPUID 0x80000008 EAX bits 7:0).
    pub phys_bits: u8,
}

/// Signal used to kick a vCPU out of KVM_RUN.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, while it runs a vCPU (null otherwise).
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// Interrupts KVM_RUN, and makes the next KVM_RUN return at once in case the kick landed just
/// before it (see [`crate::pause`]).
extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // A const-initialised thread-local without a destructor is a plain TLS read: signal-safe.
    let _ = IMMEDIATE_EXIT.try_with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: set by this thread to a field of its vCPU's kvm_run mapping, and cleared
            // before that mapping goes away.
            unsafe { p.write_volatile(1) };
        }
    });
}

/// Installs the kick handler once per process; its only job is to interrupt KVM_RUN.
pub fn install_kick_handler() -> Result<()> {
    static ONCE: Once = Once::new();
    static mut RESULT: Option<i32> = None;
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), kick_handler) {
            // SAFETY: written only here, inside call_once, before any read below.
            unsafe { RESULT = Some(e.errno()) };
        }
    });
    // SAFETY: call_once has completed, so no concurrent writer exists.
    match unsafe { RESULT } {
        Some(errno) => Err(Error::Host {
            what: "installing the vCPU kick signal handler",
            source: std::io::Error::from_raw_os_error(errno),
        }),
        None => Ok(()),
    }
}

/// A vCPU ready to be run on its own thread.
pub struct Vcpu {
    /// vCPU index.
    pub cpu: u8,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// The guest, for the page-table report at a triple fault.
    pub guest: Arc<GuestView>,
}

/// A running vCPU thread.
pub struct VcpuThread {
    handle: Option<JoinHandle<()>>,
    status: Arc<Mutex<VcpuStatus>>,
}

fn describe(exit: &VcpuExit<'_>) -> String {
    match exit {
        VcpuExit::IoIn(port, d) => format!("IoIn port {port:#x} len {}", d.len()),
        VcpuExit::IoOut(port, d) => format!("IoOut port {port:#x} len {}", d.len()),
        VcpuExit::MmioRead(a, d) => format!("MmioRead {a:#x} len {}", d.len()),
        VcpuExit::MmioWrite(a, d) => format!("MmioWrite {a:#x} len {}", d.len()),
        other => format!("{other:?}"),
    }
}

impl Vcpu {
    /// Starts the thread; it runs until `stop` is set (and it is kicked) or the VM exits, and
    /// parks while `gate` asks it to. With `seccomp`, the thread drops every capability and
    /// installs the filter before its first KVM_RUN.
    pub fn spawn(
        self,
        bus: Arc<Bus>,
        latch: Arc<ExitLatch>,
        stop: Arc<AtomicBool>,
        gate: Arc<PauseGate>,
        seccomp: Option<seccompiler::BpfProgram>,
    ) -> Result<VcpuThread> {
        let status = Arc::new(Mutex::new(VcpuStatus {
            cpu: self.cpu,
            ..Default::default()
        }));
        let st = status.clone();
        let handle =
            std::thread::Builder::new()
                .name(format!("vcpu{}", self.cpu))
                .spawn(move || {
                    if let Some(filter) = seccomp {
                        // A vCPU thread needs no capability: KVM_RUN on fds it already holds.
                        // The runtime's jail first (it needs the capabilities dropped next), which
                        // may also turn the rest off.
                        let jailed = crate::jail::enter(crate::jail::ThreadKind::Vcpu, None)
                            .map_err(|e| crate::Error::Host {
                                what: "jailing a vCPU thread",
                                source: std::io::Error::other(e),
                            });
                        if let Err(e) = jailed.and_then(|confine| match confine {
                            crate::jail::Confine::Fully => crate::seccomp::keep_caps(&[])
                                .and_then(|()| crate::seccomp::apply(&filter)),
                            crate::jail::Confine::Not => Ok(()),
                        }) {
                            latch.request(VmExit::Error {
                                cpu: self.cpu,
                                message: e.to_string(),
                            });
                            return;
                        }
                    }
                    let cpu = self.cpu;
                    latch.guard_vcpu(cpu, || self.run(&bus, &latch, &stop, &gate, &st))
                })
                .map_err(|source| Error::Host {
                    what: "spawning a vCPU thread",
                    source,
                })?;
        Ok(VcpuThread {
            handle: Some(handle),
            status,
        })
    }

    fn run(
        mut self,
        bus: &Bus,
        latch: &ExitLatch,
        stop: &AtomicBool,
        gate: &PauseGate,
        status: &Mutex<VcpuStatus>,
    ) {
        let immediate_exit = std::ptr::addr_of_mut!(self.fd.get_kvm_run().immediate_exit);
        IMMEDIATE_EXIT.with(|p| p.set(immediate_exit));
        self.run_loop(bus, latch, stop, gate, status);
        // Before the vCPU fd (and its kvm_run mapping) is dropped with `self`.
        IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
        let regs = self.fd.get_regs().ok();
        let sregs = self.fd.get_sregs().ok();
        let lapic = self.fd.get_lapic().ok();
        let mut s = lock(status);
        s.rip = regs.map(|r| r.rip);
        s.cr3 = sregs.map(|r| r.cr3);
        s.interrupts = regs.map(|r| interrupt_state(r.rflags, lapic.as_ref()));
    }

    fn run_loop(
        &mut self,
        bus: &Bus,
        latch: &ExitLatch,
        stop: &AtomicBool,
        gate: &PauseGate,
        status: &Mutex<VcpuStatus>,
    ) {
        let cpu = self.cpu;
        {
            let mut s = lock(status);
            s.first_run = Some(Instant::now());
            s.first_run_cpu = process_cpu_time();
        }
        while !stop.load(Ordering::Acquire) {
            if gate.requested() {
                gate.park(stop);
                continue;
            }
            let result = self.fd.run();
            let kicked = matches!(&result, Err(e) if e.errno() == libc::EINTR);
            // A triple fault (or a halt for good, without the in-kernel irqchip's help).
            let shut_down = matches!(&result, Ok(VcpuExit::Shutdown) | Ok(VcpuExit::Hlt));
            let mut end: Option<VmExit> = None;
            let text = match &result {
                Ok(exit) => describe(exit),
                Err(e) => format!("KVM_RUN error: {e}"),
            };
            match result {
                Ok(VcpuExit::IoIn(port, data)) => bus.pio_read(port, data),
                Ok(VcpuExit::IoOut(port, data)) => bus.pio_write(port, data),
                Ok(VcpuExit::MmioRead(addr, data)) => bus.mmio_read(addr, data),
                Ok(VcpuExit::MmioWrite(addr, data)) => bus.mmio_write(addr, data),
                // With the in-kernel irqchip HLT is handled by KVM; seeing it here means the
                // guest halted for good (e.g. `halt` with interrupts off).
                Ok(VcpuExit::Hlt) | Ok(VcpuExit::Shutdown) => end = Some(VmExit::Shutdown),
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    end = Some(if kind == kvm_bindings::KVM_SYSTEM_EVENT_RESET {
                        VmExit::Reset
                    } else {
                        VmExit::Shutdown
                    })
                }
                Ok(VcpuExit::FailEntry(..))
                | Ok(VcpuExit::InternalError)
                | Ok(VcpuExit::Unknown) => {
                    end = Some(VmExit::Error {
                        cpu,
                        message: text.clone(),
                    })
                }
                Ok(_) => {}
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(_) => {
                    end = Some(VmExit::Error {
                        cpu,
                        message: text.clone(),
                    })
                }
            }
            let text = if text == "InternalError" {
                self.internal_error_detail()
            } else {
                text
            };
            if kicked {
                // The kick set immediate_exit; the loop looks at the stop and pause requests
                // (raised before the kick) below and at its top, so clearing it now loses none.
                self.fd.set_kvm_immediate_exit(0);
            }
            if let Some(VmExit::Error { message, .. }) = &mut end {
                message.clone_from(&text);
            }
            // Read before anything else touches the vCPU: the only trace of a triple fault.
            // Guest memory is intact, so the page tables are read too (without a syscall: the
            // vCPU thread's seccomp filter stays as it is).
            let shutdown = shut_down.then(|| {
                let (state, regs) = match (self.fd.get_regs(), self.fd.get_sregs()) {
                    (Ok(r), Ok(sr)) => (shutdown_state(&r, &sr), fault_regs(&r, &sr)),
                    (Err(e), _) | (_, Err(e)) => (format!("registers unreadable: {e}"), None),
                };
                let g = &self.guest;
                // The report reads memory the guest may have wrecked: a bug of the report's
                // must not cost the shutdown itself.
                let walk = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    ptwalk::shutdown_report(&g.mem, &g.symbols, regs, g.phys_bits)
                }))
                .unwrap_or_else(|p| {
                    format!(
                        "page-table report failed: {}",
                        crate::exit::panic_text(p.as_ref())
                    )
                });
                (state, walk)
            });
            {
                let mut s = lock(status);
                s.exits += 1;
                let before = std::mem::replace(&mut s.last_exit, text);
                if !before.is_empty() {
                    if s.recent_exits.len() == RECENT_EXITS {
                        s.recent_exits.pop_front();
                    }
                    s.recent_exits.push_back(before);
                }
                if let Some((state, walk)) = shutdown {
                    s.shutdown_state = Some(state);
                    s.page_walk = Some(walk);
                }
            }
            if let Some(exit) = end {
                latch.request(exit);
                break;
            }
            // A device (i8042 reset) or another vCPU ended the VM: do not re-enter the guest.
            if latch.is_set() {
                break;
            }
        }
    }
}

/// CPU time (user + system) consumed by the whole process so far.
pub fn process_cpu_time() -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer for clock_gettime.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    (rc == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

impl Vcpu {
    /// KVM_EXIT_INTERNAL_ERROR carries a sub-error (1 = emulation failure) and raw data words.
    fn internal_error_detail(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the active member.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        format!(
            "InternalError suberror {} data {:x?}",
            internal.suberror,
            &internal.data[..n]
        )
    }
}

impl VcpuThread {
    /// A snapshot of the vCPU's status.
    pub fn status(&self) -> VcpuStatus {
        lock(&self.status).clone()
    }

    /// Whether the thread is still running (it ends when the VM ends or is stopped).
    pub fn is_running(&self) -> bool {
        self.handle.as_ref().is_some_and(|h| !h.is_finished())
    }

    /// Sends the kick signal: the thread leaves (or does not enter) KVM_RUN once.
    pub fn kick(&self) {
        if let Some(h) = &self.handle {
            // The handle is not joined, so the pthread id is valid even if the thread just ended.
            let _ = h.kill(kick_signal());
        }
    }

    /// Kicks the thread until it leaves KVM_RUN and joins it, for at most `timeout`. The
    /// caller has set the stop flag. Returns false if the thread did not stop in time (it is
    /// then left detached rather than hanging the caller).
    pub fn stop_and_join(&mut self, timeout: Duration) -> bool {
        let Some(handle) = self.handle.take() else {
            return true;
        };
        let deadline = Instant::now() + timeout;
        while !handle.is_finished() {
            if Instant::now() >= deadline {
                return false;
            }
            // The handle is not joined yet, so the pthread id is still valid even if the thread
            // has just exited. A kick that lands before KVM_RUN starts is lost, hence the loop.
            let _ = handle.kill(kick_signal());
            std::thread::sleep(Duration::from_millis(5));
        }
        handle.join().is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutdown_state_names_the_faulting_context() {
        let regs = kvm_regs {
            rip: 0xffff_ffff_8100_0123,
            rsp: 0xffff_c900_0000_3f00,
            ..Default::default()
        };
        let mut sregs = kvm_sregs {
            cr2: 0xdead_b000,
            ..Default::default()
        };
        sregs.cs.selector = 0x10;
        sregs.idt.base = 0xffff_fe00_0000_0000;
        sregs.idt.limit = 0xfff;
        let s = shutdown_state(&regs, &sregs);
        assert!(s.contains("rip=0xffffffff81000123"), "{s}");
        assert!(s.contains("cr2=0xdeadb000"), "{s}");
        assert!(s.contains("idt=0xfffffe0000000000/0xfff"), "{s}");
        assert!(!s.contains("INIT state"), "{s}");
    }

    #[test]
    fn interrupt_state_lists_the_apic_vectors_in_service_and_pending() {
        let mut l = kvm_bindings::kvm_lapic_state::default();
        l.regs[0xa0] = 0x30; // PPR
                             // ISR: vector 0x35 (word 1, bit 21); IRR: 0x35 and 0xec (word 7, bit 12).
        l.regs[0x110 + 2] = 0x20;
        l.regs[0x210 + 2] = 0x20;
        l.regs[0x270 + 1] = 0x10;
        assert_eq!(
            interrupt_state(0x202, Some(&l)),
            "if 1 tpr 0x0 ppr 0x30 isr [0x35] irr [0x35 0xec]"
        );
        assert_eq!(interrupt_state(0x2, None), "if 0");
    }

    #[test]
    fn reset_registers_are_called_what_they_are() {
        let regs = kvm_regs {
            rip: 0xfff0,
            ..Default::default()
        };
        let mut sregs = kvm_sregs::default();
        sregs.cs.selector = 0xf000;
        sregs.cs.base = 0xffff_0000;
        assert!(is_init_state(&regs, &sregs));
        assert!(shutdown_state(&regs, &sregs).contains("the INIT state"));
    }
}
