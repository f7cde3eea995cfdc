//! The built-in backend: rootcell's own KVM VMM (`rootcell-vmm`) running as threads of the
//! sandbox process, with in-process virtio-vsock and virtio-fs devices. There is no separate
//! hypervisor process, so whatever kills the sandbox kills the VM, its guest memory (a memfd)
//! and its devices with it.

use super::{Hypervisor, HypervisorError, Vm, VmConfig};
use rootcell_vmm::builder::{BuiltinConfig, BuiltinVm, NetConfig, RunningBuiltinVm, BASE_CMDLINE};
use rootcell_vmm::vcpu::VcpuStatus;
use rootcell_vmm::VmExit;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

/// How long one blocking wait holds the VM's read lock, so `kill` never waits longer for it.
const WAIT_SLICE: Duration = Duration::from_millis(200);

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
        let mut c = BuiltinConfig::new(&cfg.kernel, &cfg.vsock_uds, &cfg.share_dir);
        for n in &cfg.nets {
            c.net.push(net_card(n)?);
        }
        c.initramfs = Some(cfg.initrd.clone());
        c.cmdline = guest_cmdline(&cfg.cmdline);
        c.mem_mib = cfg.memory_mib;
        c.vcpus = vcpus;
        c.console_log = Some(cfg.console_log.clone());
        c.guest_cid = cfg.guest_cid;
        // Confined like QEMU's back end: its virtio-fs thread's root holds only the share.
        c.fs_share_root = crate::jail::backends_enabled();
        // Its vCPU and device threads enter the runtime's jail (see crate::jail::vmm).
        rootcell_vmm::jail::set_thread_jail(crate::jail::vmm::vmm_thread);
        c.fs_tag = cfg.share_tag.clone();
        let started = Instant::now();
        // BuiltinVm::start leaves no thread or console file behind on error. Its vsock socket
        // too, except from a jailed vsock thread: that one's root holds the socket's directory
        // read-only (it may not unlink), so root removes it here.
        let vm = BuiltinVm::start(c).map_err(|e| {
            if let Err(rm) = std::fs::remove_file(&cfg.vsock_uds) {
                if rm.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(socket = %cfg.vsock_uds.display(), "cannot remove the vsock socket: {rm}");
                }
            }
            HypervisorError::Builtin {
                kernel: cfg.kernel.clone(),
                cause: e,
            }
        })?;
        let (vsock, fs) = vm.slots();
        note(
            &cfg.hypervisor_log,
            &format!(
                "builtin VMM started in {:?}: {} MiB, {vcpus} vCPU(s), vsock at {:#x} irq {}, virtio-fs at {:#x} irq {}\ncmdline: {}",
                started.elapsed(),
                cfg.memory_mib,
                vsock.base,
                vsock.irq,
                fs.base,
                fs.irq,
                vm.cmdline()
            ),
        );
        tracing::info!(
            mem_mib = cfg.memory_mib,
            vcpus,
            cmdline = vm.cmdline(),
            "builtin VMM started"
        );
        Ok(Box::new(BuiltinHandle {
            vm: RwLock::new(Some(vm)),
            status: Mutex::new(None),
            log: cfg.hypervisor_log.clone(),
        }))
    }
}

/// The VMM's own handle on a tap (a dup: the sandbox keeps the original for teardown).
fn net_card(n: &super::NetCard) -> Result<NetConfig, HypervisorError> {
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
    Ok(NetConfig {
        tap: std::sync::Arc::new(tap),
        mac: n.mac.0,
        mtu,
    })
}

/// A running built-in VM.
struct BuiltinHandle {
    /// `None` once stopped; read-locked while waiting, write-locked to stop it.
    vm: RwLock<Option<RunningBuiltinVm>>,
    /// The exit status, once the VM has ended (first one wins).
    status: Mutex<Option<i32>>,
    /// The backend's diagnostics file.
    log: PathBuf,
}

impl BuiltinHandle {
    /// Records the first exit seen; returns the recorded status. A guest that shut down (a
    /// triple fault) also gets its vCPUs' registers and last exits written to the log.
    fn record(&self, exit: &VmExit, vcpus: &[VcpuStatus]) -> i32 {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        *s.get_or_insert_with(|| {
            if *exit == VmExit::Shutdown {
                for line in vcpus.iter().filter_map(shutdown_line) {
                    note(&self.log, &line);
                }
            }
            note(&self.log, &format!("guest exit: {exit:?}"));
            tracing::info!(?exit, "builtin VM ended");
            exit_status(exit)
        })
    }

    /// Waits up to `timeout` for the guest to end; the status if it has.
    fn wait(&self, timeout: Duration) -> Option<i32> {
        if let Some(s) = *self.status.lock().unwrap_or_else(|p| p.into_inner()) {
            return Some(s);
        }
        let guard = self.vm.read().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            Some(vm) => vm
                .wait_timeout(timeout)
                .map(|e| self.record(&e, &vm.vcpu_status())),
            // Stopped by kill(), which recorded the status; 137 if it raced us.
            None => Some(
                self.status
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .unwrap_or(137),
            ),
        }
    }
}

impl Vm for BuiltinHandle {
    fn pid(&self) -> Option<i32> {
        None
    }

    fn wait_stopped(&self) -> i32 {
        loop {
            if let Some(s) = self.wait(WAIT_SLICE) {
                return s;
            }
        }
    }

    fn try_stopped(&self) -> Option<i32> {
        self.wait(Duration::ZERO)
    }

    fn kill(&self) {
        let vm = self.vm.write().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(vm) = vm {
            // stop() joins the vCPU threads (bounded) and then the device threads.
            let report = vm.stop();
            note(
                &self.log,
                &format!(
                    "stopped: exit {:?}, first KVM_RUN after {:?}, stuck vCPUs {:?}, vCPUs {:?}",
                    report.exit, report.create_to_first_run, report.stuck_vcpus, report.vcpus
                ),
            );
            if !report.stuck_vcpus.is_empty() {
                tracing::warn!(stuck = ?report.stuck_vcpus, "vCPU threads did not leave KVM_RUN; they end with the sandbox process");
            }
            self.record(&report.exit, &report.vcpus);
        }
    }

    fn set_paused(&self, paused: bool) -> std::io::Result<()> {
        let guard = self.vm.read().unwrap_or_else(|p| p.into_inner());
        let Some(vm) = guard.as_ref() else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the guest has already stopped",
            ));
        };
        if paused {
            // The VMM resumes the guest itself if it cannot park every vCPU and device.
            vm.pause().map_err(std::io::Error::other)?;
        } else {
            vm.resume();
        }
        note(&self.log, if paused { "paused" } else { "resumed" });
        Ok(())
    }

    fn finish(&self, timeout: Duration) {
        let _ = self.wait(timeout);
        self.kill();
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
            vsock_uds: dir.join("vsock.sock"),
            guest_cid: 3,
            share_dir: dir.join("share"),
            share_tag: "rootcell".into(),
            nets: vec![],
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
        vm.set_paused(true).expect("pause");
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
