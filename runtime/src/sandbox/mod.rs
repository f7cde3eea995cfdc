//! The per-container sandbox process: the long-lived host process Docker's shim waits on. It
//! owns a private mount namespace with the share dir, the device backends, the hypervisor, the
//! agent connection, the stdio relays and the control socket, and exits with the container's
//! status.

use crate::agent::{AgentClient, AgentNotice};
use crate::console;
use crate::hypervisor::Vm;
use crate::state::ContainerState;
use crate::stdio::Streams;
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::{mpsc, Arc, Mutex};

mod console_log;
mod control;
mod exec;
mod member;
mod prepare;
mod serve;
mod signals;
mod warm;

pub use console_log::{kernel_banner, tail_lines};
use control::serve_control;
use prepare::prepare;
use signals::forward_signals;
pub use signals::{block_signals, forwarded_set};

/// Guest CID of every sandbox's VM (each VM has its own vsock device).
pub const GUEST_CID: u64 = 3;
/// Kernel command line of the guest, whatever the backend (each backend adds what is its own,
/// such as how the guest ends). `no_timer_check`: on a loaded host (many TCG guests) the
/// kernel's timing-based IO-APIC timer check fails and the boot panics; a VM's timer is wired.
/// `rcupdate.rcu_expedited=1`: building a container waits for RCU grace periods (moving a
/// process into a cgroup, tearing down a mount namespace); a normal one takes several ticks of
/// this HZ=250, non-preemptible guest, an expedited one much less (measured with warm starts:
/// the guest's part of create + `/bin/true` about 10 ms shorter, medians of 8).
pub const KERNEL_CMDLINE: &str =
    "console=ttyS0 panic=-1 quiet no_timer_check rcupdate.rcu_expedited=1";
/// The guest's kernel command line: [`KERNEL_CMDLINE`] and `$ROOTCELL_KERNEL_ARGS`.
pub fn kernel_cmdline() -> String {
    match std::env::var("ROOTCELL_KERNEL_ARGS") {
        Ok(extra) if !extra.is_empty() => format!("{KERNEL_CMDLINE} {extra}"),
        _ => KERNEL_CMDLINE.to_string(),
    }
}

/// Waits (bounded) for the agent of a VM just booted from `cfg` and checks its protocol
/// version, then hangs up: what a pooled VM does before it is offered.
pub fn await_agent(vm: &Arc<dyn Vm>, cfg: &crate::hypervisor::VmConfig) -> anyhow::Result<()> {
    let (tx, _rx) = mpsc::channel();
    let agent = prepare::connect_agent(vm, &prepare::VmLogs::of(cfg), &tx)?;
    agent.close();
    Ok(())
}

/// The bound on the guest's boot: `ROOTCELL_BOOT_TIMEOUT` (seconds), else the default.
pub fn boot_timeout() -> std::time::Duration {
    std::env::var("ROOTCELL_BOOT_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(
            crate::timeouts::BOOT_DEFAULT,
            std::time::Duration::from_secs,
        )
}

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
    /// Whether the VM is ours or another container's.
    role: Role,
}

/// A sandbox's relation to the VM its container runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Role {
    /// The sandbox booted the VM and ends it when its container ends (containers that joined
    /// it end with it).
    Owner,
    /// The container joined another container's VM: ending it removes only the container (and
    /// detaches its entries, `mounts`, from the owner's share); pausing freezes its cgroup.
    Member {
        /// Mount points of its rootfs and bind sources in the owner's share.
        mounts: Vec<PathBuf>,
    },
}

impl Shared {
    /// The shared state of a sandbox whose container is created: records it as such, and
    /// listens on its control socket in `run_dir`.
    fn created(
        mut state: ContainerState,
        state_path: PathBuf,
        vm: Arc<dyn Vm>,
        agent: Arc<AgentClient>,
        tty_fd: Option<i32>,
        role: Role,
    ) -> anyhow::Result<(Arc<Shared>, UnixListener)> {
        use anyhow::Context;
        let ctl_path = state.run_dir.join(crate::paths::CONTROL_SOCKET);
        let control = UnixListener::bind(&ctl_path)
            .with_context(|| format!("cannot listen on {}", ctl_path.display()))?;
        state.status = crate::state::Status::Created;
        state.save(&state_path)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            vm,
            state_path,
            agent,
            in_flight: AtomicUsize::new(0),
            tty_fd,
            exec_waiters: Mutex::default(),
            role,
        });
        Ok((shared, control))
    }

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
        ready.write_all(&line)
    };
    match prepare(&args) {
        Ok(sb) => {
            // `create` started us bound to its life (a death signal), so a create killed
            // while the guest booted takes the boot with it. Created, the container lives on
            // its own, as `create` returns: unbound first, then reported.
            // SAFETY: prctl(PR_SET_PDEATHSIG) only changes this process's death signal.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, 0) };
            if let Err(e) = report(&mut ready, Ready::ok()) {
                // Nobody reads the report: the create that started us is gone. Nobody would
                // know of this container either; its VM goes with us.
                tracing::error!("cannot report the container created ({e}): the create that started this sandbox is gone; stopping");
                return 1;
            }
            drop(ready);
            sb.serve()
        }
        Err(e) => {
            tracing::error!("{e:#}");
            let _ = report(&mut ready, Ready::failed(&e));
            1
        }
    }
}

/// What a created container's sandbox is made of, however its VM came about (booted, taken
/// from the pool, or another container's).
struct Parts {
    state: ContainerState,
    state_path: PathBuf,
    vm: Arc<dyn Vm>,
    agent: Arc<AgentClient>,
    attached: crate::stdio::Attached,
    events: (mpsc::Sender<SbEvent>, mpsc::Receiver<SbEvent>),
    role: Role,
    network: Option<rootcell_net::Mirror>,
    dns_relay: Option<crate::dns::Relay>,
}

impl Sandbox {
    /// Records the container as created, listens on its control socket, and puts it together.
    fn assemble(p: Parts) -> anyhow::Result<Sandbox> {
        let run_dir = p.state.run_dir.clone();
        let (shared, control) = Shared::created(
            p.state,
            p.state_path,
            p.vm.clone(),
            p.agent,
            p.attached.tty_fd,
            p.role,
        )?;
        Ok(Sandbox {
            shared,
            vm: p.vm,
            events_tx: p.events.0,
            events: p.events.1,
            streams: p.attached.streams,
            control,
            run_dir,
            saved_termios: p.attached.saved,
            network: p.network,
            dns_relay: p.dns_relay,
        })
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
    /// The guest's DNS relay, served as long as the sandbox.
    dns_relay: Option<crate::dns::Relay>,
}
