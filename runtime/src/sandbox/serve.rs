//! The running sandbox: its threads, the event loop until the container exits, and teardown.

use super::*;
use crate::agent::AgentNotice;
use crate::paths;
use crate::state::Status;
use crate::stdio::{self};
use rootcell_protocol::{Event, Request, INIT_PROCESS};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

impl Sandbox {
    /// Serves until the container exits; returns its status.
    pub(super) fn serve(self) -> i32 {
        let Sandbox {
            shared,
            vm,
            events,
            events_tx,
            streams,
            control,
            run_dir,
            saved_termios,
            network,
            // Relays the guest's DNS queries until the sandbox ends.
            dns_relay: _dns_relay,
        } = self;
        let _exit_span = tracing::info_span!("running").entered();
        let (out_done_tx, out_done) = mpsc::channel::<()>();
        let outputs = stdio::spawn_relays(streams, out_done_tx);

        let sh = shared.clone();
        let _ = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || serve_control(control, sh));
        let sh = shared.clone();
        let _ = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || forward_signals(sh));
        let sh = shared.clone();
        let _ = std::thread::Builder::new()
            .name("clock".into())
            .spawn(move || keep_clock(sh));
        let v = vm.clone();
        let tx = events_tx.clone();
        let _ = std::thread::Builder::new()
            .name("vm-wait".into())
            .spawn(move || {
                let st = v.wait_stopped();
                let _ = tx.send(SbEvent::VmStopped(st));
            });
        drop(events_tx);

        let status = loop {
            match events.recv() {
                Ok(SbEvent::Agent(AgentNotice::Event(Event::Exit { process, status })))
                    if process == INIT_PROCESS =>
                {
                    tracing::info!(status, "container exited");
                    break status;
                }
                Ok(SbEvent::Agent(AgentNotice::Event(Event::Exit { process, status }))) => {
                    tracing::info!(process, status, "exec process exited");
                    if let Some(tx) = shared
                        .exec_waiters
                        .lock()
                        .ok()
                        .and_then(|mut m| m.remove(&process))
                    {
                        let _ = tx.send(status);
                    }
                }
                Ok(SbEvent::Agent(AgentNotice::Event(Event::Oom))) => {
                    tracing::warn!("the OOM killer ran in the container");
                    // The agent sends this before the exit it caused, so Docker sees the OOM
                    // kill first, as with runc.
                    let cg = shared
                        .state
                        .lock()
                        .ok()
                        .and_then(|s| s.cgroups_path.clone());
                    if let Some(cg) = cg {
                        match crate::oom::relay(&cg) {
                            Ok(()) => {
                                tracing::info!(cgroup = cg, "OOM kill relayed to the host cgroup")
                            }
                            Err(e) => tracing::warn!(
                                "cannot relay the OOM kill to the host cgroup: {e:#}"
                            ),
                        }
                    }
                }
                Ok(SbEvent::Agent(AgentNotice::Disconnected)) => {
                    let st = vm.try_stopped();
                    tracing::error!(vm_status = ?st, "lost the agent connection; the guest is gone or its agent died");
                    break 137;
                }
                Ok(SbEvent::VmStopped(st)) => {
                    tracing::error!("the hypervisor exited unexpectedly with status {st}");
                    break 137;
                }
                Err(_) => break 137,
            }
        };
        let _teardown = tracing::info_span!("teardown").entered();
        // Exec'd processes die with the VM; their relays learn it when the waiters go away.
        if let Ok(mut m) = shared.exec_waiters.lock() {
            m.clear();
        }
        // Output still in flight after the exit event: drain it (bounded) before reporting
        // "stopped", so whoever sees that status also sees all of the output.
        if !stdio::wait_outputs(&out_done, outputs, crate::timeouts::OUTPUT_DRAIN) {
            tracing::warn!("container output did not reach EOF within 3 s after exit");
        }
        shared.update(|s| {
            s.status = Status::Stopped;
            s.exit_status = Some(status);
        });
        match &shared.role {
            Role::Owner => {
                // The agent answers once the guest is synced: then nothing of the container's
                // is left in the VM, and waiting for the guest to power off would only add its
                // reboot (tens of ms under TCG) to every container's end.
                let synced = matches!(
                    shared
                        .agent
                        .request(Request::Shutdown, crate::timeouts::SHUTDOWN),
                    Ok(rootcell_protocol::Response::Ok)
                );
                tracing::debug!(synced, "the guest answered Shutdown");
                if synced {
                    vm.end();
                }
            }
            Role::Member { mounts } => {
                // The VM and its other containers go on; only ours is removed.
                let _ = shared
                    .agent
                    .request(Request::Remove, crate::timeouts::SHUTDOWN);
                crate::share::detach_member(mounts);
            }
        }
        vm.finish(crate::timeouts::VM_FINISH);
        tracing::debug!("the VM is gone");
        drop(network);
        let deadline = Instant::now() + crate::timeouts::IN_FLIGHT;
        while shared.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(saved_termios);
        for name in [
            paths::CONTROL_SOCKET,
            paths::VSOCK_UDS,
            paths::VSOCK_VHOST_SOCKET,
            paths::FS_VHOST_SOCKET,
            &paths::dns_relay_socket(),
            &paths::dns_tcp_relay_socket(),
        ] {
            let _ = std::fs::remove_file(run_dir.join(name));
        }
        status
    }
}

/// Sets the guest's clock every [`crate::clock::SYNC_INTERVAL`] while the container may run
/// (not while the VM is paused: resume sets it itself).
pub(super) fn keep_clock(shared: Arc<Shared>) {
    loop {
        std::thread::sleep(crate::clock::SYNC_INTERVAL);
        let status = shared
            .state
            .lock()
            .map(|s| s.status)
            .unwrap_or(Status::Stopped);
        match status {
            Status::Created | Status::Running => {
                if let Err(e) = crate::clock::sync(&shared.agent) {
                    tracing::debug!("cannot set the guest's clock: {e:#}");
                }
            }
            Status::Stopped => return,
            Status::Creating | Status::Paused => {}
        }
    }
}
