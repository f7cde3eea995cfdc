//! Host side of the agent connection: hybrid-vsock connects and the request/response client on
//! the control port.

use rootcell_protocol::{
    AgentMessage, ErrorCode, Event, HostMessage, Request, Response, StreamHello,
};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Socket-level failure.
    #[error("agent connection: {0}")]
    Io(#[from] io::Error),
    /// The hybrid vsock handshake was refused or garbled.
    #[error("vsock handshake for port {port} failed: {msg}")]
    Handshake {
        /// Guest port.
        port: u32,
        /// What we got.
        msg: String,
    },
    /// Framing or JSON failure.
    #[error("agent protocol: {0}")]
    Frame(#[from] rootcell_protocol::FrameError),
    /// The agent did not answer in time.
    #[error("agent did not answer {what} within {secs} s")]
    Timeout {
        /// The request.
        what: String,
        /// The bound.
        secs: u64,
    },
    /// The connection closed.
    #[error("agent connection closed")]
    Closed,
    /// The agent failed handling the request (its handler panicked) and said so; it goes on
    /// serving. The message is the agent's (the panic's).
    #[error("guest agent: internal error: {0}")]
    Internal(String),
}

/// Opens a byte stream to guest `port` through the hybrid vsock socket `uds`
/// (`CONNECT <port>\n` -> `OK <n>\n`), bounding the handshake by `timeout`.
pub fn connect_port(uds: &Path, port: u32, timeout: Duration) -> Result<UnixStream, AgentError> {
    let mut s = UnixStream::connect(uds)?;
    s.set_read_timeout(Some(timeout.max(Duration::from_millis(10))))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Read byte by byte: anything after the newline already belongs to the guest stream.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 64 {
        match s.read(&mut b) {
            Ok(0) => break,
            Ok(_) if b[0] == b'\n' => {
                let text = String::from_utf8_lossy(&line).to_string();
                if !text.starts_with("OK ") {
                    return Err(AgentError::Handshake { port, msg: text });
                }
                s.set_read_timeout(None)?;
                return Ok(s);
            }
            Ok(_) => line.push(b[0]),
            Err(e) => {
                return Err(AgentError::Handshake {
                    port,
                    msg: e.to_string(),
                })
            }
        }
    }
    Err(AgentError::Handshake {
        port,
        msg: format!(
            "connection closed after {:?}",
            String::from_utf8_lossy(&line)
        ),
    })
}

/// Opens a stdio stream for `process` and announces which one it is.
pub fn open_stream(uds: &Path, hello: &StreamHello) -> Result<UnixStream, AgentError> {
    let mut s = connect_port(uds, rootcell_protocol::STREAM_PORT, Duration::from_secs(10))?;
    rootcell_protocol::send(&mut s, hello)?;
    Ok(s)
}

/// What the reader thread reports besides responses.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentNotice {
    /// An unsolicited agent event.
    Event(Event),
    /// The control connection ended (guest gone or agent died).
    Disconnected,
}

type Pending = Arc<Mutex<HashMap<u64, mpsc::Sender<Response>>>>;

/// Request/response client on the control connection; events go to a callback.
pub struct AgentClient {
    writer: Mutex<UnixStream>,
    pending: Pending,
    next_id: AtomicU64,
}

impl AgentClient {
    /// Wraps a connected control stream and starts the reader thread.
    pub fn start(
        stream: UnixStream,
        notify: impl Fn(AgentNotice) + Send + 'static,
    ) -> io::Result<Arc<Self>> {
        let mut reader = stream.try_clone()?;
        let pending: Pending = Arc::default();
        let p = pending.clone();
        std::thread::Builder::new()
            .name("agent-reader".into())
            .spawn(move || {
                loop {
                    match rootcell_protocol::recv::<_, AgentMessage>(&mut reader) {
                        Ok(Some(AgentMessage::Response { id, result })) => {
                            if let Some(tx) = p.lock().ok().and_then(|mut m| m.remove(&id)) {
                                let _ = tx.send(result);
                            }
                        }
                        Ok(Some(AgentMessage::Event { event })) => {
                            notify(AgentNotice::Event(event));
                        }
                        Ok(None) | Err(_) => break,
                    }
                }
                // Dropping the senders wakes every waiter with "closed".
                if let Ok(mut m) = p.lock() {
                    m.clear();
                }
                notify(AgentNotice::Disconnected);
            })?;
        Ok(Arc::new(AgentClient {
            writer: Mutex::new(stream),
            pending,
            next_id: AtomicU64::new(1),
        }))
    }

