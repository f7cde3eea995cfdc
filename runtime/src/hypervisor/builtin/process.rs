//! The built-in VMM's own process (issue 16): `rootcell builtin-vmm`, started by
//! `Builtin::start` ([`super::Builtin`]) with a control socket as its stdin and the taps
//! inherited by number. It builds and starts the VM as root (its vCPU and device threads jail themselves,
//! see [`crate::jail::vmm`]), reports [`Report::Started`], and then its own threads (the
//! control thread and the one waiting for the VM's end) also drop everything: a root of their
//! own holding nothing, the unprivileged uid [`crate::jail::UID_BASE`] + pid without
//! capabilities, and a seccomp filter that allows only what waiting, pausing and stopping the
//! VM take ([`rootcell_vmm::seccomp::control_filter`]); none of it if `ROOTCELL_JAIL` turns
//! the VMM's half of the jail off ([`crate::jail::Halves`]). So no thread that shares an address space
//! with the guest-facing code is root with capabilities, and the sandbox process holds no
//! part of the VM.
//!
//! The process dies with the sandbox (PR_SET_PDEATHSIG, set again after its change of uid),
//! and ends itself when the guest ends the VM, on [`Request::Stop`], or when the sandbox
//! hangs up.

use super::wire::{self, Launch, Report, Request, Slot};
use rootcell_vmm::builder::{BuiltinConfig, BuiltinVm, NetConfig, RunningBuiltinVm};
use rootcell_vmm::{VmExit, VmReport};
use std::io::{BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Why the VMM process could not serve its VM.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The control socket failed.
    #[error("control socket: {0}")]
    Control(#[from] std::io::Error),
    /// The sandbox hung up before sending what to start.
    #[error("the sandbox sent nothing to start")]
    NoLaunch,
    /// Dropping the control threads' privileges failed.
    #[error("jailing the VMM process: {0}")]
    Jail(std::io::Error),
    /// The seccomp filter could not be built or installed.
    #[error("seccomp: {0}")]
    Seccomp(#[from] rootcell_vmm::Error),
    /// The sandbox died before the death signal was armed again.
    #[error("the sandbox (pid {0}) is gone")]
    Orphaned(i32),
}

/// The `builtin-vmm` subcommand; returns the process's exit code.
pub fn main() -> i32 {
    // Named for ps and top (exec'd as /proc/self/exe, it would show as "exe").
    // SAFETY: prctl(2) with a NUL-terminated name of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"builtin-vmm".as_ptr()) };
    // SAFETY: fd 0 is the control socket the sandbox gave this process as stdin; nothing else
    // here reads stdin.
    let ctl = UnixStream::from(unsafe { OwnedFd::from_raw_fd(0) });
    match run(ctl) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("builtin VMM process: {e}");
            1
        }
    }
}

fn run(ctl: UnixStream) -> Result<i32, ProcessError> {
    let mut out = ctl.try_clone()?;
    let mut input = BufReader::new(ctl);
    let launch: Launch = wire::recv(&mut input)?.ok_or(ProcessError::NoLaunch)?;
    // Opened before the VM is built: the virtio-fs thread, which takes its fd table of its
    // own then, gets a pipe relayed to it at its number (see `start`).
    let new_log = !launch.hypervisor_log.exists();
    crate::logging::init(
        Some(&launch.hypervisor_log),
        Box::new(std::io::sink()),
        crate::logging::Format::Text,
        false,
    );
    let vm = match start(&launch) {
        Ok(vm) => vm,
        Err(msg) => {
            // A VM that failed to start leaves no diagnostics file (the error goes back to the
            // sandbox).
            if new_log {
                let _ = std::fs::remove_file(&launch.hypervisor_log);
            }
            wire::send(&mut out, &Report::Failed(msg))?;
            return Ok(1);
        }
    };
    let (vsock, fs) = vm.slots();
    let slot = |s: rootcell_vmm::vm::VirtioSlot| Slot {
        base: s.base,
        irq: s.irq,
    };
    wire::send(
        &mut out,
        &Report::Started {
            cmdline: vm.cmdline().to_owned(),
            vsock: slot(vsock),
            fs: slot(fs),
        },
    )?;
    let (wake, ended) = UnixStream::pair()?;
    let uid = match confine(launch.parent) {
        Ok(uid) => uid,
        Err(e) => {
            let _ = vm.stop();
            return Err(e);
        }
    };
    // With the VMM's half of the jail (crate::jail::Halves), and only then, as the identity.
    let filter = crate::jail::qemu_enabled()
        .then(|| rootcell_vmm::seccomp::control_filter(seccompiler::SeccompAction::KillProcess))
        .transpose()?;
    // Started after the change of identity and root, so it shares them; it confines itself.
    let latch = vm.exit_latch();
    let own = filter.clone();
    std::thread::Builder::new()
        .name("vmm-exit-wait".into())
        .spawn(move || {
            if let Some(Err(e)) = own.as_ref().map(rootcell_vmm::seccomp::apply) {
                tracing::error!("builtin VMM process: exit waiter: {e}");
                std::process::abort();
            }
            while latch.wait_timeout(Duration::from_secs(3600)).is_none() {}
            let _ = (&ended).write_all(&[1]);
        })?;
    if let Some(filter) = &filter {
        rootcell_vmm::seccomp::apply(filter)?;
    }
    tracing::info!(
        ?uid,
        "builtin VMM process: VM running; control threads confined"
    );
    serve(vm, input, out, wake)
}

