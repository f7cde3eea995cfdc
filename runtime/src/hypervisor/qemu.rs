//! QEMU microvm backend: vsock and virtio-fs are served in-process as vhost-user backends, QEMU
//! runs as a child that dies with us (PR_SET_PDEATHSIG), KVM when the CPU really has it, TCG
//! otherwise.

use super::{Hypervisor, HypervisorError, Vm, VmConfig};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
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

/// The argument of QEMU's `-name` for the VM of the container whose state dir is `owner`
/// (`guest=<owner>`, commas doubled): what `delete` looks for on a command line.
pub fn name_arg(owner: &Path) -> String {
    format!("guest={}", esc(owner))
}

/// How QEMU reaches its vhost-user back ends and its console.
#[derive(Debug, Clone, Copy)]
pub enum Plumbing<'a> {
    /// By path: QEMU connects to the sockets and creates the console log itself.
    Paths {
        /// The vsock back end's vhost-user socket.
        vsock: &'a Path,
        /// The virtio-fs back end's vhost-user socket.
        fs: &'a Path,
    },
    /// By inherited descriptors (a jailed QEMU sees none of these paths): sockets already
    /// connected to the back ends, and the console log opened for writing.
    Fds {
        /// Connected to the vsock back end.
        vsock: RawFd,
        /// Connected to the virtio-fs back end.
        fs: RawFd,
        /// The console log, open for writing.
        console: RawFd,
    },
}

/// The QEMU command line (without the program) for `cfg`, for QEMU `version` (see
/// [`tcg_kernel_args`]), reaching its back ends by path; with QEMU's seccomp sandbox if
/// `sandbox`.
pub fn command_args(
    cfg: &VmConfig,
    accel: Accel,
    version: Option<QemuVersion>,
    vsock_vu: &Path,
    fs_vu: &Path,
    sandbox: bool,
) -> Vec<String> {
    command_args_with(
        cfg,
        accel,
        version,
        Plumbing::Paths {
            vsock: vsock_vu,
            fs: fs_vu,
        },
        sandbox,
    )
}

