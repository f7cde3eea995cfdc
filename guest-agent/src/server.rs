//! Connection handling: the control connection loop and the stream connection acceptor.

use crate::agent::{After, Agent, Reply, Session};
use crate::alog;
use crate::listener::Listener;
use crate::registry::reap_forever;
use crate::threads::vital;
use rootcell_protocol::{ErrorCode, FrameError, HostMessage, Request, Response, StreamHello};
use std::io;
use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

/// How long a new stream connection may take to send its `StreamHello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts the reaper and the stream acceptor, then serves control connections forever.
pub fn serve(agent: Arc<Agent>, control: Listener, streams: Listener) -> io::Result<()> {
    // Both threads' work is done by no other thread: a panic in one ends the agent (threads.rs).
    let (reg, sink, a) = (agent.registry.clone(), agent.sink.clone(), agent.clone());
    vital(
        "reaper",
        "no process exit would be reported again",
        move || {
            reap_forever(
                reg,
                sink,
                move |name, status| a.process_exited(name, status),
                |name, status| alog!("process {name} exited with status {status}"),
            )
        },
    )?;
    let a = agent.clone();
    vital(
        "streams",
        "no later process would get its stdio streams",
        move || accept_streams(a, streams),
    )?;
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
///
/// A panic outside a request's handler (those are answered, see `handle_guarded`) ends this
/// connection only, as its end: the session is ended all the same. Unwound past that, the
/// container would stay, and the event sink would hold the connection open, so the host would
/// wait on it for ever instead of seeing it close.
pub fn control_connection(agent: &Agent, conn: UnixStream) -> io::Result<()> {
    alog!("control connection opened");
    let mut session = Session::new(conn.try_clone()?);
    // AssertUnwindSafe: after a panic only end_session uses the session and the agent, and
    // every lock it takes is poison-tolerant.
    let result = catch_unwind(AssertUnwindSafe(|| {
        serve_session(agent, &mut session, conn)
    }))
    .unwrap_or_else(|payload| {
        Err(io::Error::other(format!(
            "panicked: {}",
            crate::threads::panic_message(payload.as_ref())
        )))
    });
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
        let reply = handle_guarded(agent, session, msg.id, msg.request);
        #[cfg(test)]
        agent.panic_if_asked("serve_session");
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
                    code: ErrorCode::Other,
                    message: format!("releasing the process failed: {e}"),
                },
                _ => response,
            })?;
        if let After::Shutdown = reply.after {
            shutdown(agent);
        }
    }
}

