//! For tests of code that starts processes in the serving shim, where containerd-shim's SIGCHLD
//! thread reaps every child with waitpid(-1) and hands exits to its monitor: whatever waits for
//! a child of its own there races that reaper.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Which test a re-executed test binary runs alone.
const ALONE: &str = "RC_SHIM_TEST_ALONE";

/// Whether this process runs only the test `name` (its full path): if not, runs it again in a
/// process of its own and asserts that it passed. A reaper takes every child of its process,
/// so it must not run beside other tests.
pub fn alone(name: &str) -> bool {
    if std::env::var_os(ALONE).is_some_and(|v| v == name) {
        return true;
    }
    let o = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(ALONE, name)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("1 passed"), "{out}\n{err}");
    false
}

/// Runs `body` while a thread reaps every child as the shim's reaper does, at its quickest, and
/// reports their exits to containerd-shim's monitor as it does (exit code, or 128 + signal).
pub fn with_reaper(body: impl FnOnce()) {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let stop = Arc::new(AtomicBool::new(false));
    let reaper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let code = match waitpid(nix::unistd::Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG))
                {
                    Ok(WaitStatus::Exited(pid, code)) => Some((pid, code)),
                    Ok(WaitStatus::Signaled(pid, sig, _)) => Some((pid, 128 + sig as i32)),
                    _ => None,
                };
                if let Some((pid, code)) = code {
                    let _ = containerd_shim::monitor::monitor_notify_by_pid(pid.as_raw(), code);
                }
                std::thread::yield_now();
            }
        })
    };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
    stop.store(true, Ordering::Relaxed);
    reaper.join().unwrap();
    if let Err(p) = outcome {
        std::panic::resume_unwind(p);
    }
}
