//! `run`: create, start and wait; the caller's signals go to the container.

use super::delete::delete;
use super::start::start;
use crate::commands::create::{create, CreateOptions};
use crate::commands::Global;
use anyhow::Result;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

/// `run`: create + start, then (attached) wait, delete and return the container's status.
pub fn run(g: &Global, id: &str, opts: &CreateOptions, detach: bool, keep: bool) -> Result<i32> {
    let target = Arc::new(AtomicI32::new(0));
    if !detach {
        relay_signals_to(target.clone(), true);
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
/// process's first output appears, before we have recorded the pid). With `abort_before`, the
/// [`crate::signal::ABORT`] signals are left pending until then, for `create`'s
/// [`crate::commands::create::AbortWatch`], which ends the boot on them.
pub fn relay_signals_to(target: Arc<AtomicI32>, abort_before: bool) {
    let mut set = nix::sys::signal::SigSet::empty();
    for s in crate::signal::FORWARDED.iter().chain(&[libc::SIGWINCH]) {
        if let Ok(sig) = nix::sys::signal::Signal::try_from(*s) {
            set.add(sig);
        }
    }
    let _ = set.thread_block();
    let mut early = set;
    if abort_before {
        for s in crate::signal::ABORT {
            if let Ok(sig) = nix::sys::signal::Signal::try_from(*s) {
                early.remove(sig);
            }
        }
    }
    let _ = std::thread::Builder::new()
        .name("run-signals".into())
        .spawn(move || {
            let mut held: Vec<i32> = Vec::new();
            let timeout = libc::timespec {
                tv_sec: 0,
                tv_nsec: 50_000_000,
            };
            loop {
                let waiting = if target.load(Ordering::SeqCst) > 0 {
                    &set
                } else {
                    &early
                };
                // SAFETY: sigtimedwait on a valid set, no siginfo wanted, a valid timeout.
                let sig =
                    unsafe { libc::sigtimedwait(waiting.as_ref(), std::ptr::null_mut(), &timeout) };
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
