//! `start`, `state`, `kill`, `delete` and `run`.

use super::create::{create, CreateOptions};
use super::Global;
use crate::control::{self, ControlRequest, ControlResponse};
use crate::error::RuntimeError;
use crate::state::{process_alive, ContainerState, Status};
use crate::{hooks, paths, share};
use anyhow::{bail, Result};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `start ID`.
pub fn start(g: &Global, id: &str) -> Result<()> {
    let _span = tracing::info_span!("start", id).entered();
    let st = g.load(id)?.refreshed();
    match st.status {
        Status::Created => {}
        Status::Running => return Err(RuntimeError::StartRunning.into()),
        Status::Stopped => return Err(RuntimeError::StartStopped.into()),
        Status::Creating => bail!("cannot start container {id}: it is still being created"),
        Status::Paused => bail!("cannot start a paused container"),
    }
    match control::call(
        &st.control_socket(),
        &ControlRequest::Start,
        Duration::from_secs(40),
    ) {
        Ok(ControlResponse::Ok) | Ok(ControlResponse::Exited { .. }) => {}
        Ok(ControlResponse::Error { message }) => bail!("{message}"),
        Ok(ControlResponse::Refused { error }) => return Err(error.into()),
        Ok(ControlResponse::ProcessFailed { message, status }) => {
            return Err(RuntimeError::Process {
                msg: message,
                status,
            }
            .into())
        }
        // A program that exits at once can take the sandbox down before it answers.
        Err(e) => match g.load(id).map(|s| s.refreshed()) {
            Ok(s) if s.status == Status::Stopped && s.exit_status.is_some() => {}
            _ => return Err(e.into()),
        },
    }
    let mut now = g.load(id)?.refreshed();
    if now.status == Status::Created {
        now.status = Status::Running;
    }
    // Warned and skipped, as the runtime spec says for poststart.
    hooks::run_all("poststart", &st.poststart, &now.oci_json().to_string());
    Ok(())
}

/// `state ID`: the OCI state JSON.
pub fn state(g: &Global, id: &str) -> Result<String> {
    let st = g.load(id)?.refreshed();
    Ok(serde_json::to_string_pretty(&st.oci_json())?)
}

/// `kill [--all] ID SIGNAL`.
pub fn kill(g: &Global, id: &str, signal: &str, all: bool) -> Result<()> {
    let sig = crate::signal::parse(signal)?;
    let st = g.load(id)?.refreshed();
    if !matches!(
        st.status,
        Status::Created | Status::Running | Status::Paused
    ) {
        return Err(RuntimeError::NotRunning(id.to_string()).into());
    }
    if st.status == Status::Paused {
        // A frozen VM cannot take a message; only SIGKILL can be honoured (by killing it).
        if sig != libc::SIGKILL {
            bail!("container {id} is paused; resume it before sending signal {sig}");
        }
        kill_sandbox(&st);
        return Ok(());
    }
    let req = ControlRequest::Signal {
        signal: sig,
        all,
        process: None,
    };
    match control::call(&st.control_socket(), &req, Duration::from_secs(8)) {
        Ok(ControlResponse::Ok) => Ok(()),
        Ok(ControlResponse::Refused {
            error: crate::state::StateError::NotRunning,
        }) => Err(RuntimeError::NotRunning(id.to_string()).into()),
        Ok(ControlResponse::Refused { error }) if sig != libc::SIGKILL => bail!("{error}"),
        Ok(ControlResponse::Error { message }) if sig != libc::SIGKILL => bail!("{message}"),
        other => {
            // SIGKILL must work even when the guest does not answer: kill the sandbox itself
            // (its VM dies with it), which ends the container with status 137.
            if sig == libc::SIGKILL && process_alive(st.pid, st.pid_start) {
                tracing::warn!(
                    ?other,
                    "the sandbox did not deliver SIGKILL; killing the sandbox"
                );
                kill_sandbox(&st);
                return Ok(());
            }
            match other {
                Ok(ControlResponse::Error { message }) => bail!("{message}"),
                Err(_) if !process_alive(st.pid, st.pid_start) => {
                    Err(RuntimeError::NotRunning(id.to_string()).into())
                }
                Err(e) => Err(e.into()),
                Ok(_) => Ok(()),
            }
        }
    }
}

