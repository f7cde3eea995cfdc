//! Listening sockets: AF_VSOCK in the guest, AF_UNIX for running the agent on a normal host.

use nix::sys::socket::{
    accept4, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr, VsockAddr,
};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// A new, unconnected `AF_VSOCK` stream socket.
pub fn vsock_stream() -> io::Result<OwnedFd> {
    Ok(socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

/// A listening stream socket.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
}

impl Listener {
    /// Listens on `AF_VSOCK` port `port` for any CID.
    pub fn vsock(port: u32) -> io::Result<Self> {
        let fd = vsock_stream()?;
        bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
        Self::listen(fd)
    }

    /// Listens on a unix socket path (replacing a stale socket file).
    pub fn unix(path: &Path) -> io::Result<Self> {
        let _ = std::fs::remove_file(path);
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
        Self::listen(fd)
    }

    fn listen(fd: OwnedFd) -> io::Result<Self> {
        listen(&fd, Backlog::new(64)?)?;
        Ok(Self { fd })
    }

    /// Accepts one connection (close-on-exec), retrying on EINTR.
    ///
    /// The result is a std `UnixStream` used purely as a connected stream socket: its
    /// read/write/shutdown/timeout calls are plain socket calls that work for AF_VSOCK too.
    pub fn accept(&self) -> io::Result<UnixStream> {
        loop {
            match accept4(self.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                // SAFETY: accept4 returned a new fd that we now own.
                Ok(fd) => return Ok(UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) })),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}