/// The QEMU command line (without the program) for `cfg`, for QEMU `version`, with its back
/// ends and console reached as `plumbing` says; with QEMU's seccomp sandbox if `sandbox` (the
/// VMM's half of the jail, [`crate::jail::Halves`]).
pub fn command_args_with(
    cfg: &VmConfig,
    accel: Accel,
    version: Option<QemuVersion>,
    plumbing: Plumbing<'_>,
    sandbox: bool,
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
    // Names whose VM it is (the container's state dir, `<root>/<id>`), so `ps` and the tests'
    // leftover check can tell which container a QEMU serves: a jailed QEMU's command line has
    // no other path of it. The name is only shown: QEMU makes no file of it.
    push(&["-name", &name_arg(&cfg.owner)]);
    // QEMU's own seccomp filter: no obsolete syscalls, no setuid, no fork/exec, no scheduler or
    // resource changes. The guest drives QEMU's device code, so that code gets only what it needs.
    if sandbox {
        push(&[
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ]);
    }
    let (vsock_dev, fs_dev) = match plumbing {
        Plumbing::Paths { vsock, fs } => {
            push(&["-serial", &format!("file:{}", esc(&cfg.console_log))]);
            (format!("path={}", esc(vsock)), format!("path={}", esc(fs)))
        }
        Plumbing::Fds { vsock, fs, console } => {
            // A connected socket: the sandbox reads it and keeps the log (capped).
            push(&["-chardev", &format!("socket,id=console,fd={console}")]);
            push(&["-serial", "chardev:console"]);
            (format!("fd={vsock}"), format!("fd={fs}"))
        }
    };
    push(&[
        "-kernel",
        &cfg.kernel.display().to_string(),
        "-initrd",
        &cfg.initrd.display().to_string(),
    ]);
    push(&["-append", &cmdline]);
    push(&["-chardev", &format!("socket,id=vsock,{vsock_dev}")]);
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
    push(&["-chardev", &format!("socket,id=fs,{fs_dev}")]);
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
        // Jailed: the back-end threads confine themselves before serving the guest.
        let confine_backends = crate::jail::backends_enabled();
        let confine = |role: crate::jail::thread::Role| {
            move || -> std::io::Result<()> { crate::jail::thread::confine(role) }
        };
        let vsock = rootcell_vsock::serve_vhost_user_confined(
            &vsock_vu,
            rootcell_vsock::VsockConfig {
                guest_cid: cfg.guest_cid,
                uds_path: cfg.vsock_uds.clone(),
            },
            confine_backends.then(|| {
                // Its root holds only the socket directory: it connects guest connections to
                // `<uds>_<port>` there by path, and needs nothing else of the file system. It
                // runs as an unprivileged uid whose group may read that directory.
                let dir = cfg.vsock_uds.parent().map(Path::to_path_buf);
                Box::new(move || -> std::io::Result<()> {
                    crate::jail::vmm::vsock_thread(dir.as_deref())?;
                    crate::jail::thread::confine(crate::jail::thread::Role::Vsock)
                }) as rootcell_vsock::Confine
            }),
        )
        .map_err(|e| HypervisorError::Device {
            device: "vsock",
            msg: e.to_string(),
        })?;
        let fs = rootcell_fs::serve_vhost_user_confined(
            &fs_vu,
            rootcell_fs::FsConfig {
                shared_dir: cfg.share_dir.clone(),
                read_only: false,
            },
            // Its threads' root is the share: they see no other file system.
            rootcell_fs::Jail {
                share_root: confine_backends,
                // And an fd table of their own: through /proc/self/fd they reach only
                // what they hold, not the sandbox's logs or the container's stdio files.
                own_fd_table: confine_backends,
                // Their log lines still reach the sandbox's log, through a pipe.
                relay: crate::logging::file_fd().into_iter().collect(),
                confine: confine_backends.then(|| {
                    Box::new(confine(crate::jail::thread::Role::Fs)) as rootcell_fs::Confine
                }),
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
        let stop_backends = || {
            vsock.stop();
            fs.stop();
        };
        let jailed = if crate::jail::qemu_enabled() {
            Some(
                JailedStart::prepare(cfg, &self.program, self.accel, &vsock_vu, &fs_vu).map_err(
                    |source| {
                        stop_backends();
                        HypervisorError::Spawn {
                            program: self.program.clone(),
                            source,
                        }
                    },
                )?,
            )
        } else {
            tracing::warn!(
                "ROOTCELL_JAIL={}: QEMU runs as root in the host's file system view, without its seccomp sandbox",
                std::env::var("ROOTCELL_JAIL").unwrap_or_default()
            );
            None
        };
        let args = match &jailed {
            // The jail and QEMU's own sandbox come and go together (the VMM's half).
            Some(j) => command_args_with(&j.cfg, self.accel, version, j.plumbing(), true),
            None => command_args(cfg, self.accel, version, &vsock_vu, &fs_vu, false),
        };
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let parent = std::process::id() as i32;
        let mut inherit: Vec<i32> = cfg.nets.iter().map(|n| n.tap_fd).collect();
        if let Some(j) = &jailed {
            inherit.extend(j.fds());
        }
        let jail = jailed.as_ref().map(|j| std::sync::Arc::clone(&j.jail));
        // SAFETY: only async-signal-safe calls between fork and exec (ProcessJail::enter
        // allocates nothing).
        unsafe {
            cmd.pre_exec(move || {
                // QEMU must not outlive the sandbox, even on SIGKILL. The death signal follows
                // the forking thread, which is the sandbox's main thread (it lives to the end).
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0
                    || libc::getppid() != parent
                {
                    return Err(std::io::Error::last_os_error());
                }
                // The taps (and the jail's sockets and console) were opened close-on-exec;
                // QEMU gets them by number.
                for &fd in &inherit {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // Last: it changes the uid and sets the death signal again (a uid change
                // clears it).
                if let Some(jail) = &jail {
                    jail.enter()?;
                }
                Ok(())
            });
        }
        // spawn returns once the child has exec'd: fork, the jail and exec.
        let spawn_started = Instant::now();
        let spawned = cmd.spawn();
        let spawn_us = spawn_started.elapsed().as_micros() as u64;
        // The jail's copies of the descriptors are QEMU's now (or nobody's).
        drop(jailed);
        let child = spawned.map_err(|source| {
            vsock.stop();
            fs.stop();
            HypervisorError::Spawn {
                program: self.program.clone(),
                source,
            }
        })?;
        tracing::info!(qemu_pid = child.id(), accel = ?self.accel, mem_mib = cfg.memory_mib, vcpus = cfg.vcpus, jailed = crate::jail::qemu_enabled(), backends_confined = confine_backends, spawn_us, "qemu started");
        Ok(Box::new(QemuVm {
            pid: child.id() as i32,
            child: Mutex::new(Some(child)),
            backends: Mutex::new(Some((vsock, fs))),
            killed: AtomicBool::new(false),
        }))
    }
}

/// What a jailed QEMU is started with: the jail, and the descriptors it inherits in place of
/// paths it cannot see.
struct JailedStart {
    jail: std::sync::Arc<crate::jail::process::ProcessJail>,
    /// `cfg` with the kernel and initramfs at their places inside the jail.
    cfg: VmConfig,
    vsock: OwnedFd,
    fs: OwnedFd,
    console: OwnedFd,
}

/// One end of a socket pair whose other end's reader copies the guest's console into `log`, at most
/// [`CONSOLE_LOG_CAP`](rootcell_vmm::devices::serial::CONSOLE_LOG_CAP) bytes of it: the guest
/// decides how much it prints (root in a privileged container can write to the UART without
/// end), and the log lives on /run, in host RAM. The same cap as the built-in VMM's console.
fn capped_console(log: &Path) -> std::io::Result<OwnedFd> {
    use rootcell_vmm::devices::serial::{Capped, CONSOLE_LOG_CAP};
    let file = std::fs::File::create(log)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", log.display())))?;
    let (read, write) = std::os::unix::net::UnixStream::pair()?;
    std::thread::Builder::new()
        .name("console-log".into())
        .spawn(move || {
            let mut from = read;
            let mut to = Capped::new(file, CONSOLE_LOG_CAP);
            // Ends at EOF: QEMU and this process both closed the other end.
            let _ = std::io::copy(&mut from, &mut to);
        })?;
    Ok(OwnedFd::from(write))
}

/// Where the guest's boot files appear inside QEMU's jail.
const JAIL_KERNEL: &str = "/vm/kernel";
const JAIL_INITRD: &str = "/vm/initrd";

impl JailedStart {
    /// Connects to the back ends, opens the console log, and lays out QEMU's root: /usr
    /// read-only (Debian's QEMU is dynamically linked: its loader, libraries and firmware
    /// live there) with the host's /lib, /bin... symlinks or read-only binds and
    /// /etc/ld.so.cache, the directory of `program` if it is not under /usr (a wrapper such
    /// as the tests' QEMU 10), the kernel and initramfs, /dev/null, /dev/zero, /dev/urandom,
    /// and for KVM a /dev/kvm node owned by the jailed uid.
    fn prepare(
        cfg: &VmConfig,
        program: &Path,
        accel: Accel,
        vsock_vu: &Path,
        fs_vu: &Path,
    ) -> std::io::Result<Self> {
        use crate::jail::process::ProcessJail;
        use std::os::unix::fs::DirBuilderExt;
        let connect = |p: &Path| -> std::io::Result<OwnedFd> {
            // The back end listens before it reports ready, yet a connect was seen refused once
            // in a loaded test run (cause not found): retry that error briefly.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
            loop {
                match std::os::unix::net::UnixStream::connect(p) {
                    Ok(s) => return Ok(OwnedFd::from(s)),
                    Err(e)
                        if e.kind() == std::io::ErrorKind::ConnectionRefused
                            && std::time::Instant::now() < deadline =>
                    {
                        tracing::warn!("connecting to {}: {e}; retrying", p.display());
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    Err(e) => {
                        return Err(std::io::Error::new(
                            e.kind(),
                            format!("connecting to {}: {e}", p.display()),
                        ))
                    }
                }
            }
        };
        let vsock = connect(vsock_vu)?;
        let fs = connect(fs_vu)?;
        let console = capped_console(&cfg.console_log)?;

        let root = cfg.socket_dir.join(crate::paths::VMM_ROOT_DIR);
        match std::fs::DirBuilder::new().mode(0o700).create(&root) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("{}: {e}", root.display()),
                ))
            }
            _ => {}
        }
        let mut jail = ProcessJail::new(&root, libc::SIGKILL)?;
        for top in ["/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin"] {
            jail.mirror(Path::new(top))?;
        }
        jail.bind(Path::new("/usr"), Path::new("/usr"), false)?;
        if Path::new("/etc/ld.so.cache").exists() {
            jail.bind(
                Path::new("/etc/ld.so.cache"),
                Path::new("/etc/ld.so.cache"),
                false,
            )?;
        }
        let program = std::fs::canonicalize(program)?;
        if !program.starts_with("/usr") {
            if let Some(dir) = program.parent() {
                jail.bind(dir, dir, false)?;
            }
        }
        jail.bind(&cfg.kernel, Path::new(JAIL_KERNEL), false)?;
        jail.bind(&cfg.initrd, Path::new(JAIL_INITRD), false)?;
        jail.bind(Path::new("/dev/null"), Path::new("/dev/null"), true)?;
        jail.bind(Path::new("/dev/zero"), Path::new("/dev/zero"), false)?;
        jail.bind(Path::new("/dev/urandom"), Path::new("/dev/urandom"), false)?;
        if accel == Accel::Kvm {
            // A node of its own, owned by the jailed uid: /dev/kvm is often root's alone
            // (0600), and giving QEMU group root instead would be a privilege of its own.
            jail.own_device(Path::new("/dev/kvm"), Path::new("/dev/kvm"))?;
        }
        let mut jailed_cfg = cfg.clone();
        jailed_cfg.kernel = JAIL_KERNEL.into();
        jailed_cfg.initrd = JAIL_INITRD.into();
        Ok(JailedStart {
            jail: std::sync::Arc::new(jail),
            cfg: jailed_cfg,
            vsock,
            fs,
            console,
        })
    }

    fn plumbing(&self) -> Plumbing<'_> {
        Plumbing::Fds {
            vsock: self.vsock.as_raw_fd(),
            fs: self.fs.as_raw_fd(),
            console: self.console.as_raw_fd(),
        }
    }

    fn fds(&self) -> [RawFd; 3] {
        [
            self.vsock.as_raw_fd(),
            self.fs.as_raw_fd(),
            self.console.as_raw_fd(),
        ]
    }
}

/// A running QEMU and its device backends.
struct QemuVm {
    pid: i32,
    child: Mutex<Option<Child>>,
    backends: Mutex<Option<(rootcell_vsock::BackendHandle, rootcell_fs::BackendHandle)>>,
    /// SIGKILL was sent: `finish` need not wait for a power-off.
    killed: AtomicBool,
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
                self.killed.store(true, Ordering::SeqCst);
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
        // Once killed, the wait below is all that is left (polling would only add its period).
        while !self.killed.load(Ordering::SeqCst)
            && self.try_stopped().is_none()
            && Instant::now() < deadline
        {
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
