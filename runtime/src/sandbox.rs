//! The per-container sandbox process: the long-lived host process Docker's shim waits on. It
//! owns a private mount namespace with the share dir, the device backends, the hypervisor, the
//! agent connection, the stdio relays and the control socket, and exits with the container's
//! status.

use crate::agent::{self, AgentClient, AgentNotice};
use crate::control::{ControlRequest, ControlResponse};
use crate::hypervisor::{NetCard, Vm, VmConfig};
use crate::state::{Action, ContainerState, StateError, Status};
use crate::stdio::{self, Attached, Streams, TerminalMode};
use crate::{console, hooks, paths, share, spec};
use anyhow::{anyhow, bail, Context, Result};
use oci_spec::runtime::Spec;
use rootcell_protocol::{Event, Request, Response, StdioSpec, INIT_PROCESS};
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// Guest CID of every sandbox's VM (each VM has its own vsock device).
pub const GUEST_CID: u64 = 3;
/// Kernel command line of the guest. `no_timer_check`: on a loaded host (many TCG guests) the
/// kernel's timing-based IO-APIC timer check fails and the boot panics; a VM's timer is wired.
pub const KERNEL_CMDLINE: &str = "console=ttyS0 reboot=t panic=-1 quiet no_timer_check";
/// Default bound on boot + agent handshake.
pub const DEFAULT_BOOT_TIMEOUT_SECS: u64 = 60;

/// Arguments of the hidden `sandbox` subcommand.
#[derive(Debug, Clone)]
pub struct SandboxArgs {
    /// State root.
    pub root: PathBuf,
    /// Container id.
    pub id: String,
    /// Fd on which to report readiness (one JSON line) before serving.
    pub ready_fd: i32,
    /// Console socket for `terminal: true`.
    pub console_socket: Option<PathBuf>,
    /// `terminal: true` without console socket: relay the pty over our own stdin/stdout.
    pub tty_stdio: bool,
}

/// What the sandbox tells `create` on the readiness pipe.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Ready {
    /// Created successfully.
    pub ok: bool,
    /// The error otherwise.
    #[serde(default)]
    pub error: String,
    /// Exit status the caller should use when the process itself could not start.
    #[serde(default)]
    pub status: Option<i32>,
}

impl Ready {
    /// Success.
    pub fn ok() -> Self {
        Ready {
            ok: true,
            error: String::new(),
            status: None,
        }
    }

    /// Failure with `e`'s message (and its process exit status, if it has one).
    pub fn failed(e: &anyhow::Error) -> Self {
        let status = e
            .chain()
            .find_map(|c| match c.downcast_ref::<crate::error::RuntimeError>() {
                Some(crate::error::RuntimeError::Process { status, .. }) => Some(*status),
                _ => None,
            });
        Ready {
            ok: false,
            error: format!("{e:#}"),
            status,
        }
    }

    /// The error to report for a failed readiness report.
    pub fn into_error(self) -> anyhow::Error {
        match self.status {
            Some(status) => crate::error::RuntimeError::Process {
                msg: self.error,
                status,
            }
            .into(),
            None => anyhow::anyhow!(self.error),
        }
    }
}

/// Shell-convention exit status for agent error codes that mean "the program cannot run".
pub fn process_status(code: rootcell_protocol::ErrorCode) -> Option<i32> {
    match code {
        rootcell_protocol::ErrorCode::NotFound => Some(127),
        rootcell_protocol::ErrorCode::PermissionDenied => Some(126),
        _ => None,
    }
}

/// Events the main loop waits for.
enum SbEvent {
    Agent(AgentNotice),
    VmStopped(i32),
}

/// State shared between the sandbox's threads.
struct Shared {
    state: Mutex<ContainerState>,
    vm: Arc<dyn Vm>,
    state_path: PathBuf,
    agent: Arc<AgentClient>,
    /// Control requests being served; teardown waits for them so `start` gets its answer.
    in_flight: AtomicUsize,
    /// The terminal whose size is relayed on SIGWINCH.
    tty_fd: Option<i32>,
    /// Exec'd processes waiting for their exit status, by exec id.
    exec_waiters: Mutex<HashMap<String, mpsc::Sender<i32>>>,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut ContainerState)) {
        if let Ok(mut s) = self.state.lock() {
            f(&mut s);
            if let Err(e) = s.save(&self.state_path) {
                tracing::error!("cannot write {}: {e}", self.state_path.display());
            }
        }
    }
}