    /// Hangs up: the agent sees the connection close, and the reader thread ends.
    pub fn close(&self) {
        if let Ok(w) = self.writer.lock() {
            let _ = w.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Sends `request` and waits up to `timeout` for its response.
    pub fn request(&self, request: Request, timeout: Duration) -> Result<Response, AgentError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let what = request.name();
        let (tx, rx) = mpsc::channel();
        self.pending
            .lock()
            .map_err(|_| AgentError::Closed)?
            .insert(id, tx);
        {
            let mut w = self.writer.lock().map_err(|_| AgentError::Closed)?;
            if let Err(e) = rootcell_protocol::send(&mut *w, &HostMessage { id, request }) {
                self.pending
                    .lock()
                    .map_err(|_| AgentError::Closed)?
                    .remove(&id);
                return Err(e.into());
            }
        }
        match rx.recv_timeout(timeout) {
            // Not the request's failure but the agent's: every caller reports it as such.
            Ok(Response::Error {
                code: ErrorCode::Internal,
                message,
            }) => Err(AgentError::Internal(message)),
            Ok(r) => Ok(r),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Ok(mut m) = self.pending.lock() {
                    m.remove(&id);
                }
                Err(AgentError::Timeout {
                    what: what.to_string(),
                    secs: timeout.as_secs(),
                })
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(AgentError::Closed),
        }
    }
}

/// Retries `CONNECT` to the control port until the agent answers or `deadline` passes;
/// `alive` is polled between attempts so a dead hypervisor ends the wait early.
pub fn connect_control(
    uds: &Path,
    deadline: Instant,
    mut alive: impl FnMut() -> bool,
) -> Result<UnixStream, AgentError> {
    let mut last = None;
    while Instant::now() < deadline {
        if !alive() {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match connect_port(
            uds,
            rootcell_protocol::CONTROL_PORT,
            left.min(Duration::from_secs(5)),
        ) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(last.unwrap_or(AgentError::Closed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn hybrid_handshake_keeps_following_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let l = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut buf = [0u8; 13];
            c.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"CONNECT 1024\n");
            c.write_all(b"OK 99\nhello").unwrap();
        });
        let mut s = connect_port(&path, 1024, Duration::from_secs(2)).unwrap();
        let mut rest = String::new();
        s.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "hello");
        t.join().unwrap();
    }

    #[test]
    fn refused_handshake_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let l = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            // Read the request first: closing before it arrives would fail the write instead.
            let mut req = [0u8; 10];
            let _ = c.read_exact(&mut req);
            let _ = c.write_all(b"NO\n");
        });
        assert!(matches!(
            connect_port(&path, 1, Duration::from_secs(2)),
            Err(AgentError::Handshake { .. })
        ));
    }
    /// The agent's answer to a request whose handler panicked reaches the user as the agent's
    /// internal error with the panic's message, at once, and the connection goes on.
    #[test]
    fn an_internal_error_is_reported_as_the_agents() {
        let (host, mut agent) = UnixStream::pair().unwrap();
        let peer = std::thread::spawn(move || {
            let mut reader = agent.try_clone().unwrap();
            let mut answer = |result: Response| {
                let m: HostMessage = rootcell_protocol::recv(&mut reader).unwrap().unwrap();
                let reply = AgentMessage::Response { id: m.id, result };
                rootcell_protocol::send(&mut agent, &reply).unwrap();
            };
            answer(Response::Error {
                code: ErrorCode::Internal,
                message: "panic in stats: boom".into(),
            });
            answer(Response::Ok);
        });
        let client = AgentClient::start(host, |_| {}).unwrap();
        let e = client
            .request(Request::Stats, Duration::from_secs(20))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "guest agent: internal error: panic in stats: boom"
        );
        assert_eq!(
            client
                .request(Request::Stats, Duration::from_secs(20))
                .unwrap(),
            Response::Ok
        );
        peer.join().unwrap();
    }
}
