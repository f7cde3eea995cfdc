//! An fd table of its own for a back-end thread, so what it can reach through `/proc/self/fd`
//! (the passthrough reopens every inode through that directory, and a subverted back end could
//! reopen any fd listed there) is only what the back end itself holds.
//!
//! `unshare(CLONE_FILES)` gives the calling thread a copy of the process's table; threads it
//! starts afterwards share the copy, and the rest of the process keeps the original. The copy
//! still refers to everything the process had open (its logs, the container's stdio files), so
//! every entry but the ones asked for is then pointed at `/dev/null` rather than closed: a
//! number the rest of the process holds in a global (the log writer, stdio) must not be reused
//! by a share's file in this table, or a log line written from this thread would land in it.
//! The table, and with it every fd in it, goes when the last thread sharing it ends.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Gives the calling thread an fd table of its own in which `keep` still refer to what they
/// referred to, and every other fd number open at the time refers to `/dev/null` (read and
/// write, close-on-exec), except that for each `(from, to)` of `redirect`, `to` refers to
/// what `from` referred to and `from` is closed (e.g. a log file's number made the write end
/// of a pipe the caller copies to the file). Threads the caller starts later share this
/// table. Call before anything else opens fds on this thread; needs `/dev/null` in the
/// caller's view.
pub fn unshare_keeping(keep: &[RawFd], redirect: &[(RawFd, RawFd)]) -> io::Result<()> {
    // SAFETY: unshare(2) with a flag only; affects this thread's fd table.
    if unsafe { libc::unshare(libc::CLONE_FILES) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("unshare(CLONE_FILES): {e}"),
        ));
    }
    // SAFETY: open(2) with a NUL-terminated path; the fd is owned from here on.
    let null = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if null < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("open /dev/null: {e}")));
    }
    // SAFETY: a fresh fd nothing else owns.
    let null = unsafe { OwnedFd::from_raw_fd(null) };
    // This thread's own table (`/proc/self/fd` would list the process's).
    let open: Vec<RawFd> = std::fs::read_dir("/proc/thread-self/fd")
        .map_err(|e| io::Error::new(e.kind(), format!("list /proc/thread-self/fd: {e}")))?
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect();
    // The listing's own fd is closed by now; pointing its number at /dev/null is harmless.
    for fd in open {
        if fd == null.as_raw_fd() || keep.contains(&fd) || redirect.iter().any(|r| r.0 == fd) {
            continue;
        }
        // SAFETY: dup3(2) onto a number of this thread's own table: it replaces what the
        // number referred to here; the rest of the process's table is untouched.
        if unsafe { libc::dup3(null.as_raw_fd(), fd, libc::O_CLOEXEC) } < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("point fd {fd} at /dev/null: {e}"),
            ));
        }
    }
    for &(from, to) in redirect {
        // SAFETY: dup3(2) and close(2) on numbers of this thread's own table.
        unsafe {
            if libc::dup3(from, to, libc::O_CLOEXEC) < 0 {
                let e = io::Error::last_os_error();
                return Err(io::Error::new(e.kind(), format!("redirect fd {to}: {e}")));
            }
            libc::close(from);
        }
    }
    Ok(())
}

/// A pipe standing in for one of the caller's fds (`target`, e.g. the log file the process's
/// log writer holds) in a thread's own table, and the "fs-log-relay" thread (of the caller's
/// table) that copies what arrives through it to `target`: the thread's lines still reach the
/// log without the log file being reachable from its table. Give [`Relay::redirect`] to
/// [`unshare_keeping`]; drop the relay once that thread has its table, so the relay thread
/// sees the pipe's end when the last thread sharing that table ends, and ends too.
pub struct Relay {
    target: RawFd,
    write: OwnedFd,
}

impl Relay {
    /// Makes the pipe and starts the relay thread, which runs `confine` on itself first (a
    /// relay in a process whose threads must not stay privileged drops everything but reading
    /// the pipe and writing `target`); returns once that is done, or its error.
    pub fn start(target: RawFd, confine: Option<crate::Confine>) -> io::Result<Self> {
        let mut ends = [0; 2];
        // SAFETY: pipe2(2) writes two fds into the array.
        if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("making a log pipe: {e}")));
        }
        // SAFETY: fresh fds nothing else owns.
        let (read, write) =
            unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
        // SAFETY: F_DUPFD_CLOEXEC of the caller's fd; a result >= 0 is ours.
        let out = unsafe { libc::fcntl(target, libc::F_DUPFD_CLOEXEC, 0) };
        if out < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("duplicating log fd {target}: {e}"),
            ));
        }
        // SAFETY: a fresh fd nothing else owns.
        let out = unsafe { OwnedFd::from_raw_fd(out) };
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("fs-log-relay".to_owned())
            .spawn(move || {
                use std::io::{Read, Write};
                let confined = confine.map_or(Ok(()), |c| c());
                let failed = confined.is_err();
                let _ = ready_tx.send(confined);
                if failed {
                    return;
                }
                let (mut read, mut out) = (std::fs::File::from(read), std::fs::File::from(out));
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match read.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            let _ = out.write_all(&buf[..n]);
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
            })
            .map_err(|e| io::Error::new(e.kind(), format!("spawning the log relay: {e}")))?;
        ready_rx
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the log relay ended early")))
            .map_err(|e| io::Error::new(e.kind(), format!("confining the log relay: {e}")))?;
        Ok(Relay { target, write })
    }

    /// `(pipe's write end, target)`, for [`unshare_keeping`]'s `redirect`.
    pub fn redirect(&self) -> (RawFd, RawFd) {
        (self.write.as_raw_fd(), self.target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// What `fd` names in the calling thread's table.
    fn target(fd: RawFd) -> String {
        std::fs::read_link(format!("/proc/thread-self/fd/{fd}"))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    #[test]
    fn the_thread_keeps_what_it_asked_for_and_the_process_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"host file").unwrap();
        let file = std::fs::File::open(&secret).unwrap();
        let (mut kept, mut peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let (fd, kept_fd) = (file.as_raw_fd(), kept.as_raw_fd());
        let (names, wrote) = std::thread::spawn(move || {
            unshare_keeping(&[kept_fd], &[]).unwrap();
            let names = (target(fd), target(kept_fd));
            // Writing to the kept socket reaches the process's copy's peer.
            // SAFETY: write(2) from a valid buffer to a number of this thread's table.
            let wrote = unsafe { libc::write(kept_fd, b"x".as_ptr().cast(), 1) };
            (names, wrote)
        })
        .join()
        .unwrap();
        assert_eq!(names.0, "/dev/null", "the host file in the thread's table");
        assert!(names.1.starts_with("socket:"), "{names:?}");
        assert_eq!(wrote, 1);
        let mut b = [0u8; 1];
        peer.read_exact(&mut b).unwrap();
        // The process's own table is as it was: the file is still the file, the socket still
        // the socket. (Its fd count is not compared: other tests of this binary open and close
        // fds in parallel.)
        assert_eq!(target(fd), secret.to_string_lossy());
        let mut s = String::new();
        (&file).read_to_string(&mut s).unwrap();
        assert_eq!(s, "host file");
        kept.write_all(b"y").unwrap();
        assert!(target(kept_fd).starts_with("socket:"));
    }
}
