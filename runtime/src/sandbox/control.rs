//! The control socket: one request per connection from the CLI (start, kill, pause, update...).

use super::exec::serve_exec;
use super::*;
use crate::control::{ControlRequest, ControlResponse};
use crate::state::{Action, StateError, Status};
use rootcell_protocol::{Request, Response, INIT_PROCESS};
use std::os::unix::net::UnixListener;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Accepts CLI connections on the control socket, one request each.
pub(super) fn serve_control(listener: UnixListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
        let sh = shared.clone();
        let _ = std::thread::Builder::new()
            .name("control-conn".into())
            .spawn(move || {
                let _ = conn.set_read_timeout(Some(crate::timeouts::CONTROL_READ));
                match rootcell_protocol::recv::<_, ControlRequest>(&mut conn) {
                    Ok(Some(ControlRequest::Exec {
                        exec_id,
                        process,
                        stdio,
                    })) => {
                        serve_exec(&sh, &mut conn, exec_id, process, stdio);
                    }
                    Ok(Some(req)) => {
                        let resp = handle_control(&sh, req);
                        let _ = rootcell_protocol::send(&mut conn, &resp);
                        sh.in_flight.fetch_sub(1, Ordering::SeqCst);
                    }
                    _ => {
                        sh.in_flight.fetch_sub(1, Ordering::SeqCst);
                    }
                }
            });
    }
}

/// Sends `req` to the agent; its `Ok` or error message is the answer.
pub(super) fn forward(shared: &Shared, req: Request) -> ControlResponse {
    let what = format!("{req:?}");
    match shared.agent.request(req, crate::timeouts::QUICK) {
        Ok(Response::Ok) => ControlResponse::Ok,
        Ok(Response::Error { message, .. }) => ControlResponse::Error { message },
        Ok(other) => ControlResponse::Error {
            message: format!("unexpected answer to {what}: {other:?}"),
        },
        Err(e) => ControlResponse::Error {
            message: e.to_string(),
        },
    }
}

pub(super) fn handle_control(shared: &Shared, req: ControlRequest) -> ControlResponse {
    let err = |message: String| ControlResponse::Error { message };
    let status = shared
        .state
        .lock()
        .map(|s| s.status)
        .unwrap_or(Status::Stopped);
    let action = match &req {
        ControlRequest::Ping
        | ControlRequest::Resize { .. }
        | ControlRequest::Exec { .. }
        | ControlRequest::Stats => None,
        ControlRequest::Start => Some(Action::Start),
        ControlRequest::Pause => Some(Action::Pause),
        ControlRequest::Resume => Some(Action::Resume),
        ControlRequest::Update { .. } => Some(Action::Update),
        ControlRequest::Signal { .. } => Some(Action::Signal),
    };
    if let Some(Err(error)) = action.map(|a| status.check(a)) {
        return ControlResponse::Refused { error };
    }
    // Moves the recorded status on once the action is done, unless something else (the exit)
    // moved it meanwhile.
    let advance = |a: Action| {
        shared.update(|s| {
            if s.status == status {
                s.status = status.after(a);
            }
        })
    };
    match req {
        ControlRequest::Ping => ControlResponse::Ok,
        ControlRequest::Pause | ControlRequest::Resume => {
            let pause = req == ControlRequest::Pause;
            let paused = match shared.role {
                Role::Owner => shared.vm.set_paused(pause),
                // In another container's VM only this container's cgroup is frozen.
                Role::Member { .. } => match forward(shared, Request::Freeze { frozen: pause }) {
                    ControlResponse::Ok => Ok(()),
                    other => Err(std::io::Error::other(format!("{other:?}"))),
                },
            };
            match paused {
                Ok(()) => {
                    advance(if pause { Action::Pause } else { Action::Resume });
                    // The guest's clock stood still while the VM was frozen.
                    if !pause {
                        if let Err(e) = crate::clock::sync(&shared.agent) {
                            tracing::warn!("cannot set the guest's clock after the resume: {e:#}");
                        }
                    }
                    ControlResponse::Ok
                }
                Err(e) => err(format!(
                    "cannot {} the VM: {e}",
                    if pause { "pause" } else { "resume" }
                )),
            }
        }
        ControlRequest::Start => {
            let _s = tracing::info_span!("container_start").entered();
            if let Err(e) = crate::clock::sync(&shared.agent) {
                tracing::warn!("cannot set the guest's clock before the start: {e:#}");
            }
            match shared.agent.request(Request::Start, crate::timeouts::START) {
                Ok(Response::Ok) | Ok(Response::Created { .. }) => {
                    advance(Action::Start);
                    ControlResponse::Ok
                }
                Ok(Response::Error { message, .. }) => err(message),
                Ok(other) => err(format!("unexpected answer to Start: {other:?}")),
                Err(e) => err(e.to_string()),
            }
        }
        ControlRequest::Exec { .. } => err("exec is served on its own connection".into()),
        // A paused VM's agent cannot answer; a frozen member's can (only its cgroup is frozen).
        ControlRequest::Stats if status == Status::Paused && matches!(shared.role, Role::Owner) => {
            err("the container is paused: its VM cannot report usage".into())
        }
        ControlRequest::Stats => match shared.agent.request(Request::Stats, crate::timeouts::QUICK)
        {
            Ok(Response::Stats { stats }) => ControlResponse::Stats { stats },
            Ok(Response::Error { message, .. }) => err(message),
            Ok(other) => err(format!("unexpected answer to Stats: {other:?}")),
            Err(e) => err(e.to_string()),
        },
        ControlRequest::Resize {
            process,
            rows,
            cols,
        } => forward(
            shared,
            Request::Resize {
                process,
                rows,
                cols,
            },
        ),
        ControlRequest::Update { memory, pids } => {
            forward(shared, Request::UpdateLimits { memory, pids })
        }
        ControlRequest::Signal {
            signal,
            all,
            process,
        } => {
            let req = Request::Signal {
                process: process.unwrap_or_else(|| INIT_PROCESS.into()),
                signal,
                all,
            };
            let not_running = || ControlResponse::Refused {
                error: StateError::NotRunning,
            };
            match shared.agent.request(req, crate::timeouts::QUICK) {
                Ok(Response::Ok) => ControlResponse::Ok,
                Ok(Response::Error {
                    code: rootcell_protocol::ErrorCode::NoSuchProcess,
                    ..
                }) => not_running(),
                Ok(Response::Error { message, .. }) => err(message),
                Ok(other) => err(format!("unexpected answer to Signal: {other:?}")),
                // A dead guest's container runs no more (runc: "container not running"); a
                // stuck one asked to stop is stopped as `run`'s forwarded signal stops it.
                Err(e) => match super::signals::undelivered(shared, signal, &e) {
                    super::signals::Undelivered::GuestGone => not_running(),
                    super::signals::Undelivered::VmEnded => ControlResponse::Ok,
                    super::signals::Undelivered::Failed => err(e.to_string()),
                },
            }
        }
    }
}
