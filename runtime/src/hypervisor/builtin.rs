//! The built-in backend: rootcell's own KVM VMM (`rootcell-vmm`) with in-process
//! virtio-vsock, virtio-fs and virtio-net devices, run in a process of its own,
//! `rootcell builtin-vmm` ([`process`]): a child of the sandbox that builds and starts the VM
//! as root, lets its vCPU and device threads jail themselves, and then confines its own
//! threads too, so nothing that shares an address space with the guest-facing code keeps
//! root's capabilities. The sandbox keeps a handle (`BuiltinHandle`) that talks to it over
//! a control socket ([`wire`]): pause, resume, stop, and the VM's end with its exit status and
//! diagnostics. The process dies with the sandbox (PR_SET_PDEATHSIG), and with it the VM,
//! its guest memory (a memfd) and its devices.

pub mod process;
pub mod wire;

use super::{Hypervisor, HypervisorError, Vm, VmConfig};
use crate::pidfd::Pidfd;
use rootcell_vmm::builder::BASE_CMDLINE;
use rootcell_vmm::vcpu::VcpuStatus;
use rootcell_vmm::VmExit;
use std::io::{BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long the VMM process may take to build the VM and say so.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a pause or resume may take to be answered (the VMM's own bound is
/// [`rootcell_vmm::vm::PAUSE_TIMEOUT`] for the vCPUs, then the devices'); below the CLI's.
const REPLY_TIMEOUT: Duration = Duration::from_secs(4);
/// How long a stopping VM may take before its process is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// close_range(2)'s flag that marks the range close-on-exec instead of closing it.
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

/// The built-in backend.
#[derive(Debug, Default)]
pub struct Builtin;

/// The caller's kernel parameters without the ones [`BASE_CMDLINE`] already sets: the VMM
/// ends a guest on an i8042 reset (`reboot=k`), so a `reboot=` from `ROOTCELL_KERNEL_ARGS` must
/// not override it.
pub fn guest_cmdline(cmdline: &str) -> String {
    let base_keys: Vec<&str> = BASE_CMDLINE
        .split_whitespace()
        .map(|p| p.split('=').next().unwrap_or(p))
        .collect();
    cmdline
        .split_whitespace()
        .filter(|p| !base_keys.contains(&p.split('=').next().unwrap_or(p)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Shell-convention status of a VM exit, like a hypervisor process's: a guest that rebooted
/// or shut down is a clean end (0), a VM stopped by us was killed (137), a vCPU error is 1.
pub fn exit_status(exit: &VmExit) -> i32 {
    match exit {
        VmExit::Reset | VmExit::Shutdown => 0,
        VmExit::Stopped => 137,
        VmExit::Error { .. } => 1,
    }
}

/// What a vCPU that ended the VM by a shutdown (triple fault) shows: its registers at that exit,
/// how long it had run and the exits just before (how far the guest got).
fn shutdown_line(v: &VcpuStatus) -> Option<String> {
    let state = v.shutdown_state.as_ref()?;
    let ran = v
        .first_run
        .map(|t| format!("{:.2} s", t.elapsed().as_secs_f64()))
        .unwrap_or_else(|| "?".into());
    let before: Vec<&str> = v.recent_exits.iter().map(String::as_str).collect();
    let how = if v.last_exit == "Hlt" {
        "halted for good (KVM_EXIT_HLT)"
    } else {
        "shut down (KVM_EXIT_SHUTDOWN: a triple fault)"
    };
    Some(format!(
        "vcpu{} {how} after {} exits and {ran} of running; exits before it: [{}]; registers at the exit: {state}",
        v.cpu,
        v.exits,
        before.join(", ")
    ))
}

/// Appends a line to the backend's diagnostics file (best effort: diagnostics must not fail
/// the container).
fn note(log: &Path, line: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
    {
        let _ = writeln!(f, "{line}");
    }
}

/// The program to run as the VMM process: this one (`rootcell`). A unit-test binary of this
/// crate is not rootcell: it runs the `rootcell` binary built beside it (`target/<profile>`).
fn program() -> PathBuf {
    #[cfg(test)]
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().and_then(Path::parent).map(Path::to_path_buf))
    {
        return dir.join("rootcell");
    }
    PathBuf::from("/proc/self/exe")
}

/// The VMM process's command: `rootcell builtin-vmm --for <owner>`. Its configuration comes
/// over the control socket; `--for` is there only to be read, by `ps` and by the tests' leftover
/// check: it names whose VM the process runs ([`VmConfig::owner`]), which nothing else on its
/// command line does.
fn vmm_command(program: &Path, owner: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.arg0("rootcell")
        .arg("builtin-vmm")
        .arg("--for")
        .arg(owner);
    cmd
}

impl Hypervisor for Builtin {
    fn name(&self) -> &'static str {
        "builtin"
    }

    fn start(&self, cfg: &VmConfig) -> Result<Box<dyn Vm>, HypervisorError> {
        let vcpus = u8::try_from(cfg.vcpus).map_err(|_| HypervisorError::Device {
            device: "vCPU",
            msg: format!(
                "{} vCPUs requested; the built-in VMM supports at most 255",
                cfg.vcpus
            ),
        })?;
        let taps = cfg
            .nets
            .iter()
            .map(net_card)
            .collect::<Result<Vec<_>, _>>()?;
        let launch = wire::Launch {
            kernel: cfg.kernel.clone(),
            initrd: cfg.initrd.clone(),
            cmdline: guest_cmdline(&cfg.cmdline),
            mem_mib: cfg.memory_mib,
            vcpus,
            console_log: cfg.console_log.clone(),
            hypervisor_log: cfg.hypervisor_log.clone(),
            vsock_uds: cfg.vsock_uds.clone(),
            guest_cid: cfg.guest_cid,
            share_dir: cfg.share_dir.clone(),
            share_tag: cfg.share_tag.clone(),
            // Confined like QEMU's back end: its virtio-fs thread's root holds only the share.
            share_root: crate::jail::backends_enabled(),
            nets: taps.iter().map(|(_, n)| n.clone()).collect(),
            parent: std::process::id() as i32,
        };
        let started = Instant::now();
        let program = program();
        let spawn_err = |source: std::io::Error| HypervisorError::Spawn {
            program: program.clone(),
            source,
        };
        let (ours, theirs) = UnixStream::pair().map_err(spawn_err)?;
        let mut cmd = vmm_command(&program, &cfg.owner);
        cmd.stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let parent = launch.parent;
        let inherit: Vec<RawFd> = taps.iter().map(|(fd, _)| fd.as_raw_fd()).collect();
        // SAFETY: only async-signal-safe calls (prctl, getppid, fcntl) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // The VMM must not outlive the sandbox, even on SIGKILL. The death signal
                // follows the forking thread, the sandbox's main thread (it lives to the end),
                // as QEMU's does.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0
                    || libc::getppid() != parent
                {
                    return Err(std::io::Error::last_os_error());
                }
                // Nothing of the sandbox's reaches the VMM but what it is given: every other
                // descriptor (also one the sandbox inherited without close-on-exec, such as a
                // caller's stdio) closes at exec. Best effort: older kernels lack the flag.
                libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC);
                // The taps were duplicated close-on-exec; the VMM gets them by number.
                for &fd in &inherit {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let spawned = cmd.spawn();
        // Our copies of its end of the socket and of the taps: the process holds its own.
        drop(cmd);
        drop(taps);
        let child = spawned.map_err(spawn_err)?;
        let pid = child.id() as i32;
        let fail = |child: Child, cause: String| {
            let status = end_child(child);
            // A VM that did not start leaves no socket behind. The VMM process leaves it (none
            // of its threads may unlink files once confined), so root removes it.
            if let Err(rm) = std::fs::remove_file(&cfg.vsock_uds) {
                if rm.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(socket = %cfg.vsock_uds.display(), "cannot remove the vsock socket: {rm}");
                }
            }
            tracing::debug!(pid, ?status, "builtin VMM process did not start the VM");
            HypervisorError::Builtin {
                kernel: cfg.kernel.clone(),
                cause,
            }
        };
        let first = (|| {
            let mut out = ours.try_clone()?;
            wire::send(&mut out, &launch)?;
            ours.set_read_timeout(Some(START_TIMEOUT))?;
            let mut input = BufReader::new(ours.try_clone()?);
            let report = wire::recv::<wire::Report>(&mut input)?;
            ours.set_read_timeout(None)?;
            let process = Pidfd::open(pid, 0)?;
            Ok::<_, std::io::Error>((report, input, out, process))
        })();
        let (input, out, process, cmdline, vsock, fs) = match first {
            Ok((Some(wire::Report::Started { cmdline, vsock, fs }), input, out, process)) => {
                (input, out, process, cmdline, vsock, fs)
            }
            Ok((Some(wire::Report::Failed(cause)), ..)) => return Err(fail(child, cause)),
            Ok((other, ..)) => {
                return Err(fail(
                    child,
                    format!("its process (pid {pid}) ended before it started the VM: {other:?}"),
                ))
            }
            Err(e) => {
                return Err(fail(
                    child,
                    format!("no word from its process (pid {pid}): {e}"),
                ))
            }
        };
        note(
            &cfg.hypervisor_log,
            &format!(
                "builtin VMM started in {:?} (process {pid}): {} MiB, {vcpus} vCPU(s), vsock at {:#x} irq {}, virtio-fs at {:#x} irq {}\ncmdline: {cmdline}",
                started.elapsed(),
                cfg.memory_mib,
                vsock.base,
                vsock.irq,
                fs.base,
                fs.irq,
            ),
        );
        tracing::info!(
            pid,
            start_us = started.elapsed().as_micros() as u64,
            mem_mib = cfg.memory_mib,
            vcpus,
            cmdline,
            "builtin VMM started"
        );
        let shared = Arc::new(Shared::default());
        let (replies_tx, replies) = mpsc::channel();
        let reader = {
            let (shared, log) = (shared.clone(), cfg.hypervisor_log.clone());
            std::thread::Builder::new()
                .name("builtin-vmm-ctl".into())
                .spawn(move || read_reports(child, input, &replies_tx, &shared, &log))
        };
        if let Err(e) = reader {
            let _ = process.signal(libc::SIGKILL);
            // The child went with the closure; it is reaped by nobody but init after we die.
            return Err(HypervisorError::Builtin {
                kernel: cfg.kernel.clone(),
                cause: format!("cannot start its control thread: {e}"),
            });
        }
        Ok(Box::new(BuiltinHandle {
            pid,
            process,
            out: Mutex::new(out),
            replies: Mutex::new(replies),
            shared,
            log: cfg.hypervisor_log.clone(),
        }))
    }
}

/// Kills a VMM process that has not started its VM (or not said so), and reaps it.
fn end_child(mut child: Child) -> Option<std::process::ExitStatus> {
    let _ = child.kill();
    child.wait().ok()
}

/// The VMM's own handle on a tap (a dup, close-on-exec, that its process inherits by number:
/// the sandbox keeps the original for teardown).
fn net_card(n: &super::NetCard) -> Result<(OwnedFd, wire::NetFd), HypervisorError> {
    let device_err = |msg: String| HypervisorError::Device {
        device: "virtio-net",
        msg,
    };
    // SAFETY: the sandbox keeps the tap open for the VM's whole life.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(n.tap_fd) };
    let tap = borrowed
        .try_clone_to_owned()
        .map_err(|e| device_err(format!("cannot duplicate tap fd {}: {e}", n.tap_fd)))?;
    let mtu =
        u16::try_from(n.mtu).map_err(|_| device_err(format!("MTU {} is over 65535", n.mtu)))?;
    let fd = tap.as_raw_fd();
    Ok((
        tap,
        wire::NetFd {
            fd,
            mac: n.mac.0,
            mtu,
        },
    ))
}

/// What the handle and its control thread share.
#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    cond: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// The exit status, once the VM has ended.
    status: Option<i32>,
    /// The VMM process has been reaped.
    reaped: bool,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
        self.cond.notify_all();
    }

    /// Waits up to `timeout` for `done`; whether it holds.
    fn wait_for(&self, timeout: Duration, done: impl Fn(&State) -> bool) -> bool {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (s, _) = self
            .cond
            .wait_timeout_while(s, timeout, |s| !done(s))
            .unwrap_or_else(|p| p.into_inner());
        done(&s)
    }

    fn status(&self) -> Option<i32> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).status
    }
}

