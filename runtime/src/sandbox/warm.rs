//! Bringing a sandbox up on a VM taken from the pool (see [`crate::pool`]): the same steps as a
//! cold start, minus the boot. The VM's holder and hypervisor join the container's cgroup,
//! its tap moves into the container's network namespace and is mirrored like a tap made now,
//! the rootfs and bind sources are attached to its share, and the agent gets the container.

use super::prepare::{connect_agent, create_init, join_cpu_cgroup, run_create_hooks, VmLogs};
use super::*;
use crate::hypervisor::pooled::PooledVm;
use crate::pool::{claim::Claimed, Shape, CARD_MTU, TAP_NAME};
use crate::state::{ContainerState, PooledVmRecord};
use crate::{paths, share, spec};
use anyhow::{anyhow, bail, Context, Result};
use rootcell_protocol::{Request, Response};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::{mpsc, Arc};

/// What became of a claimed VM.
pub(super) enum Outcome {
    /// The container is created in it.
    Ready(Box<Sandbox>),
    /// The caller boots a VM instead: this one does not suit the container after all (more
    /// interfaces than it has cards, or a larger MTU), or it died before the container was
    /// handed to it. It is ended and gone, and nothing of it is left in the state.
    Boot {
        /// Whether the prestart and createRuntime hooks have run (and succeeded) already.
        hooks_run: bool,
    },
}

/// How long an error met while taking a VM over may precede the sight of its death.
const DEATH_GRACE: std::time::Duration = std::time::Duration::from_millis(1500);

/// How far taking a VM over got, which decides whether its death may still mean a cold boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// Claimed; the hooks have not run.
    Claimed,
    /// The hooks failed: the create fails, whatever became of the VM.
    HooksFailed,
    /// The hooks have run.
    HooksRan,
    /// The container is the guest's (created, or its terminal is handed out): from here on a
    /// dead VM is the container's death, not a reason to boot another.
    Handed,
}

/// Claims a pool VM that fits what `spec` asks for, for the container `args` name, unless the
/// pool is off, absent or empty (the log says which).
pub(super) fn claim(args: &SandboxArgs, spec: &oci_spec::runtime::Spec) -> Option<Claimed> {
    let (memory_mib, vcpus) = spec::vm_resources(spec);
    let owner = crate::paths::state_dir(&args.root, &args.id);
    crate::pool::claim::take(Shape { memory_mib, vcpus }, &owner)
}

/// Creates the container in the claimed VM, or, if that VM turns out dead before the container
/// is handed to it, ends what is left of it and has the caller boot one (a cold fallback).
pub(super) fn prepare(
    args: &SandboxArgs,
    state: &mut ContainerState,
    state_path: &Path,
    bundle: &spec::Bundle,
    claimed: Claimed,
) -> Result<Outcome> {
    let _span = tracing::info_span!("warm_start", vm = %claimed.handover.name).entered();
    let h = claimed.handover.clone();
    let pooled = match PooledVm::new(claimed) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            // Dropped: the claim is hung up, and a holder still alive ends and cleans up.
            tracing::info!(
                vm = h.name,
                "pool VM {} ended before it could be used ({e}): booting a VM instead (cold fallback)",
                h.name
            );
            return Ok(Outcome::Boot { hooks_run: false });
        }
    };
    let mut progress = Progress::Claimed;
    let err = match take_over(args, state, state_path, bundle, &h, &pooled, &mut progress) {
        Ok(outcome) => return Ok(outcome),
        Err(e) => e,
    };
    if matches!(progress, Progress::HooksFailed | Progress::Handed)
        || !pooled.ended_within(DEATH_GRACE)
    {
        return Err(err);
    }
    tracing::info!(
        vm = h.name,
        "pool VM {} died before the container was handed to it ({err:#}): booting a VM instead (cold fallback)",
        h.name
    );
    release(&pooled, state, state_path)?;
    Ok(Outcome::Boot {
        hooks_run: progress == Progress::HooksRan,
    })
}