/// Handles `request` (with id `id`); a panic in its handler is answered with an
/// [`ErrorCode::Internal`] error carrying the panic's message. Without this the panic ended the
/// connection's thread unanswered: the host's request ran into its timeout (the sink keeps the
/// connection open as the container's event writer) and the container was never removed, or,
/// before a container, the host saw the connection close as if the guest had gone. The panic
/// hook (main.rs) logs the panic with its location.
fn handle_guarded(agent: &Agent, session: &mut Session, id: u64, request: Request) -> Reply {
    let name = request.name();
    // AssertUnwindSafe: what a panicking handler leaves behind stays usable. Every lock of the
    // agent is taken poison-tolerantly; the spawn gate and a prepared process are released by
    // their destructors (the process exits, and is reaped as any other); streams announced for
    // a process that was not created are dropped on the way out (agent.rs); and a connection is
    // bound to its container only once the create has succeeded.
    catch_unwind(AssertUnwindSafe(|| agent.handle(session, request))).unwrap_or_else(|payload| {
        let message = crate::threads::panic_message(payload.as_ref());
        alog!("request {id} ({name}) panicked; answering: {message}");
        Response::Error {
            code: ErrorCode::Internal,
            message: format!("panic in {name}: {message}"),
        }
        .into()
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::Config;
    use crate::container::MountEnv;
    use oci_spec::runtime::Spec;
    use rootcell_protocol::{AgentMessage, StdioSpec, Stream, PROTOCOL_VERSION};

    /// Sends `request` as request `id` on `host` and returns the agent's answer.
    fn ask(host: &mut UnixStream, id: u64, request: Request) -> Response {
        rootcell_protocol::send(host, &HostMessage { id, request }).unwrap();
        match rootcell_protocol::recv(host) {
            Ok(Some(AgentMessage::Response { id: got, result })) if got == id => result,
            other => panic!("no answer to request {id}: {other:?}"),
        }
    }

    fn create(spec: Spec) -> Request {
        Request::Create {
            container_id: "c1".into(),
            spec: Box::new(spec),
            stdio: StdioSpec {
                stdout: true,
                ..StdioSpec::default()
            },
            privileged: false,
        }
    }

    /// Over the control connection's real loop: a Create whose handler panics (while it holds
    /// the containers' lock) is answered with the panic's message, the stream the host attached
    /// for it is dropped, and the connection serves the next requests, one of which takes the
    /// poisoned lock.
    #[test]
    fn a_handlers_panic_is_answered_and_the_connection_goes_on() {
        let agent = Arc::new(Agent::new(Config {
            stream_wait: Duration::from_millis(10),
            cgroup_root: None,
            mount_env: MountEnv::default(),
            reboot_on_shutdown: false,
        }));
        agent.ask_to_panic_in("create");
        // The host attaches a process's streams before the request that creates it.
        let devnull = std::fs::File::open("/dev/null").unwrap();
        agent
            .streams
            .insert("c1/init", Stream::Stdout, devnull.into());
        let (mut host, conn) = UnixStream::pair().unwrap();
        // Bounded: without the guard the answer may never come.
        host.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let a = agent.clone();
        let served = std::thread::spawn(move || control_connection(&a, conn));

        match ask(&mut host, 1, create(Spec::default())) {
            Response::Error {
                code: ErrorCode::Internal,
                message,
            } => assert_eq!(message, "panic in create: asked to panic in create"),
            other => panic!("expected an internal error, got {other:?}"),
        }
        assert!(agent.containers_poisoned());
        assert!(
            agent
                .streams
                .take("c1/init", Stream::Stdout, Duration::ZERO)
                .is_none(),
            "the stream of the init that was not created is still waiting"
        );
        let mut no_root = Spec::default();
        no_root.set_root(None);
        match ask(&mut host, 2, create(no_root)) {
            Response::Error {
                code: ErrorCode::Other,
                message,
            } => assert_eq!(message, "spec has no root"),
            other => panic!("expected the create to be refused, got {other:?}"),
        }
        let hello = Request::Hello {
            version: PROTOCOL_VERSION,
        };
        assert!(matches!(
            ask(&mut host, 3, hello),
            Response::Hello { version, .. } if version == PROTOCOL_VERSION
        ));
        drop(host);
        served.join().unwrap().unwrap();
    }

    /// A panic in the connection's own loop (outside a handler) ends that connection, not the
    /// thread unwound past the session's end: the connection is closed and the session ended.
    #[test]
    fn a_panic_outside_a_handler_ends_only_its_connection() {
        let agent = Arc::new(Agent::new(Config {
            stream_wait: Duration::from_millis(10),
            cgroup_root: None,
            mount_env: MountEnv::default(),
            reboot_on_shutdown: false,
        }));
        agent.ask_to_panic_in("serve_session");
        let (mut host, conn) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let a = agent.clone();
        let served = std::thread::spawn(move || control_connection(&a, conn));
        let hello = Request::Hello {
            version: PROTOCOL_VERSION,
        };
        rootcell_protocol::send(
            &mut host,
            &HostMessage {
                id: 1,
                request: hello.clone(),
            },
        )
        .unwrap();
        assert!(matches!(
            rootcell_protocol::recv::<_, AgentMessage>(&mut host),
            Ok(None)
        ));
        let ended = served
            .join()
            .expect("the panic went past the session's end");
        assert!(
            ended
                .as_ref()
                .is_err_and(|e| e.to_string() == "panicked: asked to panic in serve_session"),
            "{ended:?}"
        );
        // The agent serves the next connection.
        let (mut host, conn) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let a = agent.clone();
        let served = std::thread::spawn(move || control_connection(&a, conn));
        assert!(matches!(ask(&mut host, 2, hello), Response::Hello { .. }));
        drop(host);
        served.join().unwrap().unwrap();
    }

    /// The reaper reports every exit, and no other thread does: when it panics (here in the
    /// step before an exit's report), the agent ends rather than living on with no exit
    /// reported again. serve()'s real reaper, in a process of its own, which it ends.
    #[test]
    fn a_reaper_panic_ends_the_agent() {
        use crate::registry::{key, Entry};
        use std::os::unix::process::ExitStatusExt;
        const CHILD: &str = "RC_AGENT_REAPER_PANIC_TEST";
        if std::env::var_os(CHILD).is_some() {
            let dir = tempfile::tempdir().unwrap();
            let agent = Arc::new(Agent::new(Config {
                stream_wait: Duration::from_millis(10),
                cgroup_root: None,
                mount_env: MountEnv::default(),
                reboot_on_shutdown: false,
            }));
            agent.ask_to_panic_in("process_exited");
            let control = Listener::unix(&dir.path().join("control.sock")).unwrap();
            let streams = Listener::unix(&dir.path().join("stream.sock")).unwrap();
            let a = agent.clone();
            std::thread::spawn(move || serve(a, control, streams));
            // A named process, registered as the agent registers one: under the spawn gate.
            let gate = agent.registry.spawning();
            // Reaped by the agent's reaper, not by std's wait.
            #[allow(clippy::zombie_processes)]
            let child = std::process::Command::new("true").spawn().unwrap();
            agent.registry.note_fork();
            let pid = child.id() as i32;
            agent
                .registry
                .add(&key("c1", "init"), Entry { pid, pty: None });
            drop(gate);
            std::thread::sleep(Duration::from_secs(10));
            println!("still alive 10 s after the reaper's panic");
            return;
        }
        let name = "server::tests::a_reaper_panic_ends_the_agent";
        let o = rootcell_test_support::rerun_test_alone(name, CHILD, "1");
        let out = String::from_utf8_lossy(&o.stdout);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(
                "fatal: thread reaper panicked (asked to panic in process_exited); without it no \
                 process exit would be reported again; ending the agent"
            ),
            "{out}\n{err}"
        );
        assert_eq!(o.status.signal(), Some(libc::SIGABRT), "{out}\n{err}");
    }
}