/// The sandbox's control thread for one VMM process: hands answers to pauses and resumes to
/// the waiting caller, writes the VM's end to the diagnostics file and records its status,
/// and reaps the process once it has closed the socket. A process that died without
/// reporting (killed, or by a seccomp violation) has ended its guest too: its status is the
/// process's.
fn read_reports(
    mut child: Child,
    mut input: BufReader<UnixStream>,
    replies: &mpsc::Sender<Result<(), String>>,
    shared: &Shared,
    log: &Path,
) {
    loop {
        match wire::recv::<wire::Report>(&mut input) {
            Ok(Some(wire::Report::Done(r))) => {
                let _ = replies.send(r);
            }
            Ok(Some(wire::Report::Ended { status, lines })) => {
                for line in &lines {
                    note(log, line);
                }
                shared.update(|s| {
                    s.status.get_or_insert(status);
                });
            }
            Ok(Some(other)) => tracing::warn!("builtin VMM process: unexpected {other:?}"),
            Ok(None) => break,
            Err(e) => {
                tracing::warn!("builtin VMM process: control socket: {e}");
                break;
            }
        }
    }
    let how = child.wait();
    let status = match &how {
        Ok(s) => s
            .code()
            .unwrap_or_else(|| 128 + s.signal().unwrap_or(libc::SIGKILL)),
        Err(_) => 137,
    };
    shared.update(|s| {
        if s.status.is_none() {
            let line = format!("guest exit: the VMM process ended without a report ({how:?})");
            tracing::warn!("{line}");
            note(log, &line);
            s.status = Some(status);
        }
        s.reaped = true;
    });
}