/// Ends a claimed VM that will not serve the container and forgets it in the state. Its tap,
/// if it was moved into the container's network namespace, is deleted there: the holder's exit
/// does not wait for the hypervisor's, whose descriptor keeps the tap, and a cold start makes
/// its own of the same name.
fn release(vm: &PooledVm, state: &mut ContainerState, state_path: &Path) -> Result<()> {
    vm.kill();
    vm.finish(crate::timeouts::VM_FINISH);
    rootcell_net::remove_link(TAP_NAME)
        .context("cannot remove the tap of the pool VM given back")?;
    state.pooled = None;
    state.vm_pid = 0;
    state.vm_pid_start = 0;
    state.vm_memory_mib = 0;
    state.save(state_path)?;
    Ok(())
}

/// The steps of [`prepare`], with how far they got in `progress`.
fn take_over(
    args: &SandboxArgs,
    state: &mut ContainerState,
    state_path: &Path,
    bundle: &spec::Bundle,
    h: &crate::pool::Handover,
    pooled: &Arc<PooledVm>,
    progress: &mut Progress,
) -> Result<Outcome> {
    let vm: Arc<dyn Vm> = pooled.clone();
    // From the claim on, the VM's host processes count as the container's.
    state.vm_pid = h.vm_pid;
    state.vm_pid_start = h.vm_pid_start;
    state.vm_memory_mib = h.shape.memory_mib;
    state.pooled = Some(PooledVmRecord {
        name: h.name.clone(),
        holder_pid: h.holder_pid,
        holder_pid_start: h.holder_pid_start,
        run_dir: h.run_dir.clone(),
    });
    state.save(state_path)?;
    if let Some(cg) = &state.cgroups_path {
        for pid in [h.holder_pid, h.vm_pid] {
            for e in crate::cgroup::join(cg, pid as u32, crate::cgroup::Part::AllButCpu) {
                tracing::warn!("cgroup: {e}");
            }
        }
        join_cpu_cgroup(cg, &bundle.spec, &[state.pid, h.holder_pid, h.vm_pid]);
    }
    // The agent's handshake (connect, Hello, clock) needs nothing of what follows: it runs
    // while the tap moves, the hooks run and the rootfs is attached. On an early error the
    // thread's connection is dropped with it (or ends with the VM, which the caller ends).
    let (events_tx, events) = mpsc::channel();
    let logs = VmLogs {
        vsock_uds: h.run_dir.join(paths::VSOCK_UDS),
        console_log: h.run_dir.join("console.log"),
        hypervisor_log: h.run_dir.join("qemu.log"),
    };
    let agent_conn = {
        let (vm, tx, span) = (vm.clone(), events_tx.clone(), tracing::Span::current());
        let logs = VmLogs {
            vsock_uds: logs.vsock_uds.clone(),
            console_log: logs.console_log.clone(),
            hypervisor_log: logs.hypervisor_log.clone(),
        };
        std::thread::Builder::new()
            .name("agent-connect".into())
            .spawn(move || {
                let _s = span.entered();
                connect_agent(&vm, &logs, &tx)
            })
            .context("cannot start the agent's handshake")?
    };
    let holder_ns = std::fs::File::open(&h.netns).with_context(|| {
        format!(
            "cannot open the pool VM's network namespace {}",
            h.netns.display()
        )
    })?;
    let own_ns = std::fs::File::open("/proc/thread-self/ns/net")
        .context("cannot open the container's network namespace")?;
    rootcell_net::move_link(TAP_NAME, &holder_ns, &own_ns)?;

    *progress = Progress::HooksFailed;
    run_create_hooks(&bundle.spec, state)?;
    *progress = Progress::HooksRan;
    let scanned = rootcell_net::scan().context("cannot read the container's network")?;
    if scanned.interfaces.len() > 1 || scanned.interfaces.iter().any(|i| i.mtu > CARD_MTU) {
        tracing::info!(
            interfaces = scanned.interfaces.len(),
            "the pool VM has one card of MTU {CARD_MTU} at most and does not suit this container: booting a VM instead"
        );
        release(pooled, state, state_path)?;
        return Ok(Outcome::Boot { hooks_run: true });
    }
    let network = crate::network::mirror_onto(&[TAP_NAME.to_string()])?;
    let loopback_dns = network
        .as_ref()
        .and_then(|_| crate::dns::loopback_resolver(&bundle.spec, &bundle.dir));
    // Stopped when dropped: on a cold fallback from here on, the VM booted instead has its own.
    let dns_relay = loopback_dns
        .map(|addr| crate::dns::serve(&h.run_dir, addr))
        .transpose()?;

    let binds = spec::bind_mounts(&bundle.spec, &bundle.dir);
    let trees = share::clone_member(&bundle.rootfs, &binds)?;
    attach_in(
        h.holder_pid,
        &h.run_dir.join(paths::SHARE_DIR),
        &args.id,
        trees,
    )?;

    let agent = agent_conn
        .join()
        .map_err(|_| anyhow!("the agent's handshake thread panicked"))??;
    if let Some((_, config)) = &network {
        let mut config = config.clone();
        if let Some(first) = config.interfaces.first_mut() {
            first.card = Some(h.card_mac);
        }
        let req = Request::ConfigureNetwork {
            config,
            loopback_dns,
        };
        match agent.request(req, crate::timeouts::NETWORK)? {
            Response::Ok => {}
            Response::Error { message, .. } => {
                bail!("the guest cannot set up the container's network: {message}")
            }
            other => bail!("unexpected answer to ConfigureNetwork: {other:?}"),
        }
    }
    let entry = share::member_entry(Path::new(rootcell_protocol::GUEST_SHARE_DIR), &args.id);
    let guest_spec = spec::rewrite_for_guest(
        &bundle.spec,
        &binds,
        &entry,
        spec::GuestNamespaces::Own {
            guest_network: network.is_some(),
        },
    );
    // A terminal's pty goes to the console socket once: past that, no second VM may have it.
    // Plain stdio streams are opened again on the VM booted instead.
    if spec::has_terminal(&guest_spec) {
        *progress = Progress::Handed;
    }
    let (attached, guest_pid) = create_init(
        args,
        &agent,
        &logs.vsock_uds,
        guest_spec,
        state.guest_privileged,
    )?;
    *progress = Progress::Handed;
    state.guest_pid = guest_pid;
    Sandbox::assemble(Parts {
        state: state.clone(),
        state_path: state_path.to_path_buf(),
        vm,
        agent,
        attached,
        events: (events_tx, events),
        role: Role::Owner,
        network: network.map(|(m, _)| m),
        dns_relay,
    })
    .map(|sb| Outcome::Ready(Box::new(sb)))
}