/// Runs the sandbox; returns the process exit status.
pub fn main(args: SandboxArgs) -> i32 {
    // SAFETY: the fd was set up for us by `create` and is ours alone.
    let mut ready = unsafe { File::from_raw_fd(args.ready_fd) };
    let report = |ready: &mut File, r: Ready| {
        let mut line = serde_json::to_vec(&r).unwrap_or_default();
        line.push(b'\n');
        let _ = ready.write_all(&line);
    };
    match prepare(&args) {
        Ok(sb) => {
            report(&mut ready, Ready::ok());
            drop(ready);
            sb.serve()
        }
        Err(e) => {
            tracing::error!("{e:#}");
            report(&mut ready, Ready::failed(&e));
            1
        }
    }
}

/// Everything `prepare` built, ready to serve.
struct Sandbox {
    shared: Arc<Shared>,
    vm: Arc<dyn Vm>,
    events: mpsc::Receiver<SbEvent>,
    events_tx: mpsc::Sender<SbEvent>,
    streams: Streams,
    control: UnixListener,
    run_dir: PathBuf,
    saved_termios: Option<console::RawTerminal>,
    /// The taps and tc filters behind the VM's network cards, undone after the VM is gone.
    network: Option<rootcell_net::Mirror>,
}

/// Namespaces first (single-threaded), then share dir, VM, agent, Create.
fn prepare(args: &SandboxArgs) -> Result<Sandbox> {
    let state_path = paths::state_file(&args.root, &args.id);
    let mut state = ContainerState::load(&state_path)
        .with_context(|| format!("cannot read {}", state_path.display()))?;
    let bundle = spec::load(&state.bundle)?;
    isolate(&bundle.spec)?;
    block_signals();
    // Do not pin the caller's cwd (often the bundle) for the container's lifetime.
    let _ = std::env::set_current_dir("/");
    let me = std::process::id() as i32;
    state.pid = me;
    state.pid_start = crate::state::proc_stat(me).map(|s| s.0).unwrap_or(0);
    state.save(&state_path)?;
    if let Some(cg) = &state.cgroups_path {
        // Before the VMM starts, so it inherits the cgroup; CPU only once the guest is up.
        for e in crate::cgroup::join(cg, me as u32, crate::cgroup::Part::AllButCpu) {
            tracing::warn!("cgroup: {e}");
        }
    }

    let host_span = tracing::info_span!("host_setup", id = %args.id).entered();
    let run_dir = state.run_dir.clone();
    let share_dir = run_dir.join(paths::SHARE_DIR);
    let binds = spec::bind_mounts(&bundle.spec, &bundle.dir);
    share::build(&share_dir, &bundle.rootfs, &binds)?;
    // Before the VM: Docker's libnetwork-setkey hook is what puts the veth into our network
    // namespace, and the VM's network cards are made from what is there.
    run_create_hooks(&bundle.spec, &state)?;
    let network = crate::network::mirror()?;
    let nets = network
        .as_ref()
        .map(|(mirror, _)| {
            mirror
                .taps()
                .iter()
                .filter_map(|t| {
                    Some(NetCard {
                        tap_fd: t.raw_fd()?,
                        mac: t.mac,
                        mtu: t.mtu,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let loopback_dns = network
        .as_ref()
        .and_then(|_| crate::dns::loopback_resolver(&bundle.spec, &bundle.dir));
    if let Some(addr) = loopback_dns {
        crate::dns::serve(
            &run_dir.join(paths::dns_relay_socket()),
            &run_dir.join(paths::dns_tcp_relay_socket()),
            addr,
        )?;
        tracing::info!(%addr, "relaying the guest's DNS queries to the container's loopback resolver");
    }
    let crate::hypervisor::Opened {
        hypervisor: hv,
        images,
        selection,
    } = crate::hypervisor::open()?;
    let (memory_mib, vcpus) = spec::vm_resources(&bundle.spec);
    let state_dir = paths::state_dir(&args.root, &args.id);
    let console_log = state_dir.join("console.log");
    let cfg = VmConfig {
        kernel: images.kernel,
        initrd: images.initrd,
        memory_mib,
        vcpus,
        cmdline: match std::env::var("ROOTCELL_KERNEL_ARGS") {
            Ok(extra) if !extra.is_empty() => format!("{KERNEL_CMDLINE} {extra}"),
            _ => KERNEL_CMDLINE.to_string(),
        },
        console_log: console_log.clone(),
        hypervisor_log: state_dir.join(format!("{}.log", hv.name())),
        socket_dir: run_dir.clone(),
        vsock_uds: run_dir.join(paths::VSOCK_UDS),
        guest_cid: GUEST_CID,
        share_dir,
        share_tag: rootcell_protocol::SHARE_TAG.to_string(),
        nets,
    };
    drop(host_span);

    let vm: Arc<dyn Vm> = {
        let _s = tracing::info_span!("vm_start").entered();
        tracing::info!(hypervisor = hv.name(), reason = %selection.reason, "starting the guest");
        Arc::from(hv.start(&cfg)?)
    };
    state.vm_pid = vm.pid().unwrap_or(0);
    state.vm_pid_start = crate::state::proc_stat(state.vm_pid)
        .map(|s| s.0)
        .unwrap_or(0);
    state.save(&state_path)?;

    let (events_tx, events) = mpsc::channel();
    let agent = {
        let _s = tracing::info_span!("agent_ready").entered();
        let secs = std::env::var("ROOTCELL_BOOT_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(DEFAULT_BOOT_TIMEOUT_SECS);
        let deadline = Instant::now() + Duration::from_secs(secs);
        let stream = agent::connect_control(&cfg.vsock_uds, deadline, || vm.try_stopped().is_none()).map_err(|e| {
            let mut tail = tail_lines(&console_log, 15);
            // The kernel's banner says how far the guest got even when later lines push it
            // out of the tail (the built-in VMM on a software /dev/kvm prints it, then stops).
            if let Some(banner) = kernel_banner(&console_log).filter(|b| !tail.contains(b.as_str())) {
                tail = format!("{banner}\n...\n{tail}");
            }
            match vm.try_stopped() {
                Some(st) => anyhow!(
                    "the guest stopped before its agent answered (hypervisor exit status {st}; {e}); hypervisor log: {}; last console lines:\n{tail}",
                    tail_lines(&cfg.hypervisor_log, 5)
                ),
                None => anyhow!("the guest did not come up within {secs} s ({e}); last console lines:\n{tail}"),
            }
        })?;
        let tx = events_tx.clone();
        let agent = AgentClient::start(stream, move |n| {
            let _ = tx.send(SbEvent::Agent(n));
        })?;
        match agent.request(Request::Hello { version: rootcell_protocol::PROTOCOL_VERSION }, Duration::from_secs(10))? {
            Response::Hello { version, kernel_release } if version == rootcell_protocol::PROTOCOL_VERSION => {
                tracing::info!(kernel_release, "agent ready");
            }
            Response::Hello { version, .. } => bail!(
                "guest agent speaks protocol version {version}, this runtime {}; rebuild the initramfs from the same rootcell release",
                rootcell_protocol::PROTOCOL_VERSION
            ),
            other => bail!("unexpected answer to Hello: {other:?}"),
        }
        crate::clock::sync(&agent).context("cannot set the guest's clock to the host's")?;
        agent
    };

    let terminal = bundle
        .spec
        .process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false);
    let create_span = tracing::info_span!("container_create").entered();
    let mode = TerminalMode {
        terminal,
        console_socket: args.console_socket.clone(),
        tty_stdio: args.tty_stdio,
    };
    let Attached {
        streams,
        tty_fd,
        saved: saved_termios,
    } = stdio::attach(&cfg.vsock_uds, INIT_PROCESS, &mode)?;
    if let Some((_, config)) = &network {
        let _s = tracing::info_span!("network_setup").entered();
        let req = Request::ConfigureNetwork {
            config: config.clone(),
            loopback_dns,
        };
        match agent.request(req, Duration::from_secs(30))? {
            Response::Ok => {}
            Response::Error { message, .. } => {
                bail!("the guest cannot set up the container's network: {message}")
            }
            other => bail!("unexpected answer to ConfigureNetwork: {other:?}"),
        }
    }
    let guest_spec = spec::rewrite_for_guest(&bundle.spec, &binds, network.is_some());
    let stdio = StdioSpec {
        stdin: !terminal,
        stdout: !terminal,
        stderr: !terminal,
        terminal,
    };
    let create = Request::Create {
        container_id: args.id.clone(),
        spec: Box::new(guest_spec),
        stdio,
        privileged: state.guest_privileged,
    };
    match agent.request(create, Duration::from_secs(60))? {
        Response::Created { pid } => tracing::info!(guest_pid = pid, "container created"),
        Response::Error { code, message } => match process_status(code) {
            Some(status) => {
                let msg = format!("cannot start the container process: {message}");
                return Err(crate::error::RuntimeError::Process { msg, status }.into());
            }
            None => bail!("container create failed ({code:?}): {message}"),
        },
        other => bail!("unexpected answer to Create: {other:?}"),
    }
    if let Some(fd) = tty_fd {
        resize(&agent, fd);
    }
    drop(create_span);

    if let Some(cg) = &state.cgroups_path {
        join_cpu_cgroup(cg, &bundle.spec, &[me, state.vm_pid]);
    }

    let ctl_path = run_dir.join(paths::CONTROL_SOCKET);
    let control = UnixListener::bind(&ctl_path)
        .with_context(|| format!("cannot listen on {}", ctl_path.display()))?;
    state.status = Status::Created;
    state.save(&state_path)?;
    let shared = Arc::new(Shared {
        state: Mutex::new(state),
        vm: vm.clone(),
        state_path,
        agent,
        in_flight: AtomicUsize::new(0),
        tty_fd,
        exec_waiters: Mutex::default(),
    });
    Ok(Sandbox {
        shared,
        vm,
        events,
        events_tx,
        streams,
        control,
        run_dir,
        saved_termios,
        network: network.map(|(m, _)| m),
    })
}

/// Private mount namespace and the container's network namespace, before any thread exists.
fn isolate(spec: &Spec) -> Result<()> {
    share::isolate_mounts()?;
    // Hooks such as Docker's libnetwork-setkey configure the network namespace of the pid in
    // the state (ours), so we live in the container's namespace.
    crate::network::enter(&crate::network::check(spec)?)
}

/// Blocks the signals we forward (plus SIGWINCH) in this thread, before other threads exist, so
/// every thread inherits the mask and only the signal thread's sigwait sees them.
pub fn block_signals() {
    let _ = forwarded_set().thread_block();
}

/// The signals the sandbox and exec relays handle with sigwait.
pub fn forwarded_set() -> nix::sys::signal::SigSet {
    let mut set = nix::sys::signal::SigSet::empty();
    for s in crate::signal::FORWARDED.iter().chain(&[libc::SIGWINCH]) {
        if let Ok(sig) = nix::sys::signal::Signal::try_from(*s) {
            set.add(sig);
        }
    }
    set
}

fn resize(agent: &AgentClient, fd: i32) {
    if let Some((rows, cols)) = console::window_size(fd) {
        let _ = agent.request(
            Request::Resize {
                process: INIT_PROCESS.into(),
                rows,
                cols,
            },
            Duration::from_secs(5),
        );
    }
}

/// prestart and createRuntime hooks, run on the host with state "creating".
fn run_create_hooks(spec: &Spec, state: &ContainerState) -> Result<()> {
    let Some(h) = spec.hooks() else { return Ok(()) };
    let mut s = state.clone();
    s.status = Status::Creating;
    let json = s.oci_json().to_string();
    hooks::run(
        "prestart",
        h.prestart().as_deref().unwrap_or_default(),
        &json,
    )?;
    hooks::run(
        "createRuntime",
        h.create_runtime().as_deref().unwrap_or_default(),
        &json,
    )?;
    Ok(())
}

/// Moves the sandbox and the VMM into the CPU hierarchies of the container's cgroup, now that the
/// guest has booted: the boot's CPU time stays with the caller (INGInious and `docker stats`
/// count from here). Before `create` returns, so the shim finds the final cgroups.
fn join_cpu_cgroup(cg: &str, spec: &Spec, pids: &[i32]) {
    let mut pids: Vec<i32> = pids.iter().copied().filter(|p| *p > 0).collect();
    pids.dedup();
    for pid in pids {
        for e in crate::cgroup::join(cg, pid as u32, crate::cgroup::Part::Cpu) {
            tracing::warn!("cgroup: {e}");
        }
    }
    // `--cpus` also caps the host CPU time of the whole VM, as runc caps the container's.
    let cpu = spec
        .linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
        .and_then(|r| r.cpu().clone());
    if let Some(c) = cpu {
        for e in crate::cgroup::set_cpu(cg, c.quota(), c.period(), None) {
            tracing::warn!("cgroup: {e}");
        }
    }
}

/// The guest kernel's `Linux version` line from a console log, if it got that far.
pub fn kernel_banner(path: &Path) -> Option<String> {
    let text = String::from_utf8_lossy(&std::fs::read(path).ok()?).into_owned();
    text.lines()
        .find(|l| l.contains("Linux version"))
        .map(|l| l.trim_end().to_string())
}

/// The last `n` lines of a text file, for error messages.
pub fn tail_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).to_string())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(n)..].join("\n");
    if tail.is_empty() {
        format!("({} is empty)", path.display())
    } else {
        tail
    }
}

impl Sandbox {
    /// Serves until the container exits; returns its status.
    fn serve(self) -> i32 {
        let Sandbox {
            shared,
            vm,
            events,
            events_tx,
            streams,
            control,
            run_dir,
            saved_termios,
            network,
        } = self;
        let _exit_span = tracing::info_span!("running").entered();
        let (out_done_tx, out_done) = mpsc::channel::<()>();
        let outputs = stdio::spawn_relays(streams, out_done_tx);

        let sh = shared.clone();
        let _ = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || serve_control(control, sh));
        let sh = shared.clone();
        let _ = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || forward_signals(sh));
        let sh = shared.clone();
        let _ = std::thread::Builder::new()
            .name("clock".into())
            .spawn(move || keep_clock(sh));
        let v = vm.clone();
        let tx = events_tx.clone();
        let _ = std::thread::Builder::new()
            .name("vm-wait".into())
            .spawn(move || {
                let st = v.wait_stopped();
                let _ = tx.send(SbEvent::VmStopped(st));
            });
        drop(events_tx);

        let status = loop {
            match events.recv() {
                Ok(SbEvent::Agent(AgentNotice::Event(Event::Exit { process, status })))
                    if process == INIT_PROCESS =>
                {
                    tracing::info!(status, "container exited");
                    break status;
                }
                Ok(SbEvent::Agent(AgentNotice::Event(Event::Exit { process, status }))) => {
                    tracing::info!(process, status, "exec process exited");
                    if let Some(tx) = shared
                        .exec_waiters
                        .lock()
                        .ok()
                        .and_then(|mut m| m.remove(&process))
                    {
                        let _ = tx.send(status);
                    }
                }
                Ok(SbEvent::Agent(AgentNotice::Event(Event::Oom))) => {
                    tracing::warn!("the OOM killer ran in the container");
                    // The agent sends this before the exit it caused, so Docker sees the OOM
                    // kill first, as with runc.
                    let cg = shared
                        .state
                        .lock()
                        .ok()
                        .and_then(|s| s.cgroups_path.clone());
                    if let Some(cg) = cg {
                        match crate::oom::relay(&cg) {
                            Ok(()) => {
                                tracing::info!(cgroup = cg, "OOM kill relayed to the host cgroup")
                            }
                            Err(e) => tracing::warn!(
                                "cannot relay the OOM kill to the host cgroup: {e:#}"
                            ),
                        }
                    }
                }
                Ok(SbEvent::Agent(AgentNotice::Disconnected)) => {
                    let st = vm.try_stopped();
                    tracing::error!(vm_status = ?st, "lost the agent connection; the guest is gone or its agent died");
                    break 137;
                }
                Ok(SbEvent::VmStopped(st)) => {
                    tracing::error!("the hypervisor exited unexpectedly with status {st}");
                    break 137;
                }
                Err(_) => break 137,
            }
        };
        let _teardown = tracing::info_span!("teardown").entered();
        // Exec'd processes die with the VM; their relays learn it when the waiters go away.
        if let Ok(mut m) = shared.exec_waiters.lock() {
            m.clear();
        }
        // Output still in flight after the exit event: drain it (bounded) before reporting
        // "stopped", so whoever sees that status also sees all of the output.
        if !stdio::wait_outputs(&out_done, outputs, Duration::from_secs(3)) {
            tracing::warn!("container output did not reach EOF within 3 s after exit");
        }
        shared.update(|s| {
            s.status = Status::Stopped;
            s.exit_status = Some(status);
        });
        let _ = shared
            .agent
            .request(Request::Shutdown, Duration::from_secs(2));
        vm.finish(Duration::from_secs(5));
        drop(network);
        let deadline = Instant::now() + Duration::from_secs(2);
        while shared.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(saved_termios);
        for name in [
            paths::CONTROL_SOCKET,
            paths::VSOCK_UDS,
            paths::VSOCK_VHOST_SOCKET,
            paths::FS_VHOST_SOCKET,
            &paths::dns_relay_socket(),
        ] {
            let _ = std::fs::remove_file(run_dir.join(name));
        }
        status
    }
}

