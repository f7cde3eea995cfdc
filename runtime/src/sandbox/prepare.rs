//! Bringing a sandbox up: the container's namespaces, its share, hooks and network on the
//! host, the VM, the agent's handshake, the container created in the guest, then the CPU cgroup.

use super::signals::resize;
use super::*;
use crate::agent::{self, AgentClient};
use crate::hypervisor::{NetCard, Vm, VmConfig};
use crate::state::{ContainerState, Status};
use crate::stdio::{self, Attached, TerminalMode};
use crate::{hooks, paths, share, spec};
use anyhow::{anyhow, bail, Context, Result};
use oci_spec::runtime::Spec;
use rootcell_protocol::{Request, Response, StdioSpec, INIT_PROCESS};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::Instant;

/// Brings the sandbox up, step by step: [`enter`] (namespaces, pid, cgroup), [`host_setup`]
/// (share, createRuntime hooks, network mirror, DNS relay), [`start_vm`], [`connect_agent`]
/// (handshake and clock), [`create_container`] (stdio, guest network, Create), then the CPU
/// cgroup and the control socket. A VM pool or a VM shared by several containers reuses the
/// steps it needs.
pub(super) fn prepare(args: &SandboxArgs) -> Result<Sandbox> {
    let state_path = paths::state_file(&args.root, &args.id);
    let recorded = ContainerState::load(&state_path)
        .with_context(|| format!("cannot read {}", state_path.display()))?;
    if recorded.shares_vm.is_some() {
        return super::member::prepare(args);
    }
    let Entered {
        mut state,
        state_path,
        bundle,
    } = enter(args)?;
    let mut hooks_run = false;
    if let Some(claimed) = super::warm::claim(args, &bundle.spec) {
        match super::warm::prepare(args, &mut state, &state_path, &bundle, claimed)? {
            super::warm::Outcome::Ready(sb) => return Ok(*sb),
            super::warm::Outcome::Boot { hooks_run: run } => hooks_run = run,
        }
    }
    let host = host_setup(&state, &bundle, hooks_run)?;
    let (vm, cfg) = start_vm(args, &mut state, &state_path, &bundle, &host)?;
    let (events_tx, events) = mpsc::channel();
    let agent = connect_agent(&vm, &VmLogs::of(&cfg), &events_tx)?;
    let (attached, guest_pid) = create_container(args, &agent, &state, &bundle, &host, &cfg)?;
    state.guest_pid = guest_pid;
    if let Some(cg) = &state.cgroups_path {
        join_cpu_cgroup(cg, &bundle.spec, &[state.pid, state.vm_pid]);
    }
    Sandbox::assemble(Parts {
        state,
        state_path,
        vm,
        agent,
        attached,
        events: (events_tx, events),
        role: Role::Owner,
        network: host.network.map(|(m, _)| m),
        dns_relay: host.dns_relay,
    })
}

/// The container's record and bundle, with this process in the container's namespaces.
struct Entered {
    state: ContainerState,
    state_path: PathBuf,
    bundle: spec::Bundle,
}

/// Loads the record, enters the namespaces (single-threaded still), records this process as
/// the container's pid and joins the non-CPU cgroups (the VMM inherits them).
fn enter(args: &SandboxArgs) -> Result<Entered> {
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
    Ok(Entered {
        state,
        state_path,
        bundle,
    })
}

/// What the host side prepared for the VM.
struct HostSetup {
    run_dir: PathBuf,
    share_dir: PathBuf,
    binds: Vec<spec::BindMount>,
    /// The taps and tc filters mirroring the container's interfaces, and their description.
    network: Option<(rootcell_net::Mirror, rootcell_protocol::net::NetworkConfig)>,
    nets: Vec<NetCard>,
    loopback_dns: Option<std::net::IpAddr>,
    /// The relay of the guest's DNS queries to `loopback_dns`.
    dns_relay: Option<crate::dns::Relay>,
}

/// The share (rootfs and bind sources), the createRuntime hooks, the network mirror and the
/// DNS relay (the hooks only if they have not run yet).
fn host_setup(state: &ContainerState, bundle: &spec::Bundle, hooks_run: bool) -> Result<HostSetup> {
    let _span = tracing::info_span!("host_setup", id = %state.id).entered();
    let run_dir = state.run_dir.clone();
    let share_dir = run_dir.join(paths::SHARE_DIR);
    let binds = spec::bind_mounts(&bundle.spec, &bundle.dir);
    share::build(&share_dir, &bundle.rootfs, &binds)?;
    // Before the VM: Docker's libnetwork-setkey hook is what puts the veth into our network
    // namespace, and the VM's network cards are made from what is there.
    if !hooks_run {
        run_create_hooks(&bundle.spec, state)?;
    }
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
    let dns_relay = match loopback_dns {
        Some(addr) => {
            let relay = crate::dns::serve(&run_dir, addr)?;
            tracing::info!(%addr, "relaying the guest's DNS queries to the container's loopback resolver");
            Some(relay)
        }
        None => None,
    };
    Ok(HostSetup {
        run_dir,
        share_dir,
        binds,
        network,
        nets,
        loopback_dns,
        dns_relay,
    })
}

