//! The one-way pipe on which the forked setup processes report back to the agent.
//!
//! Each report is one JSON line written with a single `write(2)` below `PIPE_BUF`, so reports
//! from the two setup processes never interleave and their order does not matter.

use super::error::SetupError;
use rootcell_protocol::ErrorCode;
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

/// Stay below PIPE_BUF (4096) so every report is written atomically.
const MAX_REPORT: usize = 3500;

/// What a setup process tells the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum Report {
    /// The pid (in the agent's pid namespace) of the process that will exec the program.
    Pid(i32),
    /// Setup finished; the process waits for its release.
    Ready,
    /// Setup failed.
    Failed { code: ErrorCode, message: String },
}

/// Sends one report; errors are ignored because the reader's absence is detected by EOF there.
pub(crate) fn send(fd: BorrowedFd<'_>, report: &Report) {
    let mut report = report.clone();
    if let Report::Failed { message, .. } = &mut report {
        if message.len() > MAX_REPORT {
            let mut cut = MAX_REPORT;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
    }
    let mut line = serde_json::to_vec(&report).unwrap_or_default();
    line.push(b'\n');
    // SAFETY: writing an initialised buffer to a valid fd.
    unsafe { libc::write(fd.as_raw_fd(), line.as_ptr().cast(), line.len()) };
}

/// Sends a failure report.
pub(crate) fn send_error(fd: BorrowedFd<'_>, err: &SetupError) {
    send(
        fd,
        &Report::Failed {
            code: err.code,
            message: err.message.clone(),
        },
    );
}

/// What the setup processes reported.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// Pid of the process, if it was reported.
    pub pid: Option<i32>,
    /// Ready, or the first failure.
    pub result: Result<(), SetupError>,
}

/// Reads reports until the pid and readiness are known; after a failure, reads on until every
/// writer is gone so the caller knows both setup processes have finished.
pub(crate) fn collect(read: OwnedFd) -> Outcome {
    let mut file = std::fs::File::from(read);
    let mut buf = Vec::new();
    let mut pid = None;
    let mut ready = false;
    let mut failure: Option<SetupError> = None;
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            match serde_json::from_slice::<Report>(&line[..line.len() - 1]) {
                Ok(Report::Pid(p)) => pid = Some(p),
                Ok(Report::Ready) => ready = true,
                Ok(Report::Failed { code, message }) => {
                    failure.get_or_insert(SetupError::new(code, message));
                }
                Err(e) => {
                    failure.get_or_insert(SetupError::other(format!("bad setup report: {e}")));
                }
            }
            if let (Some(_), true, None) = (pid, ready, &failure) {
                return Outcome {
                    pid,
                    result: Ok(()),
                };
            }
        }
        match file.read(&mut chunk) {
            Ok(0) => {
                let err = failure.unwrap_or_else(|| {
                    SetupError::other("container setup process died without reporting")
                });
                return Outcome {
                    pid,
                    result: Err(err),
                };
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                let err = failure
                    .unwrap_or_else(|| SetupError::other(format!("reading setup report: {e}")));
                return Outcome {
                    pid,
                    result: Err(err),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::fcntl::OFlag;
    use std::os::fd::AsFd;

    #[test]
    fn pid_and_ready_in_any_order() {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        send(w.as_fd(), &Report::Ready);
        send(w.as_fd(), &Report::Pid(42));
        let out = collect(r);
        assert_eq!(out.pid, Some(42));
        assert!(out.result.is_ok());
        drop(w);
    }

    #[test]
    fn failure_wins_and_eof_is_an_error() {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        send(w.as_fd(), &Report::Pid(42));
        send_error(
            w.as_fd(),
            &SetupError::new(ErrorCode::NotFound, "x".repeat(10_000)),
        );
        drop(w);
        let out = collect(r);
        assert_eq!(out.pid, Some(42));
        let e = out.result.unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound);
        assert!(e.message.len() <= MAX_REPORT);

        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        send(w.as_fd(), &Report::Pid(1));
        drop(w);
        assert_eq!(collect(r).result.unwrap_err().code, ErrorCode::Other);
    }
}