/// A running built-in VM, as the sandbox holds it: the VMM process and its control socket.
struct BuiltinHandle {
    pid: i32,
    /// The VMM process (signals never reach a later process with its pid).
    process: Pidfd,
    /// Requests to the VMM process.
    out: Mutex<UnixStream>,
    /// Answers to pauses and resumes (held across a request and its answer).
    replies: Mutex<mpsc::Receiver<Result<(), String>>>,
    shared: Arc<Shared>,
    /// The backend's diagnostics file.
    log: PathBuf,
}

impl BuiltinHandle {
    /// Waits up to `timeout` for the guest to end; the status if it has.
    fn wait(&self, timeout: Duration) -> Option<i32> {
        self.shared.wait_for(timeout, |s| s.status.is_some());
        self.shared.status()
    }

    fn send(&self, request: wire::Request) -> std::io::Result<()> {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        wire::send(&mut *out, &request)
    }
}

impl Vm for BuiltinHandle {
    fn pid(&self) -> Option<i32> {
        Some(self.pid)
    }

    fn wait_stopped(&self) -> i32 {
        loop {
            if let Some(s) = self.wait(Duration::from_secs(3600)) {
                return s;
            }
        }
    }

    fn try_stopped(&self) -> Option<i32> {
        self.shared.status()
    }

