//! A guest process's stdio on the host: stream connections to the agent (attached before the
//! process exists, so no byte is lost) relayed to host fds or to a host pty.

use crate::{agent, console};
use anyhow::{bail, Context, Result};
use rootcell_protocol::{Stream, StreamHello};
use std::fs::File;
use std::io::{Read, Write};
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;

/// The attached stdio streams.
pub enum Streams {
    /// Three pipes-like streams relayed to host fds 0/1/2.
    Pipes {
        /// Host fd 0 -> guest stdin.
        stdin: UnixStream,
        /// Guest stdout -> host fd 1.
        stdout: UnixStream,
        /// Guest stderr -> host fd 2.
        stderr: UnixStream,
    },
    /// One pty stream relayed to a host terminal.
    Pty {
        /// The guest pty master's bytes.
        stream: UnixStream,
        /// Host side input (pty slave or our stdin).
        host_in: OwnedFd,
        /// Host side output.
        host_out: OwnedFd,
    },
}

/// Attached streams plus what terminal handling needs.
pub struct Attached {
    /// The streams.
    pub streams: Streams,
    /// Host terminal fd whose size is relayed on SIGWINCH.
    pub tty_fd: Option<i32>,
    /// Terminal settings to restore at exit (our own stdin in raw mode).
    pub saved: Option<console::RawTerminal>,
}

/// How a process's terminal reaches the host user.
#[derive(Debug, Clone, Default)]
pub struct TerminalMode {
    /// The process has a terminal.
    pub terminal: bool,
    /// Hand a new host pty's master to this console socket.
    pub console_socket: Option<std::path::PathBuf>,
    /// Otherwise relay the pty over our own stdin/stdout.
    pub tty_stdio: bool,
}

/// Connects the streams `process` of `container` needs through the hybrid vsock socket `uds`.
pub fn attach(uds: &Path, container: &str, process: &str, mode: &TerminalMode) -> Result<Attached> {
    let open = |stream: Stream| {
        agent::open_stream(
            uds,
            &StreamHello {
                container: container.into(),
                process: process.into(),
                stream,
            },
        )
    };
    if !mode.terminal {
        let stdin = open(Stream::Stdin)?;
        let stdout = open(Stream::Stdout)?;
        let stderr = open(Stream::Stderr)?;
        return Ok(Attached {
            streams: Streams::Pipes {
                stdin,
                stdout,
                stderr,
            },
            tty_fd: None,
            saved: None,
        });
    }
    let stream = open(Stream::Pty)?;
    if let Some(sock) = &mode.console_socket {
        let pty = console::open_pty().context("cannot open a pty")?;
        console::send_master(sock, &pty)
            .with_context(|| format!("cannot send the pty to console socket {}", sock.display()))?;
        // We are a session leader (our launcher ran setsid): the slave becomes our controlling
        // terminal, so the caller's resizes on the master reach us as SIGWINCH.
        if let Err(e) = console::make_controlling(&pty.slave) {
            tracing::warn!(
                "cannot make the pty our controlling terminal, resizes will not propagate: {e}"
            );
        }
        let fd = pty.slave.as_raw_fd();
        let out = pty.slave.try_clone()?;
        drop(pty.master);
        return Ok(Attached {
            streams: Streams::Pty {
                stream,
                host_in: pty.slave,
                host_out: out,
            },
            tty_fd: Some(fd),
            saved: None,
        });
    }
    if !mode.tty_stdio {
        bail!("terminal: true needs --console-socket when the process is detached");
    }
    // SAFETY: dups of our own stdio fds.
    let host_in = unsafe { OwnedFd::from_raw_fd(libc::dup(0)) };
    // SAFETY: as above, for stdout.
    let host_out = unsafe { OwnedFd::from_raw_fd(libc::dup(1)) };
    let saved = console::set_raw(&host_in);
    let fd = host_in.as_raw_fd();
    Ok(Attached {
        streams: Streams::Pty {
            stream,
            host_in,
            host_out,
        },
        tty_fd: Some(fd),
        saved,
    })
}

/// Copies until EOF or error; a pty slave reports the master's hangup as EIO, treated as EOF.
pub fn pump(mut from: impl Read, mut to: impl Write) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
                let _ = to.flush();
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

fn host_fd(fd: i32) -> ManuallyDrop<File> {
    // SAFETY: stdio fds stay open for the life of the process; ManuallyDrop never closes them.
    ManuallyDrop::new(unsafe { File::from_raw_fd(fd) })
}

/// Starts the relay threads; returns how many output relays will report on `done` at EOF.
pub fn spawn_relays(streams: Streams, done: mpsc::Sender<()>) -> usize {
    let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        let _ = std::thread::Builder::new().name(name.into()).spawn(f);
    };
    match streams {
        Streams::Pipes {
            stdin,
            stdout,
            stderr,
        } => {
            spawn(
                "stdin",
                Box::new(move || {
                    pump(&*host_fd(0), &stdin);
                    let _ = stdin.shutdown(std::net::Shutdown::Write);
                }),
            );
            for (name, s, fd) in [("stdout", stdout, 1), ("stderr", stderr, 2)] {
                let d = done.clone();
                spawn(
                    name,
                    Box::new(move || {
                        pump(&s, &*host_fd(fd));
                        let _ = d.send(());
                    }),
                );
            }
            2
        }
        Streams::Pty {
            stream,
            host_in,
            host_out,
        } => {
            let up = match stream.try_clone() {
                Ok(s) => s,
                Err(_) => return 0,
            };
            spawn(
                "pty-in",
                Box::new(move || {
                    pump(File::from(host_in), &up);
                    let _ = up.shutdown(std::net::Shutdown::Write);
                }),
            );
            spawn(
                "pty-out",
                Box::new(move || {
                    pump(&stream, File::from(host_out));
                    let _ = done.send(());
                }),
            );
            1
        }
    }
}

/// Waits (bounded) for `outputs` EOF reports on `done`.
pub fn wait_outputs(
    done: &mpsc::Receiver<()>,
    outputs: usize,
    timeout: std::time::Duration,
) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    (0..outputs).all(|_| {
        done.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .is_ok()
    })
}