/// Sets the guest's clock every [`crate::clock::SYNC_INTERVAL`] while the container may run
/// (not while the VM is paused: resume sets it itself).
fn keep_clock(shared: Arc<Shared>) {
    loop {
        std::thread::sleep(crate::clock::SYNC_INTERVAL);
        let status = shared.state.lock().map(|s| s.status).unwrap_or(Status::Stopped);
        match status {
            Status::Created | Status::Running => {
                if let Err(e) = crate::clock::sync(&shared.agent) {
                    tracing::debug!("cannot set the guest's clock: {e:#}");
                }
            }
            Status::Stopped => return,
            Status::Creating | Status::Paused => {}
        }
    }
}

/// sigwait loop: forwards signals to the container's init; SIGWINCH becomes a resize.
fn forward_signals(shared: Arc<Shared>) {
    let set = forwarded_set();
    loop {
        let Ok(sig) = set.wait() else { continue };
        let n = sig as i32;
        if n == libc::SIGWINCH {
            if let Some(fd) = shared.tty_fd {
                tracing::debug!(size = ?console::window_size(fd), "terminal resized");
                resize(&shared.agent, fd);
            }
            continue;
        }
        tracing::debug!(signal = n, "forwarding signal to the container");
        let req = Request::Signal {
            process: INIT_PROCESS.into(),
            signal: n,
            all: false,
        };
        if let Err(e) = shared.agent.request(req, Duration::from_secs(5)) {
            tracing::warn!("cannot forward signal {n}: {e}");
        }
    }
}

