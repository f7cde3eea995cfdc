//! Building a container from an OCI spec: namespaces, root filesystem, credentials, and the
//! init or exec process, which waits for a release before it executes the program.

pub mod devices;
pub mod error;
pub mod mounts;
pub mod paths;
pub mod privileged;
pub mod process;
mod report;
pub mod rootfs;
mod spawn;
pub mod spec;
pub mod user;

pub use error::SetupError;
pub use mounts::MountEnv;
pub use spawn::{Prepared, Stdio};
pub use spec::NamespacePlan;

use crate::alog;
use error::Context;
use oci_spec::runtime::{LinuxNamespaceType, Process, Spec};
use spawn::{ChildFds, ExecPlan};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

/// Everything needed to create a container's init process.
#[derive(Debug, Clone, Copy)]
pub struct InitRequest<'a> {
    /// The spec (paths are already guest paths).
    pub spec: &'a Spec,
    /// Validated namespaces ([`spec::validate`]).
    pub plan: &'a NamespacePlan,
    /// cgroup2 directory to put the container in, if the guest has one.
    pub cgroup: Option<&'a Path>,
    /// Facts about the guest that change mounts.
    pub env: MountEnv,
}

/// Where an exec process goes: the namespaces and cgroup of a running init.
#[derive(Debug, Clone, Copy)]
pub struct ExecRequest<'a> {
    /// Pid (agent namespace) of the container's init.
    pub init_pid: i32,
    /// The container's namespaces.
    pub plan: &'a NamespacePlan,
    /// The container's cgroup2 directory, if any.
    pub cgroup: Option<&'a Path>,
}

/// Creates the container and its init process; it execs on [`Prepared::release`].
pub fn create_init(req: InitRequest<'_>, stdio: Stdio) -> Result<Prepared, SetupError> {
    let process = req
        .spec
        .process()
        .as_ref()
        .ok_or_else(|| SetupError::other("spec has no process"))?;
    let fallback_console = stdio.console_path.clone();
    let uid = process.user().uid();
    spawn::spawn(
        stdio,
        || {
            if let Some(cg) = req.cgroup {
                join_cgroup(cg)?;
            }
            join_namespaces(req.plan)?;
            nix::sched::unshare(req.plan.clone_flags()).ctx(|| "unshare namespaces".into())
        },
        |fds| {
            // A new session: the init is detached from the agent's console and can own a pty.
            nix::unistd::setsid().ctx(|| "setsid".into())?;
            if req.plan.creates(LinuxNamespaceType::Network) {
                // A fresh network namespace starts with lo down; containers expect 127.0.0.1.
                crate::net::loopback_up().ctx(|| "bring up lo in the container".into())?;
            }
            set_hostname(req.spec, req.plan)?;
            // The terminal comes from the container's devpts once its mounts are up; its
            // slave is also the container's /dev/console.
            let console = |root: &Path| -> Result<PathBuf, SetupError> {
                let ptmx = paths::resolve_in_root(root, Path::new("/dev/pts/ptmx"))?;
                Ok(match use_container_pty(fds, &ptmx, uid)? {
                    Some(n) => ptmx.with_file_name(n.to_string()),
                    None => fallback_console.clone().unwrap_or_default(),
                })
            };
            let console: Option<&rootfs::ConsoleFn<'_>> =
                fallback_console.is_some().then_some(&console);
            rootfs::prepare_rootfs(req.spec, req.env, console)?;
            set_controlling_terminal(fds)?;
            finish_process(process)
        },
    )
}

/// Creates an extra process inside a running container; it execs on [`Prepared::release`].
pub fn create_exec(
    req: ExecRequest<'_>,
    process: &Process,
    stdio: Stdio,
) -> Result<Prepared, SetupError> {
    spec::validate_process(process)?;
    let terminal = stdio.terminal.is_some();
    spawn::spawn(
        stdio,
        || {
            if let Some(cg) = req.cgroup {
                join_cgroup(cg)?;
            }
            enter_namespaces(req.init_pid, req.plan)
        },
        |fds| {
            if terminal {
                nix::unistd::setsid().ctx(|| "setsid".into())?;
                // In the container's mount namespace now: its own devpts, as for the init.
                use_container_pty(fds, Path::new("/dev/pts/ptmx"), process.user().uid())?;
                set_controlling_terminal(fds)?;
            }
            finish_process(process)
        },
    )
}

/// Joins the namespaces the spec names by path (another container's in this guest), before
/// the others are created: a joined pid namespace takes effect for the next fork.
fn join_namespaces(plan: &NamespacePlan) -> Result<(), SetupError> {
    for (t, path) in &plan.joined {
        let f = std::fs::File::open(path).map_err(|e| {
            SetupError::new(
                rootcell_protocol::ErrorCode::NoSuchProcess,
                format!(
                    "cannot join the {} namespace {}: {e} (has its container exited?)",
                    spec::ns_proc_name(*t),
                    path.display()
                ),
            )
        })?;
        nix::sched::setns(f.as_fd(), spec::ns_flag(*t)).ctx(|| {
            format!(
                "join the {} namespace {}",
                spec::ns_proc_name(*t),
                path.display()
            )
        })?;
    }
    Ok(())
}