/// Picks the hypervisor, sizes the VM from the spec and starts it; records the VMM's pid.
fn start_vm(
    args: &SandboxArgs,
    state: &mut ContainerState,
    state_path: &Path,
    bundle: &spec::Bundle,
    host: &HostSetup,
) -> Result<(Arc<dyn Vm>, VmConfig)> {
    let _span = tracing::info_span!("vm_start").entered();
    let crate::hypervisor::Opened {
        hypervisor: hv,
        images,
        selection,
    } = crate::hypervisor::open()?;
    let (memory_mib, vcpus) = spec::vm_resources(&bundle.spec);
    let state_dir = paths::state_dir(&args.root, &args.id);
    let cfg = VmConfig {
        kernel: images.kernel,
        initrd: images.initrd,
        memory_mib,
        vcpus,
        cmdline: kernel_cmdline(),
        console_log: state_dir.join("console.log"),
        hypervisor_log: state_dir.join(format!("{}.log", hv.name())),
        socket_dir: host.run_dir.clone(),
        owner: state_dir.clone(),
        vsock_uds: host.run_dir.join(paths::VSOCK_UDS),
        guest_cid: GUEST_CID,
        share_dir: host.share_dir.clone(),
        share_tag: rootcell_protocol::SHARE_TAG.to_string(),
        nets: host.nets.clone(),
    };
    tracing::info!(hypervisor = hv.name(), reason = %selection.reason, "starting the guest");
    let vm: Arc<dyn Vm> = Arc::from(hv.start(&cfg)?);
    state.vm_memory_mib = cfg.memory_mib;
    state.vm_pid = vm.pid().unwrap_or(0);
    state.vm_pid_start = crate::state::proc_stat(state.vm_pid)
        .map(|s| s.0)
        .unwrap_or(0);
    state.save(state_path)?;
    Ok((vm, cfg))
}

/// Where to reach a VM's agent and where it says how far it got.
pub(super) struct VmLogs {
    /// The hybrid vsock socket.
    pub vsock_uds: PathBuf,
    /// The serial console's log.
    pub console_log: PathBuf,
    /// The hypervisor's own log.
    pub hypervisor_log: PathBuf,
}

impl VmLogs {
    pub(super) fn of(cfg: &VmConfig) -> Self {
        VmLogs {
            vsock_uds: cfg.vsock_uds.clone(),
            console_log: cfg.console_log.clone(),
            hypervisor_log: cfg.hypervisor_log.clone(),
        }
    }
}

/// Waits (bounded) for the guest's agent, checks its protocol version and sets its clock.
/// Agent notices go to `events`.
pub(super) fn connect_agent(
    vm: &Arc<dyn Vm>,
    cfg: &VmLogs,
    events: &mpsc::Sender<SbEvent>,
) -> Result<Arc<AgentClient>> {
    let _s = tracing::info_span!("agent_ready").entered();
    let boot = boot_timeout();
    let secs = boot.as_secs();
    let deadline = Instant::now() + boot;
    let stream = agent::connect_control(&cfg.vsock_uds, deadline, || vm.try_stopped().is_none())
        .map_err(|e| {
            let console_log = &cfg.console_log;
            let mut tail = tail_lines(console_log, 15);
            // The kernel's banner says how far the guest got even when later lines push it
            // out of the tail (the built-in VMM on a software /dev/kvm prints it, then stops).
            if let Some(banner) = kernel_banner(console_log).filter(|b| !tail.contains(b.as_str())) {
                tail = format!("{banner}\n...\n{tail}");
            }
            match vm.try_stopped() {
                // 12 lines: a triple fault's registers line, the VMM's page-table report (up to
                // eight lines), the exit and the stop.
                Some(st) => anyhow!(
                    "the guest stopped before its agent answered (hypervisor exit status {st}; {e}); hypervisor log: {}; last console lines:\n{tail}",
                    tail_lines(&cfg.hypervisor_log, 12)
                ),
                None => {
                    // Stopped here, not later by the caller, so that the built-in VMM says
                    // where each vCPU was (exits, the last one, RIP) in its log: a guest that
                    // hangs before its console says anything shows nothing else.
                    vm.kill();
                    anyhow!("the guest did not come up within {secs} s: its agent never answered on vsock (last try: {e}); it hung while booting, or needs longer on this host (ROOTCELL_BOOT_TIMEOUT, seconds); hypervisor log: {}; last console lines:\n{tail}",
                        tail_lines(&cfg.hypervisor_log, 4))
                }
            }
        })?;
    let tx = events.clone();
    let agent = AgentClient::start(stream, move |n| {
        let _ = tx.send(SbEvent::Agent(n));
    })?;
    let hello = Request::Hello {
        version: rootcell_protocol::PROTOCOL_VERSION,
    };
    let answer = agent.request(hello, crate::timeouts::HELLO).map_err(|e| {
        // As at the boot timeout: stopped first, so that the built-in VMM's log says where each
        // vCPU was (in the nested lane a guest took the connection and then fell silent).
        vm.kill();
        anyhow!(
            "{e} (the guest's agent took the connection, then did not answer); hypervisor log: {}; last console lines:\n{}",
            tail_lines(&cfg.hypervisor_log, 4),
            tail_lines(&cfg.console_log, 15)
        )
    })?;
    match answer {
        Response::Hello {
            version,
            kernel_release,
        } if version == rootcell_protocol::PROTOCOL_VERSION => {
            tracing::info!(kernel_release, "agent ready");
        }
        Response::Hello { version, .. } => bail!(
            "guest agent speaks protocol version {version}, this runtime {}; rebuild the initramfs from the same rootcell release",
            rootcell_protocol::PROTOCOL_VERSION
        ),
        other => bail!("unexpected answer to Hello: {other:?}"),
    }
    crate::clock::sync(&agent).context("cannot set the guest's clock to the host's")?;
    Ok(agent)
}

