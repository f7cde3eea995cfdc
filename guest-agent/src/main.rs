//! `rootcell-agent`: `/init` of the guest. Outside a guest, `rootcell-agent --unix DIR`
//! serves the same protocol on DIR/control.sock and DIR/stream.sock (for tests).

use rootcell_agent::agent::{Agent, Config};
use rootcell_agent::listener::Listener;
use rootcell_agent::{alog, pid1, server, threads};
use rootcell_protocol::{CONTROL_PORT, STREAM_PORT};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How long Create/Exec wait for announced stream connections.
const STREAM_WAIT: Duration = Duration::from_secs(5);

fn main() {
    // A panic's message and location go where the agent's log goes (the guest's console; as
    // PID 1 stderr may be unset), on one line. A request whose handler panics is answered with
    // the message (server.rs); elsewhere the log line is all that is left of it.
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        alog!("thread {name} {}", info.to_string().replace('\n', " "));
    }));
    let is_init = std::process::id() == 1;
    // A panic on the main thread (the control acceptor) ends the agent like an error: as init,
    // returning from main would make the kernel panic.
    let result = std::panic::catch_unwind(|| {
        if is_init {
            run_as_init()
        } else {
            run_on_host()
        }
    })
    .unwrap_or_else(|payload| {
        Err(anyhow::anyhow!(
            "the main thread panicked: {}",
            threads::panic_message(payload.as_ref())
        ))
    });
    // PID 1 must never exit (the kernel would panic): say why and reboot, which ends the VM.
    alog!("fatal: {result:?}");
    if is_init {
        pid1::end_vm();
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    std::process::exit(1);
}

fn run_as_init() -> anyhow::Result<()> {
    let system = pid1::setup();
    let agent = Arc::new(Agent::new(Config {
        stream_wait: STREAM_WAIT,
        cgroup_root: system.cgroup_root,
        mount_env: system.mount_env,
        reboot_on_shutdown: true,
    }));
    let control = Listener::vsock(CONTROL_PORT)?;
    let streams = Listener::vsock(STREAM_PORT)?;
    alog!(
        "ready (vsock ports {CONTROL_PORT}/{STREAM_PORT}, kernel {})",
        kernel_release()
    );
    server::serve(agent, control, streams)?;
    Ok(())
}

fn run_on_host() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = match (args.next().as_deref(), args.next()) {
        (Some("--unix"), Some(dir)) => PathBuf::from(dir),
        _ => anyhow::bail!("usage: rootcell-agent --unix DIR (as PID 1 it needs no arguments)"),
    };
    // Processes are forked by short-lived helpers; their orphans must come back to us.
    nix::sys::prctl::set_child_subreaper(true)?;
    let system = pid1::detect_system();
    let agent = Arc::new(Agent::new(Config {
        stream_wait: STREAM_WAIT,
        cgroup_root: None,
        mount_env: system.mount_env,
        reboot_on_shutdown: false,
    }));
    let control = Listener::unix(&dir.join("control.sock"))?;
    let streams = Listener::unix(&dir.join("stream.sock"))?;
    alog!("ready (unix sockets in {})", dir.display());
    server::serve(agent, control, streams)?;
    Ok(())
}

fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}