/// Builds and starts the VM; the VMM's error as text.
fn start(l: &Launch) -> Result<RunningBuiltinVm, String> {
    // Its vCPU and device threads enter the runtime's jail (see crate::jail::vmm).
    rootcell_vmm::jail::set_thread_jail(crate::jail::vmm::vmm_thread);
    let mut c = BuiltinConfig::new(&l.kernel, &l.vsock_uds, &l.share_dir);
    for n in &l.nets {
        // SAFETY: fcntl(2) F_GETFD on a number only tells an open descriptor from a closed one.
        if unsafe { libc::fcntl(n.fd, libc::F_GETFD) } < 0 {
            return Err(format!("virtio-net: tap fd {} was not passed", n.fd));
        }
        // SAFETY: the sandbox passed this open tap to this process by number, for the VM alone.
        let tap = unsafe { OwnedFd::from_raw_fd(n.fd) };
        c.net.push(NetConfig {
            tap: std::sync::Arc::new(tap),
            mac: n.mac,
            mtu: n.mtu,
        });
    }
    c.initramfs = Some(l.initrd.clone());
    c.cmdline = l.cmdline.clone();
    c.mem_mib = l.mem_mib;
    c.vcpus = l.vcpus;
    c.console_log = Some(l.console_log.clone());
    c.guest_cid = l.guest_cid;
    // Its control threads, which drop the VM, may not unlink files (control_filter), nor may
    // its vsock thread: the sandbox removes the socket (when the VM ends or fails to start).
    c.leave_vsock_socket = true;
    c.fs_share_root = l.share_root;
    // The virtio-fs thread's log lines reach the log through a pipe in its own fd table.
    c.fs_log_relay = crate::logging::file_fd().into_iter().collect();
    c.fs_tag = l.share_tag.clone();
    BuiltinVm::start(c).map_err(|e| e.to_string())
}

/// Gives the calling (control) thread a root holding nothing and the identity
/// [`crate::jail::UID_BASE`] + pid without capabilities, unless the VMM jail is off; arms the
/// parent-death signal again (a change of uid clears it) and checks the sandbox is still the
/// parent. Returns the uid taken, if any.
fn confine(parent: i32) -> Result<Option<u32>, ProcessError> {
    let uid = if crate::jail::qemu_enabled() {
        crate::jail::vmm::own_root(None).map_err(ProcessError::Jail)?;
        Some(crate::jail::vmm::become_unprivileged().map_err(ProcessError::Jail)?)
    } else {
        tracing::warn!(
            "ROOTCELL_JAIL: the built-in VMM process's threads stay root, without seccomp filters"
        );
        None
    };
    // SAFETY: prctl(2) with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        return Err(ProcessError::Jail(std::io::Error::last_os_error()));
    }
    // SAFETY: getppid(2) takes nothing.
    if unsafe { libc::getppid() } != parent {
        return Err(ProcessError::Orphaned(parent));
    }
    Ok(uid)
}