/// Joins the init's namespaces, the mount namespace last (it changes root and cwd).
fn enter_namespaces(init_pid: i32, plan: &NamespacePlan) -> Result<(), SetupError> {
    let mut order: Vec<LinuxNamespaceType> = plan
        .types
        .iter()
        .copied()
        .filter(|t| *t != LinuxNamespaceType::Mount)
        .collect();
    order.push(LinuxNamespaceType::Mount);
    // Open all first: after joining the pid or mount namespace the paths may mean something else.
    let mut files = Vec::new();
    for t in order {
        let path = format!("/proc/{init_pid}/ns/{}", spec::ns_proc_name(t));
        let f = std::fs::File::open(&path).map_err(|e| {
            SetupError::new(
                rootcell_protocol::ErrorCode::NoSuchProcess,
                format!("open {path}: {e}"),
            )
        })?;
        files.push((t, f));
    }
    for (t, f) in &files {
        nix::sched::setns(f.as_fd(), spec::ns_flag(*t))
            .ctx(|| format!("setns {}", spec::ns_proc_name(*t)))?;
    }
    Ok(())
}

/// Moves the calling process into a cgroup2 directory.
fn join_cgroup(dir: &Path) -> Result<(), SetupError> {
    std::fs::write(dir.join("cgroup.procs"), "0").ctx(|| format!("join cgroup {}", dir.display()))
}

/// Replaces the process's terminal (the agent's pty slave) with a pty opened from the devpts
/// instance of `ptmx`, the container's own, as runc does: `tty` then names `/dev/pts/N` of the
/// container. The master goes to the agent over the offer socket; the slave takes the place of
/// the old one in the process's fds and belongs to the process's user (runc's
/// fixStdioPermissions). Returns N, or `None` (the agent's pty stays) when the container has
/// no devpts of its own.
fn use_container_pty(fds: &ChildFds, ptmx: &Path, uid: u32) -> Result<Option<u32>, SetupError> {
    let (Some(term), Some(offer)) = (fds.terminal, fds.pty_offer) else {
        return Ok(None);
    };
    let (master, slave, n) = match crate::terminal::open_pty_at(ptmx) {
        Ok(p) => p,
        Err(e) => {
            alog!(
                "no pty from {}: {e}; the terminal stays the agent's pty",
                ptmx.display()
            );
            return Ok(None);
        }
    };
    nix::unistd::fchown(
        slave.as_raw_fd(),
        Some(nix::unistd::Uid::from_raw(uid)),
        None,
    )
    .ctx(|| format!("chown the container's pty {n}"))?;
    // SAFETY: the offer fd stays open for the life of the child process.
    let offer = unsafe { std::os::fd::BorrowedFd::borrow_raw(offer) };
    crate::terminal::send_fd(offer, master.as_fd())
        .map_err(|e| SetupError::other(format!("hand the container's pty to the agent: {e}")))?;
    // stdio and the terminal share this fd number: one dup3 switches all of them.
    nix::unistd::dup3(slave.as_raw_fd(), term, nix::fcntl::OFlag::O_CLOEXEC)
        .ctx(|| "install the container's pty".into())?;
    Ok(Some(n))
}

/// Makes the pty slave the controlling terminal (after setsid).
fn set_controlling_terminal(fds: &ChildFds) -> Result<(), SetupError> {
    if let Some(t) = fds.terminal {
        // SAFETY: TIOCSCTTY on an open pty slave.
        if unsafe { libc::ioctl(t, libc::TIOCSCTTY, 0) } != 0 {
            return Err(SetupError::other(format!(
                "TIOCSCTTY: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

fn set_hostname(spec: &Spec, plan: &NamespacePlan) -> Result<(), SetupError> {
    let names = [spec.hostname().as_deref(), spec.domainname().as_deref()];
    if names.iter().all(|n| n.is_none_or(str::is_empty)) {
        return Ok(());
    }
    if !plan.has(LinuxNamespaceType::Uts) {
        return Err(SetupError::other(
            "unable to set hostname without a private UTS namespace",
        ));
    }
    if !plan.creates(LinuxNamespaceType::Uts) {
        // A joined UTS namespace (a pod's) keeps the name its owner gave it.
        return Ok(());
    }
    if let Some(h) = names[0].filter(|h| !h.is_empty()) {
        nix::unistd::sethostname(h).ctx(|| format!("sethostname {h}"))?;
    }
    if let Some(d) = names[1].filter(|d| !d.is_empty()) {
        // SAFETY: setdomainname with a valid buffer and length.
        if unsafe { libc::setdomainname(d.as_ptr().cast(), d.len()) } != 0 {
            return Err(SetupError::other(format!(
                "setdomainname: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

/// The steps shared by init and exec once inside the container: rlimits, OOM score, cwd,
/// environment, executable lookup, credentials.
fn finish_process(process: &Process) -> Result<ExecPlan, SetupError> {
    process::apply_process_basics(process)?;
    let env = process::build_env(process);
    let args = process.args().clone().unwrap_or_default();
    let name = args
        .first()
        .ok_or_else(|| SetupError::other("process.args must not be empty"))?;
    let path_env = process::env_get(&env, "PATH").unwrap_or(process::DEFAULT_PATH);
    let path = process::resolve_executable(name, path_env, process.cwd())?;
    user::apply_user(process)?;
    Ok(ExecPlan {
        path,
        args,
        env,
        no_new_privileges: process.no_new_privileges() == Some(true),
    })
}
