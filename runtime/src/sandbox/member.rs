//! Bringing up a container in another container's VM (it joins that one's namespaces, see
//! [`crate::join`]): its rootfs and bind sources are attached to the owner's share, it gets its
//! own control connection to the agent, and the agent creates it beside the owner's container.
//! No VM is booted and no network is mirrored: both are the owner's.

use super::prepare::{connect_agent, create_init, join_cpu_cgroup, run_create_hooks, VmLogs};
use super::*;
use crate::hypervisor::joined::JoinedVm;
use crate::state::ContainerState;
use crate::{paths, share, spec};
use anyhow::{anyhow, Context, Result};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::{mpsc, Arc};

/// Detaches the container's share entries unless disarmed (a failed create leaves nothing in
/// the owner's share).
struct Attachment {
    mounts: Vec<PathBuf>,
    armed: bool,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        if self.armed {
            share::detach_member(&self.mounts);
        }
    }
}

/// Brings the container up in the VM it joins: [`enter_owner`] (the owner's mount namespace
/// and the shared network namespace, with the container's trees carried over), the hooks, the
/// agent connection, the container created in the guest, then the CPU cgroup.
pub(super) fn prepare(args: &SandboxArgs) -> Result<Sandbox> {
    let state_path = paths::state_file(&args.root, &args.id);
    let mut state = ContainerState::load(&state_path)
        .with_context(|| format!("cannot read {}", state_path.display()))?;
    let bundle = spec::load(&state.bundle)?;
    let join = crate::join::resolve(&args.root, &bundle.spec)?
        .ok_or_else(|| anyhow!("the container whose VM this one was to join is gone"))?;
    join.check_fits(&args.id, &bundle.spec)?;
    let binds = spec::bind_mounts(&bundle.spec, &bundle.dir);
    let trees = share::clone_member(&bundle.rootfs, &binds)?;
    enter_owner(&join.owner, &bundle.spec)?;
    block_signals();
    let _ = std::env::set_current_dir("/");
    let me = std::process::id() as i32;
    state.pid = me;
    state.pid_start = crate::state::proc_stat(me).map(|s| s.0).unwrap_or(0);
    state.vm_memory_mib = join.owner.vm_memory_mib;
    state.save(&state_path)?;
    if let Some(cg) = &state.cgroups_path {
        for e in crate::cgroup::join(cg, me as u32, crate::cgroup::Part::AllButCpu) {
            tracing::warn!("cgroup: {e}");
        }
    }
    let share_dir = join.owner.vm_run_dir().join(paths::SHARE_DIR);
    let mut attachment = Attachment {
        mounts: share::attach_member(&share_dir, &args.id, trees)?,
        armed: true,
    };
    run_create_hooks(&bundle.spec, &state)?;

    let vm: Arc<dyn Vm> = Arc::new(JoinedVm::new(join.owner.pid, join.owner.pid_start));
    let owner_state_dir = paths::state_dir(&args.root, &join.owner.id);
    let logs = VmLogs {
        vsock_uds: state.vsock_uds(),
        console_log: owner_state_dir.join("console.log"),
        hypervisor_log: owner_state_dir.join("hypervisor.log"),
    };
    let (events_tx, events) = mpsc::channel();
    let agent = connect_agent(&vm, &logs, &events_tx)?;
    let entry = share::member_entry(Path::new(rootcell_protocol::GUEST_SHARE_DIR), &args.id);
    let guest_spec = spec::rewrite_for_guest(
        &bundle.spec,
        &binds,
        &entry,
        spec::GuestNamespaces::Joined(&join),
    );
    let (attached, guest_pid) = create_init(
        args,
        &agent,
        &logs.vsock_uds,
        guest_spec,
        state.guest_privileged,
    )?;
    tracing::info!(owner = %join.owner.id, "created in the VM of container {}", join.owner.id);
    state.guest_pid = guest_pid;
    if let Some(cg) = &state.cgroups_path {
        join_cpu_cgroup(cg, &bundle.spec, &[me]);
    }
    attachment.armed = false;
    let role = Role::Member {
        mounts: std::mem::take(&mut attachment.mounts),
    };
    Sandbox::assemble(Parts {
        state,
        state_path,
        vm,
        agent,
        attached,
        events: (events_tx, events),
        role,
        network: None,
        dns_relay: None,
    })
}

/// Moves this (still single-threaded) process into the owner sandbox's mount namespace, where
/// its share is, and into the network namespace the spec names (the owner's).
fn enter_owner(owner: &ContainerState, spec: &oci_spec::runtime::Spec) -> Result<()> {
    let net_path = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|ns| {
            ns.iter()
                .find(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Network)
        })
        .and_then(|n| n.path().clone())
        .ok_or_else(|| anyhow!("a container joining another's VM shares its network namespace, and the spec names none"))?;
    // Both opened before either is entered: the paths are the host's.
    let net = std::fs::File::open(&net_path)
        .with_context(|| format!("cannot open network namespace {}", net_path.display()))?;
    // The process whose mount namespace has the share: the owner's sandbox, or its pool VM's
    // holder.
    let share_pid = owner.vm_share_pid();
    let mnt_path = format!("/proc/{share_pid}/ns/mnt");
    let mnt = std::fs::File::open(&mnt_path).with_context(|| {
        format!(
            "cannot open the mount namespace of container {}'s sandbox ({mnt_path})",
            owner.id
        )
    })?;
    // Its root too: setns puts us at the namespace's root, which is not the sandbox's when the
    // runtime runs chrooted (a dockerd from another root file system).
    let root_path = format!("/proc/{share_pid}/root");
    let root = std::fs::File::open(&root_path)
        .with_context(|| format!("cannot open the root of container {}'s sandbox", owner.id))?;
    if !crate::state::process_alive(owner.pid, owner.pid_start) {
        anyhow::bail!(
            "container {} has stopped; its VM cannot be joined",
            owner.id
        );
    }
    nix::sched::setns(mnt.as_fd(), nix::sched::CloneFlags::CLONE_NEWNS).with_context(|| {
        format!(
            "cannot enter the mount namespace of container {}'s sandbox",
            owner.id
        )
    })?;
    nix::unistd::fchdir(std::os::fd::AsRawFd::as_raw_fd(&root))
        .and_then(|()| nix::unistd::chroot("."))
        .and_then(|()| nix::unistd::chdir("/"))
        .with_context(|| format!("cannot take the root of container {}'s sandbox", owner.id))?;
    nix::sched::setns(net.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("cannot join network namespace {}", net_path.display()))
}