/// Answers the sandbox until the VM ends; returns the exit code.
fn serve(
    vm: RunningBuiltinVm,
    mut input: BufReader<UnixStream>,
    mut out: UnixStream,
    wake: UnixStream,
) -> Result<i32, ProcessError> {
    loop {
        // A request already read into the buffer is not seen by poll.
        if input.buffer().is_empty() {
            let (request, ended) = wait(input.get_ref(), &wake);
            if ended {
                wire::send(&mut out, &guest_ended(vm))?;
                return Ok(0);
            }
            if !request {
                continue;
            }
        }
        let request = match wire::recv::<Request>(&mut input) {
            Ok(Some(r)) => r,
            // The sandbox hung up (or sent nonsense): nobody is left to serve.
            Ok(None) | Err(_) => {
                let report = vm.stop();
                tracing::info!(exit = ?report.exit, "builtin VMM process: the sandbox hung up");
                return Ok(0);
            }
        };
        match request {
            Request::Pause => {
                let r = vm.pause().map_err(|e| e.to_string());
                wire::send(&mut out, &Report::Done(r))?;
            }
            Request::Resume => {
                vm.resume();
                wire::send(&mut out, &Report::Done(Ok(())))?;
            }
            Request::Stop => {
                wire::send(&mut out, &stopped(vm))?;
                return Ok(0);
            }
        }
    }
}

