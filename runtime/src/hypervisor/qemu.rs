//! QEMU microvm backend: vsock and virtio-fs are served in-process as vhost-user backends, QEMU
//! runs as a child that dies with us (PR_SET_PDEATHSIG), KVM when the CPU really has it, TCG
//! otherwise.

use super::{Hypervisor, HypervisorError, Vm, VmConfig};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Kernel parameters only the QEMU backend's guests get: how the guest ends (see
/// `command_args`).
pub const QEMU_KERNEL_ARGS: &str = "reboot=t";

/// Which QEMU accelerator to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization through /dev/kvm.
    Kvm,
    /// QEMU's instruction emulator.
    Tcg,
}

/// Picks KVM only if /dev/kvm opens and the CPU advertises vmx/svm (a software /dev/kvm such as
/// kvm_pvm cannot boot a stock guest); returns the reason for logs. `ROOTCELL_ACCEL=kvm|tcg`
/// overrides.
pub fn detect_accel() -> (Accel, String) {
    match std::env::var("ROOTCELL_ACCEL").as_deref() {
        Ok("kvm") => return (Accel::Kvm, "ROOTCELL_ACCEL=kvm".into()),
        Ok("tcg") => return (Accel::Tcg, "ROOTCELL_ACCEL=tcg".into()),
        _ => {}
    }
    // The same look at the host as `auto` takes (one probe, one rule).
    let probe = super::select::HostProbe::detect();
    let accel = if probe.hardware_kvm() {
        Accel::Kvm
    } else {
        Accel::Tcg
    };
    (accel, probe.describe())
}

/// Finds the QEMU binary: `$ROOTCELL_QEMU`, else `qemu-system-x86_64` on PATH.
pub fn find_program() -> Result<PathBuf, HypervisorError> {
    if let Some(p) = std::env::var_os("ROOTCELL_QEMU") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(HypervisorError::Missing {
                what: "QEMU",
                path: p,
                hint: "fix ROOTCELL_QEMU",
            })
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| p.is_file())
        .ok_or(HypervisorError::Missing {
            what: "qemu-system-x86_64",
            path: PathBuf::from("$PATH"),
            hint: "install qemu-system-x86 or set ROOTCELL_QEMU",
        })
}

/// A QEMU release, as `qemu-system-x86_64 --version` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct QemuVersion {
    /// Major release (7 for Debian 12's 7.2, 10 for Debian 13's 10.0).
    pub major: u32,
    /// Minor release.
    pub minor: u32,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Parses the first line of `--version` ("QEMU emulator version 10.0.13 (Debian ...)").
pub fn parse_version(out: &str) -> Option<QemuVersion> {
    let rest = out.split("QEMU emulator version ").nth(1)?;
    let mut nums = rest
        .split(|c: char| !c.is_ascii_digit())
        .map(str::parse::<u32>);
    Some(QemuVersion {
        major: nums.next()?.ok()?,
        minor: nums.next()?.ok()?,
    })
}

/// Asks `program --version`; `None` if it cannot say.
pub fn detect_version(program: &Path) -> Option<QemuVersion> {
    let out = Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    parse_version(&String::from_utf8_lossy(&out.stdout))
}

/// Guest kernel argument that keeps TCG from running stale code (see [`tcg_kernel_args`]).
pub const TCG_STALE_CODE_ARG: &str = "init_on_alloc=1";

/// Guest kernel arguments the QEMU backend adds for `accel` and QEMU `version`, given the
/// command line `cmdline` so far (a setting already there, e.g. from `ROOTCELL_KERNEL_ARGS`,
/// wins).
///
/// Under TCG, QEMU runs guest code from translations it caches per guest-physical page and
/// drops a page's translations only when it sees a write to that page. The vhost-user back ends
/// (virtio-fs, vsock) write guest RAM from another process through the shared memfd, which QEMU
/// never sees. virtio-fs reads land directly in page-cache pages, and the guest drops and
/// re-reads a file's pages on every open (no keep-cache), so a page that held one piece of
/// program text gets another from the back end while QEMU still holds translations of the old
/// one: with QEMU 10.0 (Debian 13), 199 of 200 `/bin/true` runs from the share crashed (jumps to
/// 0x28, faults at random program addresses) while the file read back byte-identical. With
/// `init_on_alloc=1` the guest kernel zeroes every page it allocates, a CPU write QEMU sees,
/// so a page's old translations are gone before the back end fills it. QEMU 7.2 has not shown
/// the failure and keeps its boot as tested; any later or unknown version gets the argument.
/// KVM has no translation cache and needs nothing.
pub fn tcg_kernel_args(
    accel: Accel,
    version: Option<QemuVersion>,
    cmdline: &str,
) -> Option<&'static str> {
    let old = version.is_some_and(|v| v < QemuVersion { major: 8, minor: 0 });
    let set = cmdline
        .split_whitespace()
        .any(|a| a.starts_with("init_on_alloc="));
    (accel == Accel::Tcg && !old && !set).then_some(TCG_STALE_CODE_ARG)
}