/// Accepts CLI connections on the control socket, one request each.
fn serve_control(listener: UnixListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
        let sh = shared.clone();
        let _ = std::thread::Builder::new()
            .name("control-conn".into())
            .spawn(move || {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                match rootcell_protocol::recv::<_, ControlRequest>(&mut conn) {
                    Ok(Some(ControlRequest::Exec {
                        exec_id,
                        process,
                        stdio,
                    })) => {
                        serve_exec(&sh, &mut conn, exec_id, process, stdio);
                    }
                    Ok(Some(req)) => {
                        let resp = handle_control(&sh, req);
                        let _ = rootcell_protocol::send(&mut conn, &resp);
                        sh.in_flight.fetch_sub(1, Ordering::SeqCst);
                    }
                    _ => {
                        sh.in_flight.fetch_sub(1, Ordering::SeqCst);
                    }
                }
            });
    }
}

/// Starts an exec'd process, answers `Ok`, then waits for its exit and answers `Exited`.
fn serve_exec(
    shared: &Shared,
    conn: &mut UnixStream,
    exec_id: String,
    process: Box<oci_spec::runtime::Process>,
    stdio: StdioSpec,
) {
    let _s = tracing::info_span!("exec", exec_id = %exec_id).entered();
    let (tx, rx) = mpsc::channel();
    let mut guest_pid = None;
    let status = shared
        .state
        .lock()
        .map(|s| s.status)
        .unwrap_or(Status::Stopped);
    let first = if !matches!(status, Status::Created | Status::Running) {
        ControlResponse::Error {
            message: "cannot exec in a stopped container".into(),
        }
    } else if shared
        .exec_waiters
        .lock()
        .map(|mut m| m.insert(exec_id.clone(), tx).is_some())
        .unwrap_or(true)
    {
        ControlResponse::Error {
            message: format!("exec id {exec_id} is already in use"),
        }
    } else {
        if let Err(e) = crate::clock::sync(&shared.agent) {
            tracing::warn!("cannot set the guest's clock before the exec: {e:#}");
        }
        let req = Request::Exec {
            exec_id: exec_id.clone(),
            process,
            stdio,
        };
        match shared.agent.request(req, Duration::from_secs(30)) {
            Ok(Response::Created { pid }) => {
                guest_pid = Some(pid);
                ControlResponse::Ok
            }
            Ok(Response::Ok) => ControlResponse::Ok,
            Ok(Response::Error { code, message }) => match process_status(code) {
                Some(status) => ControlResponse::ProcessFailed {
                    message: format!("cannot start the exec process: {message}"),
                    status,
                },
                None => ControlResponse::Error {
                    message: format!("exec failed ({code:?}): {message}"),
                },
            },
            Ok(other) => ControlResponse::Error {
                message: format!("unexpected answer to Exec: {other:?}"),
            },
            Err(e) => ControlResponse::Error {
                message: e.to_string(),
            },
        }
    };
    let ok = first == ControlResponse::Ok;
    if !ok {
        if let Ok(mut m) = shared.exec_waiters.lock() {
            m.remove(&exec_id);
        }
    }
    let _ = rootcell_protocol::send(conn, &first);
    // Teardown must not wait for a long-running exec.
    shared.in_flight.fetch_sub(1, Ordering::SeqCst);
    if ok {
        let status = wait_exec_exit(shared, conn, &exec_id, guest_pid, &rx);
        let _ = rootcell_protocol::send(conn, &ControlResponse::Exited { status });
    }
}

