//! Terminal processes: a guest pty whose slave the process owns and whose master the agent
//! relays to and from the host's `Pty` stream.

use nix::pty::{openpty, Winsize};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;

/// A fresh pty pair.
#[derive(Debug)]
pub struct Pty {
    /// Kept by the agent.
    pub master: OwnedFd,
    /// Given to the process.
    pub slave: OwnedFd,
    /// Path of the slave (for the container's /dev/console).
    pub slave_path: PathBuf,
}

/// Opens a pty pair (both ends close-on-exec in the agent).
pub fn open_pty() -> io::Result<Pty> {
    let p = openpty(None, None)?;
    for fd in [&p.master, &p.slave] {
        nix::fcntl::fcntl(
            fd.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )?;
    }
    let slave_path = nix::unistd::ttyname(&p.slave)?;
    Ok(Pty {
        master: p.master,
        slave: p.slave,
        slave_path,
    })
}

/// Sets the window size of a pty (through its master).
pub fn resize(master: &OwnedFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ with a valid winsize on an open fd.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Copies master output to the stream and stream input to the master, each on its own thread.
/// When the process side closes (read on the master fails with EIO), the stream's write half
/// is shut down so the host sees EOF.
pub fn relay(master: Arc<OwnedFd>, stream: UnixStream) -> io::Result<()> {
    let mut to_host = stream.try_clone()?;
    let mut from_host = stream;
    let out_master = master.clone();
    std::thread::Builder::new()
        .name("pty-out".into())
        .spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            loop {
                match read_fd(&out_master, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to_host.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = to_host.shutdown(std::net::Shutdown::Write);
        })?;
    std::thread::Builder::new()
        .name("pty-in".into())
        .spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            loop {
                match from_host.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if write_all_fd(&master, &buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
        })?;
    Ok(())
}

fn read_fd(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: reading into a valid buffer from an open fd.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn write_all_fd(fd: &OwnedFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: writing a valid buffer to an open fd.
        let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}