/// Escapes a value for a QEMU `-opt key=value,...` list (commas are doubled).
fn esc(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// The QEMU command line (without the program) for `cfg`, for QEMU `version` (see
/// [`tcg_kernel_args`]).
pub fn command_args(
    cfg: &VmConfig,
    accel: Accel,
    version: Option<QemuVersion>,
    vsock_vu: &Path,
    fs_vu: &Path,
) -> Vec<String> {
    // microvm with acpi=off has no power-off: the agent's reboot triple-faults (`reboot=t`)
    // and `-no-reboot` makes that QEMU's exit.
    let base = format!("{} {QEMU_KERNEL_ARGS}", cfg.cmdline);
    let cmdline = match tcg_kernel_args(accel, version, &cfg.cmdline) {
        Some(extra) => format!("{base} {extra}"),
        None => base,
    };
    let mem = format!("{}M", cfg.memory_mib);
    let (accel, cpu) = match accel {
        Accel::Kvm => ("kvm", "host"),
        Accel::Tcg => ("tcg", "max"),
    };
    let mut a: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
    push(&[
        "-M",
        "microvm,acpi=off,x-option-roms=off,rtc=off,memory-backend=mem",
    ]);
    push(&[
        "-accel",
        accel,
        "-cpu",
        cpu,
        "-smp",
        &cfg.vcpus.to_string(),
        "-m",
        &mem,
    ]);
    push(&[
        "-object",
        &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
    ]);
    push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
    // QEMU's own seccomp filter: no obsolete syscalls, no setuid, no fork/exec, no scheduler or
    // resource changes. The guest drives QEMU's device code, so that code gets only what it needs.
    push(&[
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ]);
    push(&["-serial", &format!("file:{}", esc(&cfg.console_log))]);
    push(&[
        "-kernel",
        &cfg.kernel.display().to_string(),
        "-initrd",
        &cfg.initrd.display().to_string(),
    ]);
    push(&["-append", &cmdline]);
    push(&[
        "-chardev",
        &format!("socket,id=vsock,path={}", esc(vsock_vu)),
    ]);
    push(&["-device", "vhost-user-vsock-device,chardev=vsock"]);
    for (i, n) in cfg.nets.iter().enumerate() {
        // The tap fd is inherited (see `Qemu::start`); QEMU reads its vnet-header flag itself.
        push(&["-netdev", &format!("tap,id=net{i},fd={}", n.tap_fd)]);
        push(&[
            "-device",
            &format!(
                "virtio-net-device,netdev=net{i},mac={},host_mtu={}",
                n.mac, n.mtu
            ),
        ]);
    }
    push(&["-chardev", &format!("socket,id=fs,path={}", esc(fs_vu))]);
    push(&[
        "-device",
        &format!("vhost-user-fs-device,chardev=fs,tag={}", cfg.share_tag),
    ]);
    a
}

/// The QEMU backend.
pub struct Qemu {
    program: PathBuf,
    accel: Accel,
}

impl Qemu {
    /// A backend running `program` with `accel`.
    pub fn new(program: PathBuf, accel: Accel) -> Self {
        Qemu { program, accel }
    }
}

impl Hypervisor for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn start(&self, cfg: &VmConfig) -> Result<Box<dyn Vm>, HypervisorError> {
        let vsock_vu = cfg.socket_dir.join(crate::paths::VSOCK_VHOST_SOCKET);
        let fs_vu = cfg.socket_dir.join(crate::paths::FS_VHOST_SOCKET);
        let vsock = rootcell_vsock::serve_vhost_user(
            &vsock_vu,
            rootcell_vsock::VsockConfig {
                guest_cid: cfg.guest_cid,
                uds_path: cfg.vsock_uds.clone(),
            },
        )
        .map_err(|e| HypervisorError::Device {
            device: "vsock",
            msg: e.to_string(),
        })?;
        let fs = rootcell_fs::serve_vhost_user(
            &fs_vu,
            rootcell_fs::FsConfig {
                shared_dir: cfg.share_dir.clone(),
                read_only: false,
            },
        )
        .map_err(|e| {
            vsock.stop();
            HypervisorError::Device {
                device: "virtio-fs",
                msg: e.to_string(),
            }
        })?;
        let stderr = std::fs::File::create(&cfg.hypervisor_log)
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null());
        let mut cmd = Command::new(&self.program);
        // Only TCG's arguments depend on the version; KVM does not pay for asking.
        let version = match self.accel {
            Accel::Tcg => detect_version(&self.program),
            Accel::Kvm => None,
        };
        if let Some(extra) = tcg_kernel_args(self.accel, version, &cfg.cmdline) {
            tracing::info!(
                qemu_version = ?version.map(|v| v.to_string()),
                "TCG: guest kernel gets {extra} (vhost-user writes to guest RAM are invisible to QEMU's translation cache)"
            );
        }
        cmd.args(command_args(cfg, self.accel, version, &vsock_vu, &fs_vu))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let parent = std::process::id() as i32;
        let tap_fds: Vec<i32> = cfg.nets.iter().map(|n| n.tap_fd).collect();
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // QEMU must not outlive the sandbox, even on SIGKILL. The death signal follows
                // the forking thread, which is the sandbox's main thread (it lives to the end).
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0
                    || libc::getppid() != parent
                {
                    return Err(std::io::Error::last_os_error());
                }
                // The taps were opened close-on-exec; QEMU gets them by number.
                for &fd in &tap_fds {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| {
            vsock.stop();
            fs.stop();
            HypervisorError::Spawn {
                program: self.program.clone(),
                source,
            }
        })?;
        tracing::info!(qemu_pid = child.id(), accel = ?self.accel, mem_mib = cfg.memory_mib, vcpus = cfg.vcpus, "qemu started");
        Ok(Box::new(QemuVm {
            pid: child.id() as i32,
            child: Mutex::new(Some(child)),
            backends: Mutex::new(Some((vsock, fs))),
        }))
    }
}

