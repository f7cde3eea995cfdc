//! Host ptys for `terminal: true`: the master goes to the caller's console socket (runc's
//! protocol: one message, the pty name as data, the master fd as SCM_RIGHTS), the sandbox keeps
//! the slave and relays it to the guest's pty stream.

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use nix::sys::termios::{self, SetArg, Termios};
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// A freshly opened pty pair.
pub struct Pty {
    /// Master side (handed to the console socket).
    pub master: OwnedFd,
    /// Slave side (kept by the sandbox).
    pub slave: OwnedFd,
    /// Path of the slave (`/dev/pts/N`).
    pub name: String,
}

/// Opens a pty pair with the slave in raw mode (the guest's pty does the line discipline).
pub fn open_pty() -> nix::Result<Pty> {
    let pair = nix::pty::openpty(None, None)?;
    let name = nix::unistd::ttyname(&pair.slave)
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let mut t = termios::tcgetattr(&pair.slave)?;
    termios::cfmakeraw(&mut t);
    termios::tcsetattr(&pair.slave, SetArg::TCSANOW, &t)?;
    Ok(Pty {
        master: pair.master,
        slave: pair.slave,
        name,
    })
}

/// Sends the master fd to the console socket at `socket`.
pub fn send_master(socket: &Path, pty: &Pty) -> std::io::Result<()> {
    let s = UnixStream::connect(socket)?;
    let fds = [pty.master.as_raw_fd()];
    let iov = [IoSlice::new(pty.name.as_bytes())];
    sendmsg::<()>(
        s.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )?;
    Ok(())
}

/// Makes `fd` the controlling terminal of the calling session leader, so resizes done on the
/// master arrive here as SIGWINCH.
pub fn make_controlling(fd: &impl AsFd) -> std::io::Result<()> {
    // SAFETY: plain ioctl on a valid fd.
    if unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), libc::TIOCSCTTY, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The window size of the terminal `fd`, if it is one and the size is set.
pub fn window_size(fd: i32) -> Option<(u16, u16)> {
    // SAFETY: winsize is plain data; TIOCGWINSZ fills it.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes a winsize into `ws`; a bad fd only makes it fail.
    if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } < 0 || ws.ws_row == 0 {
        return None;
    }
    Some((ws.ws_row, ws.ws_col))
}

/// A terminal put in raw mode; dropping it restores the old settings (also on error paths).
pub struct RawTerminal {
    fd: OwnedFd,
    saved: Termios,
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(&self.fd, SetArg::TCSANOW, &self.saved);
    }
}

/// Puts the terminal on `fd` in raw mode, if it is a terminal.
pub fn set_raw(fd: &impl AsFd) -> Option<RawTerminal> {
    let old = termios::tcgetattr(fd).ok()?;
    let mut raw = old.clone();
    termios::cfmakeraw(&mut raw);
    termios::tcsetattr(fd, SetArg::TCSANOW, &raw).ok()?;
    let fd = fd.as_fd().try_clone_to_owned().ok()?;
    Some(RawTerminal { fd, saved: old })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{recvmsg, ControlMessageOwned};
    use std::os::unix::net::UnixListener;

    #[test]
    fn master_travels_over_console_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.sock");
        let l = UnixListener::bind(&path).unwrap();
        let pty = open_pty().unwrap();
        send_master(&path, &pty).unwrap();
        let (c, _) = l.accept().unwrap();
        let mut buf = [0u8; 128];
        let mut cmsg = nix::cmsg_space!([i32; 1]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg =
            recvmsg::<()>(c.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::empty()).unwrap();
        let fds: Vec<i32> = msg
            .cmsgs()
            .unwrap()
            .filter_map(|m| {
                if let ControlMessageOwned::ScmRights(f) = m {
                    Some(f)
                } else {
                    None
                }
            })
            .flatten()
            .collect();
        assert_eq!(fds.len(), 1);
        let n = msg.bytes;
        assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), pty.name);
        assert!(pty.name.starts_with("/dev/pts/"));
        // SAFETY: closing the fd we received and own.
        unsafe { libc::close(fds[0]) };
    }
}
