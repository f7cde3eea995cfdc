//! `containerd-shim-rootcell-v2`: containerd's shim v2 (task API v2, containerd 1.6 and 1.7)
//! for rootcell.
//!
//! It drives the installed `rootcell` binary exactly as containerd's runc shim drives runc:
//! `rootcell create --bundle B --pid-file P ID` with the container's stdio, `start`, `kill`,
//! `pause`, `resume`, `exec --detach --process F --pid-file P`, `delete`. The processes whose
//! pids land in the pid files (rootcell's sandbox process, which runs the VM and exits with the
//! container's status, and its exec relays, which exit with the exec'd process's status) are
//! re-parented to this shim, a child subreaper, which reaps them and reports their exits to
//! containerd. Running the binary rather than linking the runtime library is deliberate: the
//! runtime starts its long-lived sandbox by re-executing itself (`/proc/self/exe sandbox ...`),
//! which from inside the shim would re-execute the shim; the runc command-line contract is the
//! one rootcell already keeps for Docker and Podman, so both front ends run the same code.

mod console;
mod guard;
mod io;
mod oom;
#[cfg(test)]
mod reaper_test;
mod runtime;
mod service;

use containerd_shim as shim;
use shim::{publisher::RemotePublisher, Config, DeleteResponse, ExitSignal, Flags};
use std::path::PathBuf;
use std::sync::Arc;

/// The annotation containerd's CRI plugin puts on every container of a pod (and on the pod's
/// sandbox container): the pod's sandbox id. Containers that carry it share one shim.
const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// The shim's process-level half (start, cleanup, serve).
struct Shim {
    exit: Arc<ExitSignal>,
    namespace: String,
    id: String,
    rt: runtime::Rootcell,
}

impl shim::Shim for Shim {
    // Every request is answered, even one whose handler panics (see guard.rs).
    type T = guard::CatchPanics<service::Service>;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        let bundle = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        Shim {
            exit: Arc::new(ExitSignal::default()),
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            rt: runtime::Rootcell::new(&bundle, &args.namespace),
        }
    }

    fn start_shim(&mut self, opts: shim::StartOpts) -> Result<String, shim::Error> {
        // One shim (and, through the runtime's namespace joining, one VM) per pod: the
        // containers of a pod name its sandbox, so they all reach the shim started for it.
        let grouping = std::fs::read("config.json")
            .ok()
            .and_then(|d| serde_json::from_slice::<serde_json::Value>(&d).ok())
            .and_then(|v| v["annotations"][SANDBOX_ID].as_str().map(String::from))
            .unwrap_or_else(|| opts.id.clone());
        let (_pid, address) = shim::spawn(opts, &grouping, Vec::new())?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> Result<DeleteResponse, shim::Error> {
        // containerd's cleanup after a shim died: whatever is left of the container goes.
        let bundle = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        if let Err(e) = self.rt.run(&["delete", "--force", &self.id]) {
            log::warn!("cleanup of {}: {e}", self.id);
        }
        io::unmount_rootfs(&bundle.join("rootfs"));
        log::info!("cleaned up {} in namespace {}", self.id, self.namespace);
        let mut r = DeleteResponse::new();
        r.exit_status = 128 + libc::SIGKILL as u32;
        r.exited_at = shim::util::timestamp().ok().into();
        Ok(r)
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        guard::CatchPanics(service::Service::new(
            self.rt.clone(),
            publisher,
            self.namespace.clone(),
            self.exit.clone(),
        ))
    }
}

fn main() {
    // A panic in a request handler is answered as an error (guard::CatchPanics), but the reply
    // carries only its message; one in the exit thread or an OOM watch ends the shim
    // (guard::end_shim), one in another thread (a stdio copy) only that thread. The serving shim's stderr is /dev/null, so the
    // default hook's message is lost: put it, with its location, in the shim's log, which
    // containerd copies into its own.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // One line: containerd's log is line by line.
        log::error!("shim panicked: {}", info.to_string().replace('\n', " "));
        default_hook(info);
    }));
    // The runtime id containerd knows this shim by (`--runtime io.containerd.rootcell.v2`).
    shim::run::<Shim>("io.containerd.rootcell.v2", None);
}