/// SIGKILLs the sandbox's process group and the sandbox (pid-reuse checked).
fn kill_sandbox(st: &ContainerState) {
    if st.pid > 0 && process_alive(st.pid, st.pid_start) {
        // SAFETY: plain kill(2); the start-time check above guards against pid reuse.
        unsafe {
            libc::kill(-st.pid, libc::SIGKILL);
            libc::kill(st.pid, libc::SIGKILL);
        }
    }
}

/// SIGKILLs the process group led by `pid` and `pid` (pid-reuse checked), and waits for it.
fn kill_group(pid: i32, start: u64) {
    if pid > 0 && process_alive(pid, start) {
        // SAFETY: plain kill(2); the start-time check above guards against pid reuse.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
            libc::kill(pid, libc::SIGKILL);
        }
        wait_gone(pid, start, Duration::from_secs(10));
    }
}

/// The live host processes of container `id` under `root` by their command line: rootcell
/// starts its sandbox and exec relays (each leading its own process group, with the VMM in
/// the sandbox's) as `rootcell --root ROOT ... sandbox|exec-relay --id ID ...`.
fn helper_processes(root: &std::path::Path, id: &str) -> Vec<(i32, u64)> {
    let root = root.display().to_string();
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
        let pair = |k: &str, v: &str| {
            args.windows(2)
                .any(|w| w[0] == k.as_bytes() && w[1] == v.as_bytes())
        };
        let helper = args
            .iter()
            .any(|a| *a == b"sandbox".as_slice() || *a == b"exec-relay".as_slice());
        if helper && pair("--root", &root) && pair("--id", id) {
            if let Some((start, _)) = crate::state::proc_stat(pid) {
                found.push((pid, start));
            }
        }
    }
    found
}

