//! `create` (and the first half of `run`): check the bundle, record the container, launch its
//! sandbox and wait until the sandbox reports "created" or an error. Any failure removes
//! everything this command made.

use super::Global;
use crate::error::RuntimeError;
use crate::sandbox::Ready;
use crate::state::{ContainerState, Status};
use crate::{paths, share, spec};
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// What `create` needs besides the id.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Bundle directory.
    pub bundle: PathBuf,
    /// Pid file to write.
    pub pid_file: Option<PathBuf>,
    /// Console socket.
    pub console_socket: Option<PathBuf>,
    /// The caller stays attached (`run` without `--detach`): a terminal may use our stdio.
    pub attached: bool,
}

/// A launched sandbox.
pub struct Launched {
    /// The sandbox process (our child).
    pub child: Child,
}

/// Removes the state and run dirs unless disarmed.
struct Undo {
    state_dir: PathBuf,
    run_dir: PathBuf,
    cgroups_path: Option<String>,
    armed: bool,
}

impl Drop for Undo {
    fn drop(&mut self) {
        if self.armed {
            let _ = share::remove_run_dir(&self.run_dir);
            if let Some(cg) = &self.cgroups_path {
                crate::cgroup::remove(cg);
            }
            let _ = std::fs::remove_dir_all(&self.state_dir);
        }
    }
}

/// The guest privilege policy gives root in the guest every capability; a user namespace would
/// map that root to someone else, which the policy cannot honour.
fn check_privileged(spec: &oci_spec::runtime::Spec) -> Result<()> {
    let userns = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|ns| {
            ns.iter()
                .any(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::User)
        });
    if userns {
        bail!("--guest-privileged (or \"guest_privileged\" in the rootcell config) cannot be combined with a user namespace in config.json (linux.namespaces has \"user\"); drop one of them");
    }
    Ok(())
}