/// A running QEMU and its device backends.
struct QemuVm {
    pid: i32,
    child: Mutex<Option<Child>>,
    backends: Mutex<Option<(rootcell_vsock::BackendHandle, rootcell_fs::BackendHandle)>>,
}

/// waitid(WEXITED|WNOWAIT|extra) on `pid`: the exit status, without reaping.
fn peek_exit(pid: i32, extra: i32) -> Option<i32> {
    loop {
        // SAFETY: siginfo_t is plain data; waitid fills it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes into `info`, which lives across the call.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT | extra,
            )
        };
        if r < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            // ECHILD: already reaped by finish(); report it as killed.
            return Some(137);
        }
        // SAFETY: filled by a successful waitid.
        let (spid, code, status) = unsafe { (info.si_pid(), info.si_code, info.si_status()) };
        if spid == 0 {
            return None;
        }
        return Some(if code == libc::CLD_EXITED {
            status
        } else {
            128 + status
        });
    }
}

impl Vm for QemuVm {
    fn pid(&self) -> Option<i32> {
        Some(self.pid)
    }

    fn wait_stopped(&self) -> i32 {
        peek_exit(self.pid, 0).unwrap_or(137)
    }

    fn try_stopped(&self) -> Option<i32> {
        peek_exit(self.pid, libc::WNOHANG)
    }

    fn kill(&self) {
        if let Ok(guard) = self.child.lock() {
            if guard.is_some() {
                // SAFETY: kill(2) has no memory effects; the child is not reaped yet, so the
                // pid cannot have been reused.
                unsafe { libc::kill(self.pid, libc::SIGKILL) };
            }
        }
    }

    fn set_paused(&self, paused: bool) -> std::io::Result<()> {
        let guard = self
            .child
            .lock()
            .map_err(|_| std::io::Error::other("vm lock poisoned"))?;
        if guard.is_none() {
            return Err(std::io::Error::other("the VM has already exited"));
        }
        // SIGSTOP freezes the whole QEMU process: vCPUs, timers and device emulation alike.
        let sig = if paused { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: plain kill(2) of our unreaped child.
        if unsafe { libc::kill(self.pid, sig) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn finish(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.try_stopped().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        let _ = self.set_paused(false);
        if let Some(mut child) = self.child.lock().ok().and_then(|mut g| g.take()) {
            let _ = child.wait();
        }
        if let Some((vsock, fs)) = self.backends.lock().ok().and_then(|mut g| g.take()) {
            vsock.stop();
            fs.stop();
        }
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        self.finish(Duration::ZERO);
    }
}

#[cfg(test)]
mod tests;