/// Configures the guest's network, attaches the init process's stdio and has the agent create
/// the container (its init waits for `start`); returns the init's guest pid too.
fn create_container(
    args: &SandboxArgs,
    agent: &AgentClient,
    state: &ContainerState,
    bundle: &spec::Bundle,
    host: &HostSetup,
    cfg: &VmConfig,
) -> Result<(Attached, i32)> {
    let _span = tracing::info_span!("container_create").entered();
    if let Some((_, config)) = &host.network {
        let _s = tracing::info_span!("network_setup").entered();
        let req = Request::ConfigureNetwork {
            config: config.clone(),
            loopback_dns: host.loopback_dns,
        };
        match agent.request(req, crate::timeouts::NETWORK)? {
            Response::Ok => {}
            Response::Error { message, .. } => {
                bail!("the guest cannot set up the container's network: {message}")
            }
            other => bail!("unexpected answer to ConfigureNetwork: {other:?}"),
        }
    }
    let guest_spec = spec::rewrite_for_guest(
        &bundle.spec,
        &host.binds,
        Path::new(rootcell_protocol::GUEST_SHARE_DIR),
        spec::GuestNamespaces::Own {
            guest_network: host.network.is_some(),
        },
    );
    create_init(
        args,
        agent,
        &cfg.vsock_uds,
        guest_spec,
        state.guest_privileged,
    )
}

/// Attaches the init process's stdio through `uds` and has the agent create the container from
/// `guest_spec`; returns the streams and the init's guest pid.
pub(super) fn create_init(
    args: &SandboxArgs,
    agent: &AgentClient,
    uds: &Path,
    guest_spec: Spec,
    privileged: bool,
) -> Result<(Attached, i32)> {
    let terminal = spec::has_terminal(&guest_spec);
    let mode = TerminalMode {
        terminal,
        console_socket: args.console_socket.clone(),
        tty_stdio: args.tty_stdio,
    };
    let attached = stdio::attach(uds, &args.id, INIT_PROCESS, &mode)?;
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
        privileged,
    };
    let guest_pid = match agent.request(create, crate::timeouts::CREATE)? {
        Response::Created { pid } => {
            tracing::info!(guest_pid = pid, "container created");
            pid
        }
        Response::Error { code, message } => match process_status(code) {
            Some(status) => {
                let msg = format!("cannot start the container process: {message}");
                return Err(crate::error::RuntimeError::Process { msg, status }.into());
            }
            None => bail!("container create failed ({code:?}): {message}"),
        },
        other => bail!("unexpected answer to Create: {other:?}"),
    };
    if let Some(fd) = attached.tty_fd {
        resize(agent, fd);
    }
    Ok((attached, guest_pid))
}

/// Private mount namespace and the container's network namespace, before any thread exists.
pub(super) fn isolate(spec: &Spec) -> Result<()> {
    share::isolate_mounts()?;
    // Hooks such as Docker's libnetwork-setkey configure the network namespace of the pid in
    // the state (ours), so we live in the container's namespace.
    crate::network::enter(&crate::network::check(spec)?)
}

/// prestart and createRuntime hooks, run on the host with state "creating".
pub(super) fn run_create_hooks(spec: &Spec, state: &ContainerState) -> Result<()> {
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
pub(super) fn join_cpu_cgroup(cg: &str, spec: &Spec, pids: &[i32]) {
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
