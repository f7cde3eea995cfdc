//! Terminals (`ctr run -t`, `ctr task exec -t`): rootcell hands the pty master over a console
//! socket, as runc does; the shim relays it to containerd's stdin/stdout FIFOs and resizes it.

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

/// A console socket waiting for rootcell's pty master.
pub struct ConsoleSocket {
    path: PathBuf,
    accept: Option<JoinHandle<std::io::Result<File>>>,
}

impl ConsoleSocket {
    /// Listens on a fresh socket in /tmp (bundle paths can be too long for a unix socket).
    pub fn new() -> std::io::Result<Self> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "rc-shim-{}-{}.sock",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path)?;
        let accept = std::thread::spawn(move || {
            let (c, _) = l.accept()?;
            receive_master(&c)
        });
        Ok(ConsoleSocket {
            path,
            accept: Some(accept),
        })
    }

    /// The socket's path, for `--console-socket`.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The master rootcell sent (after a successful create or exec).
    pub fn master(mut self) -> std::io::Result<File> {
        let h = self.accept.take().expect("accepted once");
        h.join()
            .map_err(|_| std::io::Error::other("console thread panicked"))?
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        if let Some(h) = self.accept.take() {
            // Nothing was sent (the command failed): wake the accepting thread and let it go.
            let _ = UnixStream::connect(&self.path);
            let _ = h.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn receive_master(c: &UnixStream) -> std::io::Result<File> {
    let mut buf = [0u8; 256];
    let mut cmsg = nix::cmsg_space!([i32; 1]);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        c.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    for m in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = m {
            if let Some(&fd) = fds.first() {
                for &extra in &fds[1..] {
                    // SAFETY: fds received in this message are ours; only the first is used.
                    unsafe { libc::close(extra) };
                }
                // SAFETY: a fresh fd received over SCM_RIGHTS, owned by nobody else.
                return Ok(unsafe { File::from_raw_fd(fd) });
            }
        }
    }
    Err(std::io::Error::other("no pty master on the console socket"))
}

/// Relays the master to containerd's FIFOs: stdin into it, its output to stdout.
pub fn relay(master: &File, stdin: &str, stdout: Option<File>) -> std::io::Result<()> {
    if !stdin.is_empty() {
        let mut to = master.try_clone()?;
        let path = stdin.to_string();
        std::thread::spawn(move || {
            // Blocks until containerd opens the write side.
            if let Ok(mut f) = File::open(&path) {
                let _ = std::io::copy(&mut f, &mut to);
            }
        });
    }
    if let Some(mut out) = stdout {
        let mut from = master.try_clone()?;
        // Ends with EIO when the last process holding the pty's other side is gone.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut out);
        });
    }
    Ok(())
}

/// Sets the terminal size.
pub fn resize(master: &File, width: u32, height: u32) -> std::io::Result<()> {
    let ws = libc::winsize {
        ws_row: height as u16,
        ws_col: width as u16,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer; the fd is open.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
