//! Connection handling: the control connection loop and the stream connection acceptor.

use crate::agent::{After, Agent, Session};
use crate::alog;
use crate::listener::Listener;
use crate::registry::reap_forever;
use rootcell_protocol::{FrameError, HostMessage, Response, StreamHello};
use std::io;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

/// How long a new stream connection may take to send its `StreamHello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts the reaper and the stream acceptor, then serves control connections forever.
pub fn serve(agent: Arc<Agent>, control: Listener, streams: Listener) -> io::Result<()> {
    let (reg, sink, a) = (agent.registry.clone(), agent.sink.clone(), agent.clone());
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(move || {
            reap_forever(
                reg,
                sink,
                move |name, status| a.process_exited(name, status),
                |name, status| alog!("process {name} exited with status {status}"),
            )
        })?;
    let a = agent.clone();
    std::thread::Builder::new()
        .name("streams".into())
        .spawn(move || accept_streams(a, streams))?;
    loop {
        let conn = control.accept()?;
        let a = agent.clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                if let Err(e) = control_connection(&a, conn) {
                    alog!("control connection ended: {e}");
                }
            })?;
    }
}

/// Serves one control connection until EOF; once it creates a container, that container's
/// events go to it, and the container is removed when it closes.
pub fn control_connection(agent: &Agent, conn: UnixStream) -> io::Result<()> {
    alog!("control connection opened");
    let mut session = Session::new(conn.try_clone()?);
    let result = serve_session(agent, &mut session, conn);
    agent.end_session(&mut session);
    result
}

fn serve_session(agent: &Agent, session: &mut Session, conn: UnixStream) -> io::Result<()> {
    let mut reader = conn.try_clone()?;
    let mut writer = conn;
    loop {
        let msg: HostMessage = match rootcell_protocol::recv(&mut reader) {
            Ok(Some(m)) => m,
            Ok(None) => {
                alog!("control connection closed by the host");
                return Ok(());
            }
            Err(FrameError::Json(e)) => {
                // The frame was consumed whole; a message we cannot parse has no usable id.
                alog!("ignoring malformed control message: {e}");
                continue;
            }
            Err(e) => return Err(io::Error::other(e)),
        };
        let reply = agent.handle(session, msg.request);
        let (response, release) = (reply.response, reply.release);
        agent
            .sink
            .respond(&mut writer, msg.id, || match release.map(|p| p.release()) {
                // The process died before it could start (killed inside the container or by
                // the OOM killer): it is registered, so the reaper reports its exit.
                Some(Err(e)) if e.raw_os_error() == Some(libc::EPIPE) => {
                    alog!(
                        "request {}: the process was gone before its release",
                        msg.id
                    );
                    response
                }
                Some(Err(e)) => Response::Error {
                    code: rootcell_protocol::ErrorCode::Other,
                    message: format!("releasing the process failed: {e}"),
                },
                _ => response,
            })?;
        if let After::Shutdown = reply.after {
            shutdown(agent);
        }
    }
}

/// Powers off (reboot + QEMU -no-reboot; the request synced before it was answered); outside a
/// guest, just exits.
fn shutdown(agent: &Agent) -> ! {
    alog!("shutting down");
    if agent.config().reboot_on_shutdown {
        // SAFETY: reboot(2); the guest is booted with reboot=t and QEMU with -no-reboot.
        unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    }
    std::process::exit(0)
}

fn accept_streams(agent: Arc<Agent>, listener: Listener) {
    loop {
        match listener.accept() {
            Ok(conn) => {
                let a = agent.clone();
                let spawned = std::thread::Builder::new()
                    .name("stream-hello".into())
                    .spawn(move || {
                        if let Err(e) = register_stream(&a, conn) {
                            alog!("dropping stream connection: {e}");
                        }
                    });
                if let Err(e) = spawned {
                    alog!("cannot start a stream thread: {e}");
                }
            }
            Err(e) => {
                alog!("stream accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Reads the `StreamHello` (exactly one frame, unbuffered, so no payload byte is consumed)
/// and parks the socket for its process.
fn register_stream(agent: &Agent, mut conn: UnixStream) -> io::Result<()> {
    conn.set_read_timeout(Some(HELLO_TIMEOUT))?;
    let hello: StreamHello = rootcell_protocol::recv(&mut conn)
        .map_err(io::Error::other)?
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "closed before StreamHello"))?;
    conn.set_read_timeout(None)?;
    let name = crate::registry::key(&hello.container, &hello.process);
    agent.streams.insert(&name, hello.stream, conn.into());
    Ok(())
}