/// Waits until `pid` is gone (or a zombie), up to `timeout`.
fn wait_gone(pid: i32, start: u64, timeout: Duration) -> bool {
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
const DELETE_LOCK_WAIT: Duration = Duration::from_secs(60);

/// Takes an exclusive lock on a container's state dir (flock on the directory itself), so
/// concurrent deletes — containerd runs `delete --force` a few milliseconds after its shim's
/// own `delete` — do not run the same steps (poststop hooks, removals) at once. Waits up to
/// [`DELETE_LOCK_WAIT`] for another holder, then goes on unlocked (`Ok(None)`, with a
/// warning). `NotFound` if the directory is gone, also when it went while we waited.
fn lock_state_dir(
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
    if st.status == Status::Stopped && !wait_gone(st.pid, st.pid_start, Duration::from_secs(10)) {
        tracing::warn!(
            pid = st.pid,
            "sandbox still alive 10 s after the container stopped; killing it"
        );
    }
    kill_sandbox(&st);
    if !wait_gone(st.pid, st.pid_start, Duration::from_secs(10)) {
        bail!("sandbox process {} of container {id} did not die after SIGKILL; its state is kept in {}", st.pid, state_dir.display());
    }
    if st.vm_pid > 0 && process_alive(st.vm_pid, st.vm_pid_start) {
        // SAFETY: plain kill(2), pid-reuse checked above.
        unsafe { libc::kill(st.vm_pid, libc::SIGKILL) };
        wait_gone(st.vm_pid, st.vm_pid_start, Duration::from_secs(5));
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

/// `pause ID` / `resume ID`: freeze or thaw the container's VM.
pub fn pause(g: &Global, id: &str, pause: bool) -> Result<()> {
    let st = g.load(id)?.refreshed();
    let req = if pause {
        ControlRequest::Pause
    } else {
        ControlRequest::Resume
    };
    if st.status == Status::Stopped {
        return Err(RuntimeError::NotRunning(id.to_string()).into());
    }
    match control::call(&st.control_socket(), &req, Duration::from_secs(5))? {
        ControlResponse::Error { message } => bail!("{message}"),
        _ => Ok(()),
    }
}

/// `ps ID`: the host processes that make up the container (its sandbox and VMM); the guest's
/// own processes live in another kernel.
pub fn ps(g: &Global, id: &str, format: &str) -> Result<String> {
    let st = g.load(id)?.refreshed();
    let pids: Vec<i32> = [(st.pid, st.pid_start), (st.vm_pid, st.vm_pid_start)]
        .into_iter()
        .filter(|(p, s)| *p > 0 && process_alive(*p, *s))
        .map(|(p, _)| p)
        .collect();
    match format {
        "json" => Ok(serde_json::to_string(&pids)? + "\n"),
        "table" => {
            if pids.is_empty() {
                return Ok(String::new());
            }
            let list: Vec<String> = pids.iter().map(|p| p.to_string()).collect();
            let out = std::process::Command::new("ps")
                .args(["-f", "-p", &list.join(",")])
                .output()?;
            Ok(String::from_utf8_lossy(&out.stdout).to_string())
        }
        other => bail!("invalid --format {other:?}: use table or json"),
    }
}

/// `run`: create + start, then (attached) wait, delete and return the container's status.
pub fn run(g: &Global, id: &str, opts: &CreateOptions, detach: bool, keep: bool) -> Result<i32> {
    let target = Arc::new(AtomicI32::new(0));
    if !detach {
        relay_signals_to(target.clone());
    }
    let mut launched = create(g, id, opts)?;
    target.store(launched.child.id() as i32, Ordering::SeqCst);
    if let Err(e) = start(g, id) {
        let _ = delete(g, id, true);
        return Err(e);
    }
    if detach {
        return Ok(0);
    }
    let status = {
        let _s = tracing::info_span!("wait", id).entered();
        match launched.child.wait() {
            Ok(s) => s.code().unwrap_or_else(|| {
                128 + std::os::unix::process::ExitStatusExt::signal(&s).unwrap_or(9)
            }),
            Err(_) => 255,
        }
    };
    if !keep {
        if let Err(e) = delete(g, id, false) {
            tracing::warn!("cleanup after run: {e:#}");
        }
    }
    Ok(status)
}

/// Blocks the forwardable signals here (threads spawned later inherit the mask; children get a
/// clean mask from std) and forwards them to the sandbox or relay once its pid is known; signals
/// that arrive before that are held and delivered then (the caller may signal us as soon as the
/// process's first output appears, before we have recorded the pid).
pub fn relay_signals_to(target: Arc<AtomicI32>) {
    let mut set = nix::sys::signal::SigSet::empty();
    for s in crate::signal::FORWARDED.iter().chain(&[libc::SIGWINCH]) {
        if let Ok(sig) = nix::sys::signal::Signal::try_from(*s) {
            set.add(sig);
        }
    }
    let _ = set.thread_block();
    let _ = std::thread::Builder::new()
        .name("run-signals".into())
        .spawn(move || {
            let mut held: Vec<i32> = Vec::new();
            let timeout = libc::timespec {
                tv_sec: 0,
                tv_nsec: 50_000_000,
            };
            loop {
                // SAFETY: sigtimedwait on a valid set, no siginfo wanted, a valid timeout.
                let sig =
                    unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &timeout) };
                let pid = target.load(Ordering::SeqCst);
                if sig > 0 && !held.contains(&sig) {
                    held.push(sig);
                }
                if pid > 0 {
                    for sig in held.drain(..) {
                        // SAFETY: plain kill(2) of our own child.
                        unsafe { libc::kill(pid, sig) };
                    }
                }
            }
        });
}
