//! Exec'd processes: started through the agent, and their exit awaited, never forever.

use super::*;
use crate::control::ControlResponse;
use crate::state::{Action, Status};
use rootcell_protocol::{Request, Response, StdioSpec};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Starts an exec'd process, answers `Ok`, then waits for its exit and answers `Exited`.
pub(super) fn serve_exec(
    shared: &Shared,
    conn: &mut UnixStream,
    exec_id: String,
    process: Box<oci_spec::runtime::Process>,
    stdio: StdioSpec,
) {
    let _s = tracing::info_span!("exec", exec_id = %exec_id).entered();
    let (tx, rx) = mpsc::channel();
    let mut guest_pid = None;
    let status = shared
        .state
        .lock()
        .map(|s| s.status)
        .unwrap_or(Status::Stopped);
    let first = if let Err(error) = status.check(Action::Exec) {
        ControlResponse::Refused { error }
    } else if shared
        .exec_waiters
        .lock()
        .map(|mut m| m.insert(exec_id.clone(), tx).is_some())
        .unwrap_or(true)
    {
        ControlResponse::Error {
            message: format!("exec id {exec_id} is already in use"),
        }
    } else {
        if let Err(e) = crate::clock::sync(&shared.agent) {
            tracing::warn!("cannot set the guest's clock before the exec: {e:#}");
        }
        let req = Request::Exec {
            exec_id: exec_id.clone(),
            process,
            stdio,
        };
        match shared.agent.request(req, crate::timeouts::START) {
            Ok(Response::Created { pid }) => {
                guest_pid = Some(pid);
                ControlResponse::Ok
            }
            Ok(Response::Ok) => ControlResponse::Ok,
            Ok(Response::Error { code, message }) => match process_status(code) {
                Some(status) => ControlResponse::ProcessFailed {
                    message: format!("cannot start the exec process: {message}"),
                    status,
                },
                None => ControlResponse::Error {
                    message: format!("exec failed ({code:?}): {message}"),
                },
            },
            Ok(other) => ControlResponse::Error {
                message: format!("unexpected answer to Exec: {other:?}"),
            },
            Err(e) => {
                // A slow agent may still start the process after we gave up: it must not run
                // on without anyone waiting for it (the agent takes requests in order).
                let kill = Request::Signal {
                    process: exec_id.clone(),
                    signal: libc::SIGKILL,
                    all: false,
                };
                let _ = shared.agent.request(kill, crate::timeouts::QUICK);
                ControlResponse::Error {
                    message: e.to_string(),
                }
            }
        }
    };
    let ok = first == ControlResponse::Ok;
    if !ok {
        if let Ok(mut m) = shared.exec_waiters.lock() {
            m.remove(&exec_id);
        }
    }
    let _ = rootcell_protocol::send(conn, &first);
    // Teardown must not wait for a long-running exec.
    shared.in_flight.fetch_sub(1, Ordering::SeqCst);
    if ok {
        let status = wait_exec_exit(shared, conn, &exec_id, guest_pid, &rx);
        let _ = rootcell_protocol::send(conn, &ControlResponse::Exited { status });
    }
}

/// How often a waiting exec checks on its relay and, without news, on its guest process.
pub(super) const EXEC_POLL: Duration = crate::timeouts::EXEC_POLL;
/// How often the agent is asked whether a still-unfinished exec process exists.
pub(super) const EXEC_LIVENESS_PERIOD: Duration = crate::timeouts::EXEC_LIVENESS_PERIOD;
/// Consecutive checks without the process (and without its exit) that count as a lost exit.
pub(super) const EXEC_LIVENESS_STRIKES: u32 = 3;

/// Waits for the exit of exec `exec_id` (guest pid `pid`) and returns its status. Never forever:
/// the wait ends with 137 when the VM or agent is gone (the waiter is dropped at teardown) and
/// when the guest no longer lists the process yet reported no exit for it. When the relay (the
/// process's host pid, which Docker signals with kill(2)) dies first, e.g. by SIGKILL, which it
/// cannot forward, the guest process is killed too.
pub(super) fn wait_exec_exit(
    shared: &Shared,
    conn: &UnixStream,
    exec_id: &str,
    pid: Option<i32>,
    rx: &mpsc::Receiver<i32>,
) -> i32 {
    let mut relay_gone = false;
    let mut strikes = 0;
    let mut next_check = Instant::now() + EXEC_LIVENESS_PERIOD;
    loop {
        match rx.recv_timeout(EXEC_POLL) {
            Ok(status) => return status,
            Err(mpsc::RecvTimeoutError::Disconnected) => return 137,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if !relay_gone && peer_closed(conn) {
            relay_gone = true;
            tracing::warn!("the exec relay is gone; killing its process in the guest");
            let req = Request::Signal {
                process: exec_id.to_string(),
                signal: libc::SIGKILL,
                all: false,
            };
            if let Err(e) = shared.agent.request(req, crate::timeouts::QUICK) {
                tracing::warn!("cannot kill exec {exec_id} in the guest: {e}");
            }
        }
        let Some(pid) = pid else { continue };
        if Instant::now() < next_check {
            continue;
        }
        next_check = Instant::now() + EXEC_LIVENESS_PERIOD;
        match shared
            .agent
            .request(Request::Processes, crate::timeouts::PROCESSES)
        {
            Ok(Response::Processes { pids }) if !pids.contains(&pid) => {
                strikes += 1;
                if strikes >= EXEC_LIVENESS_STRIKES {
                    tracing::error!(
                        guest_pid = pid,
                        "exec {exec_id}: the guest has no such process any more and reported no exit for it; ending the wait with 137"
                    );
                    if let Ok(mut m) = shared.exec_waiters.lock() {
                        m.remove(exec_id);
                    }
                    // An exit that raced the removal above still wins.
                    return rx.try_recv().unwrap_or(137);
                }
            }
            // Still there, or the agent is slow: keep waiting (a gone agent drops the waiter).
            _ => strikes = 0,
        }
    }
}

/// Whether the other end of a connection that sends nothing more has closed it.
pub(super) fn peer_closed(conn: &UnixStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut byte = 0u8;
    // SAFETY: a non-blocking peek of at most one byte into a local buffer.
    let n = unsafe {
        libc::recv(
            conn.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0
        || (n < 0
            && !matches!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::EAGAIN) | Some(libc::EINTR)
            ))
}