/// Runs `create`: returns once the container is created.
pub fn create(g: &Global, id: &str, opts: &CreateOptions) -> Result<Launched> {
    let _span = tracing::info_span!("create", id).entered();
    let started = Instant::now();
    crate::id::validate(id)?;
    // From here on a SIGTERM (or SIGINT, SIGHUP, SIGQUIT) ends the command through the cleanup
    // below, not by the default action, which would leave the sandbox booting on its own.
    let mut abort = AbortWatch::start()?;
    let bundle = spec::load(&opts.bundle)?;
    let terminal = spec::has_terminal(&bundle.spec);
    if terminal && opts.console_socket.is_none() && !opts.attached {
        bail!("config.json has process.terminal: true but no --console-socket was given; a detached container needs one (or set terminal to false)");
    }
    // Joining a running rootcell container's namespaces puts the container in that one's VM;
    // otherwise a network the VM cannot have is refused before anything is made.
    let mut netns = None;
    let shares_vm = match crate::join::resolve(&g.root, &bundle.spec)? {
        Some(join) => {
            join.check_fits(id, &bundle.spec)?;
            tracing::info!(owner = %join.owner.id, "joining the VM of container {}", join.owner.id);
            Some(crate::state::SharedVm {
                owner: join.owner.id.clone(),
                owner_run_dir: join.owner.vm_run_dir().to_path_buf(),
            })
        }
        None => {
            if let crate::network::Namespace::Path(p) = crate::network::check(&bundle.spec)? {
                netns = Some(p);
            }
            None
        }
    };
    // Fail on missing boot files before making anything.
    crate::hypervisor::preflight()?;
    let guest_privileged = g.guest_privileged
        || crate::hypervisor::select::config_from_env()?
            .guest_privileged
            .unwrap_or(false);
    if guest_privileged {
        check_privileged(&bundle.spec)?;
    }

    std::fs::create_dir_all(&g.root)
        .with_context(|| format!("cannot create state root {}", g.root.display()))?;
    let state_dir = paths::state_dir(&g.root, id);
    match std::fs::create_dir(&state_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(RuntimeError::Exists(id.to_string()).into())
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot create state dir {}", state_dir.display()))
        }
    }
    let run_dir = paths::run_dir(&g.root, id);
    if run_dir.join(paths::CONTROL_SOCKET).as_os_str().len() > paths::MAX_SOCKET_PATH {
        bail!("run dir {} is too long for unix sockets", run_dir.display());
    }
    let cgroups_path = bundle
        .spec
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().as_ref())
        .map(|p| p.display().to_string());
    let mut undo = Undo {
        state_dir: state_dir.clone(),
        run_dir: run_dir.clone(),
        cgroups_path: cgroups_path.clone(),
        armed: true,
    };
    // A run dir left by a crashed create of the same root and id is stale (its state dir was
    // gone, or we could not have created ours).
    let _ = share::remove_run_dir(&run_dir);
    if let Some(parent) = run_dir.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    // Root's alone (the vsock back end's jailed gid may read it once the VM starts): the
    // sockets in it need no mode of their own. Made 0700, so it is never open to others even
    // briefly; the chmod after it is for a umask that took the owner's bits.
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
        .create(&run_dir)
        .with_context(|| format!("cannot create run dir {}", run_dir.display()))?;
    std::fs::set_permissions(
        &run_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .with_context(|| format!("cannot restrict run dir {}", run_dir.display()))?;

    let hooks = bundle.spec.hooks().clone().unwrap_or_default();
    let state = ContainerState {
        id: id.to_string(),
        bundle: bundle.dir.clone(),
        rootfs: bundle.rootfs.clone(),
        status: Status::Creating,
        pid: 0,
        pid_start: 0,
        vm_pid: 0,
        vm_pid_start: 0,
        created: crate::timefmt::now(),
        annotations: bundle.spec.annotations().clone().unwrap_or_default(),
        run_dir: run_dir.clone(),
        exit_status: None,
        cgroups_path,
        guest_privileged,
        poststart: hooks.poststart().clone().unwrap_or_default(),
        poststop: hooks.poststop().clone().unwrap_or_default(),
        guest_pid: 0,
        vm_memory_mib: 0,
        shares_vm,
        pooled: None,
        netns,
    };
    state.save(&paths::state_file(&g.root, id))?;

    let tty_stdio = terminal && opts.console_socket.is_none();
    let mut child = spawn_sandbox(g, id, opts.console_socket.as_deref(), tty_stdio)?;
    let failed = |child: &mut Child, grace: Duration| {
        reap_failed(child, grace);
        // The VMM died with the sandbox (its process group, and its death signal); make sure
        // it is gone before the undo removes its cgroup and run dir.
        end_recorded_vmm(&paths::state_file(&g.root, id));
    };
    match wait_ready(&mut child.1, Some(&mut abort)) {
        Ok(()) => {}
        Err(Interrupted(signal)) => {
            tracing::info!(
                signal,
                "{} while the guest was booting: stopping the sandbox",
                crate::signal::name(signal)
            );
            failed(&mut child.0, Duration::ZERO);
            drop(undo);
            return Err(RuntimeError::Interrupted {
                signal,
                id: id.to_string(),
                secs: started.elapsed().as_secs_f64(),
            }
            .into());
        }
        Err(Failed(e)) => {
            failed(&mut child.0, crate::timeouts::PROCESS_GONE);
            return Err(e);
        }
    }
    let pid = child.0.id();
    if let Some(p) = &opts.pid_file {
        if let Err(e) = write_pid_file(p, pid) {
            failed(&mut child.0, crate::timeouts::PROCESS_GONE);
            return Err(e);
        }
    }
    undo.armed = false;
    tracing::info!(pid, "container created");
    Ok(Launched { child: child.0 })
}

