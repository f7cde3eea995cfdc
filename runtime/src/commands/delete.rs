//! `delete [--force]`: remove a container and everything it left on the host.

use super::kill::{kill_group, kill_sandbox};
use crate::commands::Global;
use crate::error::RuntimeError;
use crate::state::{process_alive, Status};
use crate::{hooks, paths, share};
use anyhow::{bail, Result};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
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

/// What a host process that names a container on its command line is to it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Named {
    /// Its sandbox or an exec relay (`rootcell --root ROOT ... sandbox|exec-relay --id ID`),
    /// each leading its own process group (the sandbox's holds its VMM).
    Helper,
    /// Its VMM: QEMU (`-name guest=<state dir>`) or the built-in VMM (`builtin-vmm --for
    /// <state dir>`).
    Vmm,
    /// A pool VM's holder it claimed (`pool vm ... --run-dir DIR ... --claimed-for <state
    /// dir>`), with that DIR.
    Holder(PathBuf),
}

/// What the command line `args` (split at its NULs) is to container `id` under `root`, if
/// anything. Whole arguments are compared, so container `a` is not taken for `ab`.
fn named(args: &[&[u8]], root: &Path, id: &str) -> Option<Named> {
    let owner = paths::state_dir(root, id);
    let owner = owner.as_os_str().as_bytes();
    let has = |a: &[u8]| args.contains(&a);
    let value = |k: &[u8]| args.windows(2).find(|w| w[0] == k).map(|w| w[1]);
    let pair = |k: &[u8], v: &[u8]| args.windows(2).any(|w| w[0] == k && w[1] == v);
    if (has(b"sandbox") || has(b"exec-relay"))
        && pair(b"--root", root.as_os_str().as_bytes())
        && pair(b"--id", id.as_bytes())
    {
        return Some(Named::Helper);
    }
    let qemu_name =
        crate::hypervisor::qemu::name_arg(Path::new(std::ffi::OsStr::from_bytes(owner)));
    if pair(b"-name", qemu_name.as_bytes()) || (has(b"builtin-vmm") && pair(b"--for", owner)) {
        return Some(Named::Vmm);
    }
    if has(b"pool") && has(b"vm") && pair(b"--claimed-for", &crate::pool::holder::fill_room(owner))
    {
        let dir = value(b"--run-dir").map(|d| PathBuf::from(std::ffi::OsStr::from_bytes(d)));
        return Some(Named::Holder(dir.unwrap_or_default()));
    }
    None
}

/// The live host processes that name container `id` under `root` (see [`named`]), with their
/// start times.
fn named_processes(root: &Path, id: &str) -> Vec<(i32, u64, Named)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if let Some(what) = named(&args, root, id) {
            if let Some((start, _)) = crate::state::proc_stat(pid) {
                found.push((pid, start, what));
            }
        }
    }
    found
}

/// Ends every host process left of container `id` under `root` that names it on its command
/// line, and the run dirs of pool VMs it claimed: the backstop for what the state file does
/// not say (a state dir removed by hand, a VMM not recorded yet). The sandbox and relays go
/// first (with their process groups); a claimed pool VM's holder gets [`VMM_GONE`] to end its
/// VM and clean up after it, as it does when its claimant is gone, before it is killed. What
/// it ended goes to the log only (info), not to the caller's stderr.
///
/// [`VMM_GONE`]: crate::timeouts::VMM_GONE
fn reap_named(root: &Path, id: &str) {
    let found = named_processes(root, id);
    let mut cgroups = Vec::new();
    for (pid, start, what) in &found {
        if *what == Named::Helper {
            tracing::info!(pid, "killing a leftover sandbox or exec relay of container {id}, found by its command line");
            cgroups.extend(container_cgroups(*pid, id));
            kill_group(*pid, *start);
        }
    }
    cgroups.sort();
    cgroups.dedup();
    for cg in cgroups {
        tracing::info!(cgroup = cg, "removing the cgroup of container {id}");
        for e in crate::cgroup::remove(&cg) {
            tracing::warn!("{e}");
        }
    }
    for (pid, start, what) in &found {
        match what {
            Named::Helper => {}
            Named::Vmm => {
                if process_alive(*pid, *start) {
                    tracing::info!(
                        pid,
                        "killing a leftover VMM of container {id}, found by its command line"
                    );
                }
                kill_recorded(*pid, *start, crate::timeouts::VMM_GONE);
            }
            Named::Holder(dir) => {
                if !wait_gone(*pid, *start, crate::timeouts::VMM_GONE) {
                    tracing::info!(pid, "killing a leftover pool VM holder claimed by container {id}, found by its command line");
                    kill_recorded(*pid, *start, crate::timeouts::VMM_GONE);
                }
                if !dir.as_os_str().is_empty() && dir.exists() {
                    tracing::info!(dir = %dir.display(), "removing the run dir of a pool VM claimed by container {id}");
                    if let Err(e) = share::remove_run_dir(dir) {
                        tracing::warn!("cannot remove {}: {e}", dir.display());
                    }
                }
            }
        }
    }
}

/// The cgroups (paths in their hierarchies) of process `pid` that are container `id`'s own:
/// those whose last component names it, as `linux.cgroupsPath` does under every engine
/// (`/docker/<id>`, `docker-<id>.scope`, `/kubepods/.../<id>`). A cgroup that does not name it
/// (the caller's, when config.json gave none) is not the container's to remove.
fn container_cgroups(pid: i32, id: &str) -> Vec<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.splitn(3, ':').nth(2))
        .filter(|path| names_id(path.rsplit('/').next().unwrap_or(""), id))
        .map(str::to_string)
        .collect()
}

