//! Terminal processes: a guest pty whose slave the process owns and whose master the agent
//! relays to and from the host's `Pty` stream.

use nix::pty::{openpty, Winsize};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
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

/// Opens a pty from the devpts instance whose multiplexer is `ptmx` (the container's own
/// `/dev/pts/ptmx`), so the process's terminal is `/dev/pts/N` of that instance, as under runc.
/// Returns the master, the slave (both close-on-exec) and N.
pub fn open_pty_at(ptmx: &std::path::Path) -> io::Result<(OwnedFd, OwnedFd, u32)> {
    use std::os::fd::FromRawFd;
    let master: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(ptmx)?
        .into();
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int from a valid pointer; fails harmlessly on a non-pty.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut n: libc::c_uint = 0;
    // SAFETY: TIOCGPTN writes an unsigned int to a valid pointer.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut n) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // The peer is opened through the master, so it is this instance's slave whatever the path.
    // SAFETY: TIOCGPTPEER takes open flags and returns a new fd or -1.
    let fd = unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    let slave = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok((master, slave, n))
}

/// Sends `fd` over the unix socket `sock` (SCM_RIGHTS), with one byte of data.
pub fn send_fd(
    sock: std::os::fd::BorrowedFd<'_>,
    fd: std::os::fd::BorrowedFd<'_>,
) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let fds = [fd.as_raw_fd()];
    let iov = [io::IoSlice::new(b"m")];
    sendmsg::<()>(
        sock.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )?;
    Ok(())
}

/// Receives an fd sent by [`send_fd`], without blocking: `None` if nothing was sent.
pub fn try_recv_fd(sock: &OwnedFd) -> io::Result<Option<OwnedFd>> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::FromRawFd;
    let mut byte = [0u8; 1];
    let mut iov = [io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = match recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    ) {
        Ok(m) => m,
        Err(nix::errno::Errno::EAGAIN) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(&fd) = fds.first() {
                // SAFETY: the kernel installed this fd for us just now; we are its only owner.
                return Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
    }
    Ok(None)
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
    let to_host = EndOnPanic(stream.try_clone()?);
    let from_host = EndOnPanic(stream);
    let out_master = master.clone();
    std::thread::Builder::new()
        .name("pty-out".into())
        .spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            loop {
                match read_fd(&out_master, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if (&to_host.0).write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = to_host.0.shutdown(std::net::Shutdown::Write);
        })?;
    std::thread::Builder::new()
        .name("pty-in".into())
        .spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            loop {
                match (&from_host.0).read(&mut buf) {
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

/// One direction's end of a relayed stream. If its thread panics, the stream is shut down
/// both ways: the other direction's thread holds a clone of the socket, so merely dropping this
/// one would leave the host waiting on a connection nobody serves; shut down, the host sees
/// EOF and the other thread's read or write fails, which ends it.
struct EndOnPanic(UnixStream);

impl Drop for EndOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = self.0.shutdown(std::net::Shutdown::Both);
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A relay thread that panics ends its connection, although the other direction's thread
    /// still holds a clone of the socket: the host reads EOF instead of waiting for ever.
    #[test]
    fn a_relay_threads_panic_ends_the_connection() {
        let (mut host, guest) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let other_direction = guest.try_clone().unwrap();
        let panicked = std::thread::spawn(move || {
            let _out = EndOnPanic(guest);
            panic!("relay bug");
        })
        .join();
        assert!(panicked.is_err());
        let mut buf = [0u8; 8];
        assert_eq!(
            host.read(&mut buf)
                .expect("the host still waits on the connection"),
            0
        );
        // The other direction's thread learns it too: its read ends.
        assert_eq!((&other_direction).read(&mut buf).unwrap(), 0);
    }
}