/// Starts a hidden rootcell subcommand (`sandbox`, `exec-relay`) in a new session, with the
/// write end of a readiness pipe as fd 3. With `quiet_stdio` it gets /dev/null as stdio. With
/// `dies_with_caller` it is SIGKILLed if this thread ends before the helper has cleared that
/// (the sandbox does so just before it reports ready, see [`crate::sandbox::main`]): a sandbox
/// whose `create` was killed outright stops booting instead of living on unclaimed.
pub fn spawn_helper(
    g: &Global,
    args: &[String],
    quiet_stdio: bool,
    dies_with_caller: bool,
) -> Result<(Child, OwnedFd)> {
    let (rd, wr) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("cannot create a pipe")?;
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg0("rootcell").args(g.args()).args(args);
    if quiet_stdio {
        // With a terminal the process's stdio is the pty; the caller (Docker's shim) waits
        // for EOF on our stdout/stderr, so a long-lived helper must not hold them.
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
    }
    let wfd = wr.as_raw_fd();
    let caller = std::process::id() as i32;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // The death signal follows the forking thread, this command's main thread, which
            // waits for the report; a caller already gone fails the spawn.
            if dies_with_caller
                && (libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0
                    || libc::getppid() != caller)
            {
                return Err(std::io::Error::last_os_error());
            }
            // Own session and process group: `delete --force` kills the group, and the caller's
            // terminal signals do not hit it directly.
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let r = if wfd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(wfd, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .context("cannot start a rootcell helper process")?;
    drop(wr);
    Ok((child, rd))
}

/// Starts `rootcell sandbox` for `id`.
fn spawn_sandbox(
    g: &Global,
    id: &str,
    console: Option<&Path>,
    tty_stdio: bool,
) -> Result<(Child, OwnedFd)> {
    let mut args: Vec<String> = ["sandbox", "--id", id, "--ready-fd", "3"]
        .map(String::from)
        .to_vec();
    if let Some(c) = console {
        args.extend([
            "--console-socket".to_string(),
            crate::paths::absolute(c).display().to_string(),
        ]);
    }
    if tty_stdio {
        args.push("--tty-stdio".into());
    }
    spawn_helper(g, &args, console.is_some(), true)
}

/// How a wait for a helper's readiness report ended without one.
pub enum NotReady {
    /// One of [`crate::signal::ABORT`] arrived (only when the caller watches them).
    Interrupted(i32),
    /// The helper failed, died, or did not report in time.
    Failed(anyhow::Error),
}
use NotReady::{Failed, Interrupted};

impl From<NotReady> for anyhow::Error {
    fn from(n: NotReady) -> Self {
        match n {
            Interrupted(sig) => anyhow::anyhow!("interrupted by {}", crate::signal::name(sig)),
            Failed(e) => e,
        }
    }
}

/// The [`crate::signal::ABORT`] signals, blocked in the calling thread (and so in the threads
/// it starts later; children get a clean mask) and read from a signalfd, so that a wait can
/// end on them. They stay blocked when the watch is dropped: `run` forwards them to the
/// container from then on, and `create` exits.
pub struct AbortWatch {
    fd: nix::sys::signalfd::SignalFd,
}

impl AbortWatch {
    /// Blocks the signals and opens the signalfd.
    pub fn start() -> Result<Self> {
        let mut set = nix::sys::signal::SigSet::empty();
        for s in crate::signal::ABORT {
            if let Ok(sig) = nix::sys::signal::Signal::try_from(*s) {
                set.add(sig);
            }
        }
        set.thread_block()
            .context("cannot block SIGTERM and SIGINT")?;
        let fd = nix::sys::signalfd::SignalFd::with_flags(
            &set,
            nix::sys::signalfd::SfdFlags::SFD_CLOEXEC | nix::sys::signalfd::SfdFlags::SFD_NONBLOCK,
        )
        .context("cannot watch for SIGTERM and SIGINT (signalfd)")?;
        Ok(AbortWatch { fd })
    }

    /// The first pending signal, if any.
    fn take(&mut self) -> Option<i32> {
        match self.fd.read_signal() {
            Ok(Some(info)) => Some(info.ssi_signo as i32),
            _ => None,
        }
    }
}

/// Reads a helper's one-line report, bounded by everything the sandbox itself waits for; with
/// `abort`, also ends on one of its signals.
pub fn wait_ready(rd: &mut OwnedFd, mut abort: Option<&mut AbortWatch>) -> Result<(), NotReady> {
    let bound = crate::timeouts::create_ready(crate::sandbox::boot_timeout());
    let deadline = Instant::now() + bound;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Failed(anyhow::anyhow!(
                "the sandbox did not report within {} s",
                bound.as_secs()
            )));
        }
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = vec![nix::poll::PollFd::new(
            rd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        if let Some(a) = abort.as_deref() {
            fds.push(nix::poll::PollFd::new(
                a.fd.as_fd(),
                nix::poll::PollFlags::POLLIN,
            ));
        }
        match nix::poll::poll(&mut fds, ms) {
            Ok(0) => continue,
            Ok(_) => {
                let ready = fds[0].any().unwrap_or(true);
                if let Some(sig) = abort.as_deref_mut().and_then(AbortWatch::take) {
                    return Err(Interrupted(sig));
                }
                if ready {
                    break;
                }
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(Failed(anyhow::anyhow!("waiting for the sandbox: {e}"))),
        }
    }
    let read = || -> Result<()> {
        let mut line = String::new();
        BufReader::new(std::fs::File::from(rd.try_clone()?)).read_line(&mut line)?;
        match serde_json::from_str::<Ready>(&line) {
            Ok(r) if r.ok => Ok(()),
            Ok(r) => Err(r.into_error()),
            Err(_) => {
                bail!("the sandbox process exited before reporting; see the log (--log) for why")
            }
        }
    };
    read().map_err(Failed)
}

/// After a failed create: make sure the sandbox (and with it the VM) is gone. It may end by
/// itself for `grace` (it removes its VM first); then its process group is SIGKILLed. A
/// process that SIGKILL does not end (stuck in the kernel) is left, with a warning, rather
/// than waited for without end.
pub fn reap_failed(child: &mut Child, grace: Duration) {
    let exited = |child: &mut Child, within: Duration| {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    if exited(child, grace) {
        return;
    }
    // SAFETY: the child is unreaped, so its pid (and group) are still ours.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    let _ = child.kill();
    if !exited(child, crate::timeouts::PROCESS_GONE) {
        tracing::warn!(
            pid = child.id(),
            state = %crate::state::proc_state_line(child.id() as i32),
            "the sandbox process did not end within {:?} of SIGKILL; leaving it",
            crate::timeouts::PROCESS_GONE
        );
    }
}

/// SIGKILLs the VMM recorded in a failed create's state file, if it still runs, and waits
/// (bounded) until it is gone.
fn end_recorded_vmm(state_file: &Path) {
    let Ok(st) = ContainerState::load(state_file) else {
        return;
    };
    if !super::delete::kill_recorded(st.vm_pid, st.vm_pid_start, crate::timeouts::VMM_GONE) {
        tracing::warn!(
            pid = st.vm_pid,
            state = %crate::state::proc_state_line(st.vm_pid),
            "the VMM process did not end within {:?} of SIGKILL; leaving it",
            crate::timeouts::VMM_GONE
        );
    }
}

/// Writes the pid file atomically (temp file + rename), as runc does.
pub fn write_pid_file(path: &Path, pid: u32) -> Result<()> {
    let path = crate::paths::absolute(path);
    let tmp = path.with_extension("rootcell-tmp");
    std::fs::write(&tmp, pid.to_string())
        .with_context(|| format!("cannot write pid file {}", tmp.display()))?;
    std::fs::rename(&tmp, &path)
        .with_context(|| format!("cannot write pid file {}", path.display()))
}