/// Whether cgroup name `last` is container `id`'s: `id` itself, or ending in `-<id>` (with
/// an optional `.scope`).
fn names_id(last: &str, id: &str) -> bool {
    let last = last.strip_suffix(".scope").unwrap_or(last);
    last == id || last.strip_suffix(id).is_some_and(|p| p.ends_with('-'))
}

/// In network namespace `path`, which config.json gave container `id` (one that outlives it: a
/// pod's, one made with `ip netns`), removes the ingress qdiscs a killed sandbox's network
/// mirror left on its interfaces (their redirects lead to the taps that went with the VMM),
/// which would drop the interfaces' frames and refuse the next container's mirror. Called once
/// the VMM is gone; a live mirror's qdiscs (their taps are there) are left alone.
fn clean_kept_netns(path: &Path, id: &str) {
    match std::fs::File::open(path).map(|ns| rootcell_net::remove_stale_mirrors(&ns)) {
        Ok(Ok(cleaned)) if !cleaned.is_empty() => tracing::info!(
            netns = %path.display(),
            interfaces = ?cleaned,
            "removed the network mirror container {id}'s killed sandbox left"
        ),
        Ok(Ok(_)) | Err(_) => {}
        Ok(Err(e)) => tracing::warn!(netns = %path.display(), "{e}"),
    }
}

/// Removes the run dir of container `id` under `root` if it is there, saying so in the log.
fn remove_run_dir_of(root: &Path, id: &str) {
    let dir = paths::run_dir(root, id);
    if dir.exists() {
        tracing::info!(dir = %dir.display(), "removing the run dir of container {id}");
        if let Err(e) = share::remove_run_dir(&dir) {
            tracing::warn!("cannot remove run dir {}: {e}", dir.display());
        }
    }
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
                // Its state dir may have been removed by hand under a live container: what
                // is left of it is found by name.
                reap_named(&g.root, id);
                remove_run_dir_of(&g.root, id);
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
            // Without a state file its processes are found by their command line; they may
            // live on (the state file went, not the container).
            reap_named(&g.root, id);
            let _ = std::fs::remove_dir_all(&state_dir);
            remove_run_dir_of(&g.root, id);
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
    // What the state did not record (a VMM started just before its sandbox died).
    reap_named(&g.root, id);
    if let Some(ns) = &st.netns {
        clean_kept_netns(ns, id);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &[&str]) -> Vec<Vec<u8>> {
        line.iter().map(|a| a.as_bytes().to_vec()).collect()
    }

    fn what(line: &[Vec<u8>], root: &str, id: &str) -> Option<Named> {
        let refs: Vec<&[u8]> = line.iter().map(Vec::as_slice).collect();
        named(&refs, Path::new(root), id)
    }

    /// Each kind of process is known by the arguments that name its container, and only by
    /// whole arguments: container `a`'s delete does not take `ab`'s (or another root's)
    /// processes.
    #[test]
    fn processes_are_known_by_whole_arguments() {
        let root = "/run/r,x";
        let sandbox = args(&[
            "rootcell",
            "--root",
            root,
            "--log-format",
            "text",
            "sandbox",
            "--id",
            "ab",
        ]);
        let relay = args(&[
            "rootcell",
            "--root",
            root,
            "exec-relay",
            "--id",
            "ab",
            "--exec-id",
            "e1",
        ]);
        let qemu = args(&[
            "/usr/bin/qemu-system-x86_64",
            "-M",
            "microvm",
            "-name",
            &crate::hypervisor::qemu::name_arg(Path::new("/run/r,x/ab")),
        ]);
        assert!(
            qemu[4].ends_with(b"r,,x/ab"),
            "commas doubled, as QEMU's options need"
        );
        let builtin = args(&["rootcell", "builtin-vmm", "--for", "/run/r,x/ab"]);
        let room = String::from_utf8(crate::pool::holder::fill_room(b"/run/r,x/ab")).unwrap();
        let holder = args(&[
            "rootcell",
            "--root",
            root,
            "pool",
            "vm",
            "--name",
            "vm-1",
            "--run-dir",
            "/p/vm-1",
            "--claimed-for",
            &room,
        ]);
        for line in [&sandbox, &relay] {
            assert_eq!(what(line, root, "ab"), Some(Named::Helper));
        }
        assert_eq!(what(&qemu, root, "ab"), Some(Named::Vmm));
        assert_eq!(what(&builtin, root, "ab"), Some(Named::Vmm));
        assert_eq!(
            what(&holder, root, "ab"),
            Some(Named::Holder(PathBuf::from("/p/vm-1")))
        );
        for line in [&sandbox, &relay, &qemu, &builtin, &holder] {
            assert_eq!(what(line, root, "a"), None, "{line:?}");
            assert_eq!(what(line, root, "abc"), None, "{line:?}");
            assert_eq!(what(line, "/run/r", "ab"), None, "{line:?}");
        }
        // Cgroups are the container's by their last component's name.
        for (last, yes) in [
            ("ab", true),
            ("docker-ab.scope", true),
            ("libpod-ab", true),
            ("b", false),
            ("xab", false),
            ("abc", false),
            ("session-1.scope", false),
        ] {
            assert_eq!(names_id(last, "ab"), yes, "{last}");
        }
        // An unclaimed holder names nobody; a delete names nobody either.
        let blank = " ".repeat(crate::pool::holder::CLAIM_ROOM);
        let unclaimed = args(&["rootcell", "pool", "vm", "--claimed-for", &blank]);
        assert_eq!(what(&unclaimed, root, "ab"), None);
        let delete = args(&["rootcell", "--root", root, "delete", "--force", "ab"]);
        assert_eq!(what(&delete, root, "ab"), None);
    }
}