    fn kill(&self) {
        if self.shared.status().is_some() {
            return;
        }
        // Stopped by its process, which reports where the guest got to; killed if it does not.
        let _ = self.send(wire::Request::Stop);
        if self.wait(STOP_GRACE).is_none() {
            tracing::warn!(
                pid = self.pid,
                "builtin VMM process did not stop its VM in {STOP_GRACE:?}: killing it"
            );
            let _ = self.process.signal(libc::SIGKILL);
            if self.wait(crate::timeouts::VMM_GONE).is_none() {
                tracing::warn!(pid = self.pid, "builtin VMM process survives SIGKILL");
            }
        }
    }

    fn set_paused(&self, paused: bool) -> std::io::Result<()> {
        let gone = || {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the guest has already stopped",
            )
        };
        if self.shared.status().is_some() {
            return Err(gone());
        }
        let replies = self.replies.lock().unwrap_or_else(|p| p.into_inner());
        // An answer that came after its caller gave up is not this request's.
        while replies.try_recv().is_ok() {}
        self.send(if paused {
            wire::Request::Pause
        } else {
            wire::Request::Resume
        })
        .map_err(|_| gone())?;
        match replies.recv_timeout(REPLY_TIMEOUT) {
            Ok(Ok(())) => {}
            // The VMM resumes the guest itself if it cannot park every vCPU and device.
            Ok(Err(e)) => return Err(std::io::Error::other(e)),
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err(gone()),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the built-in VMM did not answer in {REPLY_TIMEOUT:?}"),
                ))
            }
        }
        note(&self.log, if paused { "paused" } else { "resumed" });
        Ok(())
    }

    fn finish(&self, timeout: Duration) {
        let _ = self.wait(timeout);
        self.kill();
        if !self
            .shared
            .wait_for(crate::timeouts::VMM_GONE, |s| s.reaped)
        {
            tracing::warn!(pid = self.pid, "builtin VMM process not reaped yet");
        }
    }
}