/// Blocks until the control socket or the exit waiter has something: (request, ended).
fn wait(ctl: &UnixStream, wake: &UnixStream) -> (bool, bool) {
    let mut fds = [
        libc::pollfd {
            fd: ctl.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: poll(2) on two pollfds that live for the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r > 0 {
            return (fds[0].revents != 0, fds[1].revents != 0);
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // Reading the socket will say what is wrong with it.
            return (true, false);
        }
    }
}

/// The lines a VM's end writes to the diagnostics file, after the optional `stopped` line.
fn exit_lines(exit: &VmExit, vcpus: &[rootcell_vmm::vcpu::VcpuStatus]) -> Vec<String> {
    let mut lines = Vec::new();
    if *exit == VmExit::Shutdown {
        for v in vcpus {
            lines.extend(super::shutdown_line(v));
            // The guest's page tables at the triple fault (a few lines; see the VMM's ptwalk).
            lines.extend(v.page_walk.iter().map(|w| format!("vcpu{} {w}", v.cpu)));
        }
    }
    lines.push(format!("guest exit: {exit:?}"));
    lines
}

fn stopped_line(report: &VmReport) -> String {
    if !report.stuck_vcpus.is_empty() {
        tracing::warn!(stuck = ?report.stuck_vcpus, "vCPU threads did not leave KVM_RUN; they end with the VMM process");
    }
    let vcpus: Vec<String> = report.vcpus.iter().map(vcpu_summary).collect();
    format!(
        "stopped: exit {:?}, first KVM_RUN after {:?}, stuck vCPUs {:?}, vCPUs [{}]",
        report.exit,
        report.create_to_first_run,
        report.stuck_vcpus,
        vcpus.join("; ")
    )
}

/// The virtio devices at the stop, one line: `virtio: <device>; <device>` (see
/// `MmioTransport::ring_report`).
fn virtio_line(report: &VmReport) -> String {
    format!("virtio: {}", report.virtio.join("; "))
}

/// One vCPU in the `stopped` line: its exits and where it was. Not its registers and page
/// tables at a triple fault, which are several lines of their own (exit_lines) and in the
/// error: in Debug form they made this line repeat them, escaped, on one line.
fn vcpu_summary(v: &rootcell_vmm::vcpu::VcpuStatus) -> String {
    let rip = v.rip.map_or_else(|| "?".into(), |r| format!("{r:#x}"));
    let cr3 = v.cr3.map_or_else(String::new, |c| format!(" cr3 {c:#x}"));
    let before: Vec<&str> = v.recent_exits.iter().map(String::as_str).collect();
    // Whether it could take interrupts (RFLAGS.IF, its APIC's in-service and pending vectors):
    // a guest stopped for not answering shows here a device interrupt it never took.
    let interrupts = v
        .interrupts
        .as_ref()
        .map_or_else(String::new, |i| format!(", {i}"));
    format!(
        "vcpu{} {} exits, last {}, rip {rip}{cr3}, before [{}]{interrupts}",
        v.cpu,
        v.exits,
        v.last_exit.replace('\n', " "),
        before.join(", ")
    )
}

/// The guest ended the VM: what it looked like then, and the VM stopped.
fn guest_ended(vm: RunningBuiltinVm) -> Report {
    let exit = vm.wait_timeout(Duration::ZERO).unwrap_or(VmExit::Stopped);
    let mut lines = exit_lines(&exit, &vm.vcpu_status());
    tracing::info!(?exit, "builtin VM ended");
    lines.push(stopped_line(&vm.stop()));
    Report::Ended {
        status: super::exit_status(&exit),
        lines,
    }
}

/// The sandbox stops the VM.
fn stopped(vm: RunningBuiltinVm) -> Report {
    let report = vm.stop();
    let mut lines = vec![stopped_line(&report)];
    // Next to the stopped line, so the few last lines of the log an error quotes carry it: a
    // guest stopped because it never answered shows here whether a virtio device left it a
    // packet it never took (issue 12).
    lines.push(virtio_line(&report));
    lines.extend(exit_lines(&report.exit, &report.vcpus));
    tracing::info!(exit = ?report.exit, "builtin VM stopped");
    Report::Ended {
        status: super::exit_status(&report.exit),
        lines,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rootcell_vmm::vcpu::VcpuStatus;

    #[test]
    fn a_triple_fault_logs_registers_then_the_page_tables() {
        let v = VcpuStatus {
            cpu: 1,
            last_exit: "Shutdown".into(),
            shutdown_state: Some("rip=0xfff0".into()),
            page_walk: Some(
                "page tables (phys-bits 40): root 0x1815000\n  verdict: root table sane".into(),
            ),
            ..Default::default()
        };
        let lines = exit_lines(&VmExit::Shutdown, std::slice::from_ref(&v));
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[0].starts_with("vcpu1 shut down"), "{lines:?}");
        assert_eq!(
            lines[1],
            "vcpu1 page tables (phys-bits 40): root 0x1815000\n  verdict: root table sane"
        );
        assert_eq!(lines[2], "guest exit: Shutdown");
        // A VM that did not shut down says nothing of its page tables.
        assert_eq!(exit_lines(&VmExit::Reset, &[v]), vec!["guest exit: Reset"]);
    }

    /// The stopped line names each vCPU's exits in short; the registers and page tables of a
    /// triple fault stay on their own lines.
    #[test]
    fn the_stopped_line_is_short() {
        let v = VcpuStatus {
            cpu: 0,
            exits: 1234,
            last_exit: "Shutdown".into(),
            rip: Some(0x1000005),
            cr3: Some(0x1815000),
            recent_exits: ["IoOut(0x3f8)".to_string(), "Hlt".to_string()].into(),
            shutdown_state: Some("rip=0xfff0 cr3=0x9000".into()),
            page_walk: Some("page tables (phys-bits 40): root 0x9000\n  verdict: sane".into()),
            interrupts: Some("if 1 tpr 0x0 ppr 0x0 isr [] irr [0x35]".into()),
            ..Default::default()
        };
        let report = VmReport {
            exit: VmExit::Shutdown,
            vcpus: vec![
                v,
                VcpuStatus {
                    cpu: 1,
                    ..Default::default()
                },
            ],
            stuck_vcpus: vec![],
            create_to_first_run: None,
            virtio: vec![
                "vsock: status 0xf, interrupt status 0x1, q0 avail 64/64 used 3/2".into(),
                "fs: status 0xf, interrupt status 0x0, q0 avail 0/0 used 0/0".into(),
            ],
        };
        assert_eq!(
            stopped_line(&report),
            "stopped: exit Shutdown, first KVM_RUN after None, stuck vCPUs [], vCPUs [vcpu0 \
             1234 exits, last Shutdown, rip 0x1000005 cr3 0x1815000, before [IoOut(0x3f8), Hlt], \
             if 1 tpr 0x0 \
             ppr 0x0 isr [] irr [0x35]; vcpu1 0 exits, last , rip ?, before []]"
        );
        assert_eq!(
            virtio_line(&report),
            "virtio: vsock: status 0xf, interrupt status 0x1, q0 avail 64/64 used 3/2; fs: \
             status 0xf, interrupt status 0x0, q0 avail 0/0 used 0/0"
        );
    }
}
