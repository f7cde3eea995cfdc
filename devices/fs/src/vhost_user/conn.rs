//! Finding the connection the vhost-user daemon accepted, so `stop` can shut it down.
//!
//! `vhost-user-backend` accepts and owns the connection socket and offers no way to close it
//! early; its request thread blocks until the VMM hangs up. An accepted unix socket reports the
//! listener's bound path as its own name, so the accepted socket is found among this process's
//! fds by that name, duplicated, and later `shutdown(2)` on the duplicate wakes the daemon.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The bound name of a unix socket, or `None` for other fds.
fn unix_name(fd: RawFd) -> Option<Vec<u8>> {
    // SAFETY: sockaddr_un is plain data; getsockname writes at most `len` bytes into it.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` and `len` are valid for writes and `len` is the size of `addr`.
    let rc =
        unsafe { libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_un).cast(), &mut len) };
    if rc != 0 || addr.sun_family != libc::AF_UNIX as libc::sa_family_t {
        return None;
    }
    let path_len = (len as usize).saturating_sub(std::mem::size_of::<libc::sa_family_t>());
    let bytes: Vec<u8> = addr.sun_path[..path_len.min(addr.sun_path.len())]
        .iter()
        .map(|&c| c as u8)
        .take_while(|&c| c != 0)
        .collect();
    Some(bytes)
}

/// Whether `fd` is a listening socket.
fn is_listening(fd: RawFd) -> bool {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes one c_int into `value`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    rc == 0 && value != 0
}

/// Duplicates of the connected sockets accepted on `listener`.
pub fn accepted_connections(listener: &impl AsRawFd) -> Vec<OwnedFd> {
    let Some(name) = unix_name(listener.as_raw_fd()).filter(|n| !n.is_empty()) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<RawFd>().ok())
        else {
            continue;
        };
        if fd == listener.as_raw_fd() {
            continue;
        }
        // Duplicate first and check the duplicate: the original may be closed and its number
        // reused by another thread while we look.
        // SAFETY: F_DUPFD_CLOEXEC on any fd number is harmless; a result >= 0 is a new fd we own.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            continue;
        }
        // SAFETY: `dup` was just created and is owned by nobody else.
        let dup = unsafe { OwnedFd::from_raw_fd(dup) };
        if unix_name(dup.as_raw_fd()).as_deref() == Some(&name[..])
            && !is_listening(dup.as_raw_fd())
        {
            found.push(dup);
        }
    }
    found
}

/// Shuts down both directions of a socket so a thread blocked reading it wakes up.
pub fn shutdown(fd: &OwnedFd) {
    // SAFETY: shutdown on an owned fd has no memory effects.
    unsafe {
        libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixListener, UnixStream};

    #[test]
    fn finds_the_accepted_socket_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        assert!(accepted_connections(&listener).is_empty());
        let mut client = UnixStream::connect(&path).unwrap();
        let (server, _) = listener.accept().unwrap();
        let found = accepted_connections(&listener);
        assert_eq!(found.len(), 1);
        shutdown(&found[0]);
        // The shutdown reaches the peer: its read sees EOF.
        let mut buf = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut client, &mut buf).unwrap(), 0);
        drop(server);
    }
}
