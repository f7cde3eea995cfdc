//! `delete [--force]`: remove a container and everything it left on the host.

use super::kill::{helper_processes, kill_group, kill_sandbox};
use crate::commands::Global;
use crate::error::RuntimeError;
use crate::state::{process_alive, Status};
use crate::{hooks, paths, share};
use anyhow::{bail, Result};
use std::time::{Duration, Instant};

/// SIGKILLs a process recorded with its start time (a VMM, a pool VM's holder) if it is still
/// that process, and waits up to `timeout` for it to go; false if it is still there.
pub(super) fn kill_recorded(pid: i32, start: u64, timeout: Duration) -> bool {
    if pid <= 0 || !process_alive(pid, start) {
        return true;
    }
    // SAFETY: plain kill(2); the start-time check above guards against pid reuse.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_gone(pid, start, timeout)
}

/// Waits until `pid` is gone (or a zombie), up to `timeout`.
pub(super) fn wait_gone(pid: i32, start: u64, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while process_alive(pid, start) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// How long a `delete` waits for another one of the same container to finish.
pub(super) const DELETE_LOCK_WAIT: Duration = crate::timeouts::DELETE_LOCK;

/// Takes an exclusive lock on a container's state dir (flock on the directory itself), so
/// concurrent deletes — containerd runs `delete --force` a few milliseconds after its shim's
/// own `delete` — do not run the same steps (poststop hooks, removals) at once. Waits up to
/// [`DELETE_LOCK_WAIT`] for another holder, then goes on unlocked (`Ok(None)`, with a
/// warning). `NotFound` if the directory is gone, also when it went while we waited.
pub(super) fn lock_state_dir(
    dir: &std::path::Path,
) -> std::io::Result<Option<nix::fcntl::Flock<std::fs::File>>> {
    use nix::fcntl::{Flock, FlockArg};
    use std::os::unix::fs::MetadataExt;
    let mut f = std::fs::File::open(dir)?;
    let deadline = Instant::now() + DELETE_LOCK_WAIT;
    let held = loop {
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(held) => break held,
            Err((file, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                f = file;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err((_, e)) => {
                tracing::warn!(
                    "cannot lock {} ({e}); deleting without waiting for another delete",
                    dir.display()
                );
                return Ok(None);
            }
        }
    };
    // The holder may have removed the directory (or a new container taken the name).
    let now = std::fs::metadata(dir)?;
    let meta = held.metadata()?;
    if (now.dev(), now.ino()) != (meta.dev(), meta.ino()) || meta.nlink() == 0 {
        return Err(std::io::ErrorKind::NotFound.into());
    }
    Ok(Some(held))
}

/// `delete [--force] ID`.
pub fn delete(g: &Global, id: &str, force: bool) -> Result<()> {
    let _span = tracing::info_span!("delete", id).entered();
    crate::id::validate(id)?;
    let state_dir = paths::state_dir(&g.root, id);
    let _lock = match lock_state_dir(&state_dir) {
        Ok(lock) => lock,
        // Gone, or removed by a delete that ran at the same time: nothing is left to do.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return if force {
                Ok(())
            } else {
                Err(RuntimeError::NotExist(id.to_string()).into())
            };
        }
        Err(e) => {
            tracing::warn!("cannot open {}: {e}", state_dir.display());
            None
        }
    };
    let st = match g.load(id) {
        Ok(st) => st.refreshed(),
        Err(e) => {
            if !state_dir.exists() {
                return if force { Ok(()) } else { Err(e.into()) };
            }
            if !force {
                bail!(
                    "container {id} has an unreadable state file in {}; use delete --force",
                    state_dir.display()
                );
            }
            // Without a state file the sandbox and exec relays are found by their command
            // line; they may live on (the state file went, not the container).
            for (pid, start) in helper_processes(&g.root, id) {
                tracing::warn!(
                    pid,
                    "killing a process of container {id}, whose state file is gone"
                );
                kill_group(pid, start);
            }
            let _ = std::fs::remove_dir_all(&state_dir);
            let _ = share::remove_run_dir(&paths::run_dir(&g.root, id));
            return Ok(());
        }
    };
    if st.status != Status::Stopped && !force {
        return Err(
            RuntimeError::NotStopped(id.to_string(), st.status.as_str().to_string()).into(),
        );
    }
    // A stopped container's sandbox may still be tearing its VM down: give it a moment.
    if st.status == Status::Stopped
        && !wait_gone(st.pid, st.pid_start, crate::timeouts::PROCESS_GONE)
    {
        tracing::warn!(
            pid = st.pid,
            "sandbox still alive 10 s after the container stopped; killing it"
        );
    }
    kill_sandbox(&st);
    if !wait_gone(st.pid, st.pid_start, crate::timeouts::PROCESS_GONE) {
        bail!("sandbox process {} of container {id} did not die after SIGKILL; its state is kept in {}", st.pid, state_dir.display());
    }
    kill_recorded(st.vm_pid, st.vm_pid_start, crate::timeouts::VMM_GONE);
    if let Some(p) = &st.pooled {
        // A pool VM's holder ends with its claimant; this one's did not get to.
        kill_recorded(p.holder_pid, p.holder_pid_start, crate::timeouts::VMM_GONE);
        let _ = share::remove_run_dir(&p.run_dir);
    }
    if let Some(vm) = &st.shares_vm {
        // Its entries in the owner's share, if its sandbox could not detach them.
        if let Ok(owner) = g.load(&vm.owner) {
            if process_alive(owner.pid, owner.pid_start) {
                share::detach_member_from_outside(
                    owner.vm_share_pid(),
                    &vm.owner_run_dir.join(paths::SHARE_DIR),
                    id,
                );
            }
        }
    }
    let mut stopped = st.clone();
    stopped.status = Status::Stopped;
    // Warned and skipped, as the runtime spec says for poststop.
    hooks::run_all("poststop", &st.poststop, &stopped.oci_json().to_string());
    if let Some(cg) = &st.cgroups_path {
        for e in crate::cgroup::remove(cg) {
            tracing::warn!("{e}");
        }
    }
    if let Err(e) = share::remove_run_dir(&st.run_dir) {
        tracing::warn!("cannot remove run dir {}: {e}", st.run_dir.display());
    }
    std::fs::remove_dir_all(&state_dir).or_else(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Ok(())
        } else {
            Err(e)
        }
    })?;
    Ok(())
}