/// Attaches the container's trees to the share of the pool VM run by `holder_pid`, from a
/// thread that enters that process's mount namespace (the sandbox itself stays in its own, so
/// hooks and everything else see the host as in a cold start).
fn attach_in(
    holder_pid: i32,
    share_dir: &Path,
    id: &str,
    trees: share::MemberTrees,
) -> Result<Vec<PathBuf>> {
    let mnt = std::fs::File::open(format!("/proc/{holder_pid}/ns/mnt"))
        .context("cannot open the pool VM's mount namespace")?;
    let root = std::fs::File::open(format!("/proc/{holder_pid}/root"))
        .context("cannot open the pool VM's root")?;
    let share_dir = share_dir.to_path_buf();
    let id = id.to_string();
    std::thread::spawn(move || -> Result<Vec<PathBuf>> {
        // A thread may change mount namespace once it no longer shares the process's root
        // and cwd (setns(2)); the thread and its namespace end together.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS)
            .context("cannot unshare the attaching thread's file system attributes")?;
        nix::sched::setns(mnt.as_fd(), nix::sched::CloneFlags::CLONE_NEWNS)
            .context("cannot enter the pool VM's mount namespace")?;
        nix::unistd::fchdir(std::os::fd::AsRawFd::as_raw_fd(&root))
            .and_then(|()| nix::unistd::chroot("."))
            .and_then(|()| nix::unistd::chdir("/"))
            .context("cannot take the pool VM's root")?;
        Ok(share::attach_member(&share_dir, &id, trees)?)
    })
    .join()
    .map_err(|_| anyhow!("the attaching thread panicked"))?
}