/// How often a waiting exec checks on its relay and, without news, on its guest process.
const EXEC_POLL: Duration = Duration::from_millis(500);
/// How often the agent is asked whether a still-unfinished exec process exists.
const EXEC_LIVENESS_PERIOD: Duration = Duration::from_secs(10);
/// Consecutive checks without the process (and without its exit) that count as a lost exit.
const EXEC_LIVENESS_STRIKES: u32 = 3;

/// Waits for the exit of exec `exec_id` (guest pid `pid`) and returns its status. Never forever:
/// the wait ends with 137 when the VM or agent is gone (the waiter is dropped at teardown) and
/// when the guest no longer lists the process yet reported no exit for it. When the relay (the
/// process's host pid, which Docker signals with kill(2)) dies first, e.g. by SIGKILL, which it
/// cannot forward, the guest process is killed too.
fn wait_exec_exit(
    shared: &Shared,
    conn: &UnixStream,
    exec_id: &str,
    pid: Option<i32>,
    rx: &mpsc::Receiver<i32>,
) -> i32 {
    let mut relay_gone = false;
    let mut strikes = 0;
    let mut next_check = Instant::now() + EXEC_LIVENESS_PERIOD;
    loop {
        match rx.recv_timeout(EXEC_POLL) {
            Ok(status) => return status,
            Err(mpsc::RecvTimeoutError::Disconnected) => return 137,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if !relay_gone && peer_closed(conn) {
            relay_gone = true;
            tracing::warn!("the exec relay is gone; killing its process in the guest");
            let req = Request::Signal {
                process: exec_id.to_string(),
                signal: libc::SIGKILL,
                all: false,
            };
            if let Err(e) = shared.agent.request(req, Duration::from_secs(5)) {
                tracing::warn!("cannot kill exec {exec_id} in the guest: {e}");
            }
        }
        let Some(pid) = pid else { continue };
        if Instant::now() < next_check {
            continue;
        }
        next_check = Instant::now() + EXEC_LIVENESS_PERIOD;
        match shared
            .agent
            .request(Request::Processes, Duration::from_secs(10))
        {
            Ok(Response::Processes { pids }) if !pids.contains(&pid) => {
                strikes += 1;
                if strikes >= EXEC_LIVENESS_STRIKES {
                    tracing::error!(
                        guest_pid = pid,
                        "exec {exec_id}: the guest has no such process any more and reported no exit for it; ending the wait with 137"
                    );
                    if let Ok(mut m) = shared.exec_waiters.lock() {
                        m.remove(exec_id);
                    }
                    // An exit that raced the removal above still wins.
                    return rx.try_recv().unwrap_or(137);
                }
            }
            // Still there, or the agent is slow: keep waiting (a gone agent drops the waiter).
            _ => strikes = 0,
        }
    }
}

/// Whether the other end of a connection that sends nothing more has closed it.
fn peer_closed(conn: &UnixStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut byte = 0u8;
    // SAFETY: a non-blocking peek of at most one byte into a local buffer.
    let n = unsafe {
        libc::recv(
            conn.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0
        || (n < 0
            && !matches!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::EAGAIN) | Some(libc::EINTR)
            ))
}

/// Sends `req` to the agent; its `Ok` or error message is the answer.
fn forward(shared: &Shared, req: Request) -> ControlResponse {
    let what = format!("{req:?}");
    match shared.agent.request(req, Duration::from_secs(5)) {
        Ok(Response::Ok) => ControlResponse::Ok,
        Ok(Response::Error { message, .. }) => ControlResponse::Error { message },
        Ok(other) => ControlResponse::Error {
            message: format!("unexpected answer to {what}: {other:?}"),
        },
        Err(e) => ControlResponse::Error {
            message: e.to_string(),
        },
    }
}

fn handle_control(shared: &Shared, req: ControlRequest) -> ControlResponse {
    let err = |message: String| ControlResponse::Error { message };
    let status = shared
        .state
        .lock()
        .map(|s| s.status)
        .unwrap_or(Status::Stopped);
    let action = match &req {
        ControlRequest::Ping | ControlRequest::Resize { .. } | ControlRequest::Exec { .. } => None,
        ControlRequest::Start => Some(Action::Start),
        ControlRequest::Pause => Some(Action::Pause),
        ControlRequest::Resume => Some(Action::Resume),
        ControlRequest::Update { .. } => Some(Action::Update),
        ControlRequest::Signal { .. } => Some(Action::Signal),
    };
    if let Some(Err(error)) = action.map(|a| status.check(a)) {
        return ControlResponse::Refused { error };
    }
    // Moves the recorded status on once the action is done, unless something else (the exit)
    // moved it meanwhile.
    let advance = |a: Action| {
        shared.update(|s| {
            if s.status == status {
                s.status = status.after(a);
            }
        })
    };
    match req {
        ControlRequest::Ping => ControlResponse::Ok,
        ControlRequest::Pause | ControlRequest::Resume => {
            let pause = req == ControlRequest::Pause;
            match shared.vm.set_paused(pause) {
                Ok(()) => {
                    advance(if pause { Action::Pause } else { Action::Resume });
                    // The guest's clock stood still while the VM was frozen.
                    if !pause {
                        if let Err(e) = crate::clock::sync(&shared.agent) {
                            tracing::warn!("cannot set the guest's clock after the resume: {e:#}");
                        }
                    }
                    ControlResponse::Ok
                }
                Err(e) => err(format!(
                    "cannot {} the VM: {e}",
                    if pause { "pause" } else { "resume" }
                )),
            }
        }
        ControlRequest::Start => {
            let _s = tracing::info_span!("container_start").entered();
            if let Err(e) = crate::clock::sync(&shared.agent) {
                tracing::warn!("cannot set the guest's clock before the start: {e:#}");
            }
            match shared
                .agent
                .request(Request::Start, Duration::from_secs(30))
            {
                Ok(Response::Ok) | Ok(Response::Created { .. }) => {
                    advance(Action::Start);
                    ControlResponse::Ok
                }
                Ok(Response::Error { message, .. }) => err(message),
                Ok(other) => err(format!("unexpected answer to Start: {other:?}")),
                Err(e) => err(e.to_string()),
            }
        }
        ControlRequest::Exec { .. } => err("exec is served on its own connection".into()),
        ControlRequest::Resize {
            process,
            rows,
            cols,
        } => forward(
            shared,
            Request::Resize {
                process,
                rows,
                cols,
            },
        ),
        ControlRequest::Update { memory, pids } => {
            forward(shared, Request::UpdateLimits { memory, pids })
        }
        ControlRequest::Signal {
            signal,
            all,
            process,
        } => {
            let req = Request::Signal {
                process: process.unwrap_or_else(|| INIT_PROCESS.into()),
                signal,
                all,
            };
            match shared.agent.request(req, Duration::from_secs(5)) {
                Ok(Response::Ok) => ControlResponse::Ok,
                Ok(Response::Error {
                    code: rootcell_protocol::ErrorCode::NoSuchProcess,
                    ..
                }) => ControlResponse::Refused {
                    error: StateError::NotRunning,
                },
                Ok(Response::Error { message, .. }) => err(message),
                Ok(other) => err(format!("unexpected answer to Signal: {other:?}")),
                Err(e) => err(e.to_string()),
            }
        }
    }
}