impl Drop for BuiltinHandle {
    fn drop(&mut self) {
        self.finish(Duration::ZERO);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path, kernel: PathBuf) -> VmConfig {
        VmConfig {
            kernel,
            initrd: dir.join("initrd"),
            memory_mib: 128,
            vcpus: 1,
            cmdline: crate::sandbox::KERNEL_CMDLINE.into(),
            console_log: dir.join("console.log"),
            hypervisor_log: dir.join("builtin.log"),
            socket_dir: dir.to_path_buf(),
            owner: dir.join("state/ctr-1"),
            vsock_uds: dir.join("vsock.sock"),
            guest_cid: 3,
            share_dir: dir.join("share"),
            share_tag: "rootcell".into(),
            nets: vec![],
        }
    }

    /// The VMM process's command line names the container (its state dir, so its root and id)
    /// and parses as the hidden subcommand, whatever the path holds.
    #[test]
    fn the_vmm_command_names_its_owner_and_parses() {
        let owner = Path::new("/run/docker/runtime-runc/moby/0123456789abcdef,x y");
        let cmd = vmm_command(Path::new("/proc/self/exe"), owner);
        assert_eq!(cmd.get_program(), "/proc/self/exe");
        let args: Vec<&std::ffi::OsStr> = cmd.get_args().collect();
        let want: [&std::ffi::OsStr; 3] =
            ["builtin-vmm".as_ref(), "--for".as_ref(), owner.as_os_str()];
        assert_eq!(args, want);
        let argv = std::iter::once(std::ffi::OsStr::new("rootcell")).chain(args);
        let cli = <crate::cli::Cli as clap::Parser>::try_parse_from(argv).unwrap();
        match cli.command {
            crate::cli::Command::BuiltinVmm { owner: Some(o) } => assert_eq!(o, owner),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn cmdline_drops_what_the_vmm_sets_itself() {
        assert_eq!(
            guest_cmdline("console=ttyS0 reboot=t panic=-1 quiet"),
            "quiet"
        );
        assert_eq!(
            guest_cmdline("quiet loglevel=8  foo=bar=baz"),
            "quiet loglevel=8 foo=bar=baz"
        );
        assert_eq!(guest_cmdline(""), "");
    }

    #[test]
    fn a_shut_down_vcpu_is_described_in_one_line() {
        let quiet = VcpuStatus::default();
        assert_eq!(shutdown_line(&quiet), None, "no shutdown, no line");
        let v = VcpuStatus {
            cpu: 0,
            exits: 41,
            last_exit: "Shutdown".into(),
            recent_exits: [
                "IoOut port 0x3f8 len 1".to_string(),
                "MmioRead 0xd0000000 len 4".into(),
            ]
            .into(),
            shutdown_state: Some("rip=0x1000005 rax=0x1234abcd".into()),
            ..Default::default()
        };
        let line = shutdown_line(&v).unwrap();
        assert!(!line.contains('\n'), "{line}");
        assert!(
            line.starts_with("vcpu0 shut down (KVM_EXIT_SHUTDOWN: a triple fault) after 41 exits"),
            "{line}"
        );
        assert!(
            line.contains("[IoOut port 0x3f8 len 1, MmioRead 0xd0000000 len 4]"),
            "{line}"
        );
        assert!(
            line.ends_with("registers at the exit: rip=0x1000005 rax=0x1234abcd"),
            "{line}"
        );
    }

    #[test]
    fn exit_statuses_follow_the_shell_convention() {
        assert_eq!(exit_status(&VmExit::Reset), 0);
        assert_eq!(exit_status(&VmExit::Shutdown), 0);
        assert_eq!(exit_status(&VmExit::Stopped), 137);
        assert_eq!(
            exit_status(&VmExit::Error {
                cpu: 0,
                message: "x".into()
            }),
            1
        );
    }

    #[test]
    fn pause_and_resume_reach_the_vmm_and_a_stopped_guest_refuses() {
        if !rootcell_test_support::require_kvm("pause_and_resume_reach_the_vmm") {
            return;
        }
        let images = crate::assets::locate_builtin().expect("guest images for the builtin VMM");
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("share")).unwrap();
        let mut c = cfg(dir.path(), images.kernel);
        c.initrd = images.initrd;
        let vm = Builtin.start(&c).expect("start the builtin VM");
        let pid = vm.pid().expect("the VMM's own process");
        assert_ne!(pid, std::process::id() as i32);
        vm.set_paused(true).expect("pause");
        // Answering, its control thread has dropped root: uid base + pid, no capabilities,
        // seccomp (the jail is on unless ROOTCELL_JAIL says otherwise, and then none of it is;
        // the tests run as root).
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |f: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{f}:")))
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        let seccomp = if crate::jail::qemu_enabled() {
            "2"
        } else {
            "0"
        };
        assert_eq!(field("Seccomp"), seccomp, "{status}");
        if crate::jail::qemu_enabled() && nix::unistd::geteuid().is_root() {
            let id = (crate::jail::UID_BASE + pid as u32).to_string();
            assert_eq!(field("Uid"), [id.as_str(); 4].join("\t"), "{status}");
            assert_eq!(field("CapEff"), "0000000000000000", "{status}");
            assert_eq!(field("CapBnd"), "0000000000000000", "{status}");
        }
        vm.set_paused(true).expect("pausing a paused guest");
        assert_eq!(vm.try_stopped(), None, "a paused guest has not stopped");
        vm.set_paused(false).expect("resume");
        // A paused guest is killed as promptly as a running one.
        vm.set_paused(true).expect("pause again");
        let t = Instant::now();
        vm.kill();
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "kill took {:?}",
            t.elapsed()
        );
        assert_eq!(vm.try_stopped(), Some(137));
        let e = vm.set_paused(false).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
        let log = std::fs::read_to_string(dir.path().join("builtin.log")).unwrap();
        assert!(log.contains("paused\nresumed\npaused\n"), "{log}");
        assert!(log.contains("guest exit: Stopped"), "{log}");
        // Released, the VMM process is gone (reaped).
        drop(vm);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "VMM process {pid} left behind"
        );
    }

    #[test]
    fn bad_kernel_is_a_clear_error_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("share")).unwrap();
        std::fs::write(dir.path().join("initrd"), b"").unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, b"not a kernel at all, just text").unwrap();
        let c = cfg(dir.path(), kernel.clone());
        let err = match Builtin.start(&c) {
            Ok(_) => panic!("a text file booted"),
            Err(e) => e.to_string(),
        };
        // Either KVM is absent (named as such) or the kernel is rejected (named by path).
        assert!(err.contains("built-in VMM"), "{err}");
        assert!(
            err.contains("/dev/kvm") || err.contains(&kernel.display().to_string()),
            "{err}"
        );
        for f in ["vsock.sock", "console.log", "builtin.log"] {
            assert!(!dir.path().join(f).exists(), "{f} left behind after: {err}");
        }
    }
}
