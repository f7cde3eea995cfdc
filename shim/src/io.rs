//! The container's stdio from what containerd gives (FIFO paths, `file://` or `binary://`
//! URIs), and the rootfs mounts containerd hands the shim.

use crate::runtime::Stdio3;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a logging binary has to say it is ready (close its fd 5) before the process it logs
/// for fails to start.
const LOGGER_READY: Duration = Duration::from_secs(if cfg!(test) { 1 } else { 10 });

/// Whose output a logging binary gets: containerd hands a logger these two in its environment.
pub struct LogFor<'a> {
    /// The container's id (an exec's id for an exec'd process, as containerd's runc shim does).
    pub id: &'a str,
    /// The containerd namespace.
    pub namespace: &'a str,
}

/// A logging binary started for one process's output; the shim's reaper reaps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Logger {
    /// Its pid.
    pub pid: u32,
}

/// The program and arguments of a `binary:///PATH?KEY=VALUE&...` URI: every query pair becomes
/// two arguments, KEY then VALUE, as containerd's own shims pass them (in the URI's order here).
fn parse_binary_uri(uri: &str) -> std::io::Result<(PathBuf, Vec<String>)> {
    let bad = |why: &str| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "bad logging URI {uri}: {why} (expected binary:///ABSOLUTE/PATH[?KEY=VALUE&...])"
            ),
        )
    };
    let rest = uri
        .strip_prefix("binary://")
        .ok_or_else(|| bad("not binary://"))?;
    let rest = rest.split('#').next().unwrap_or_default();
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let path = decode(path);
    if !path.starts_with('/') || path.trim_end_matches('/').is_empty() {
        return Err(bad("the program must be an absolute path (no host part)"));
    }
    let mut args = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        // Query strings spell a space as '+'.
        let pair = pair.replace('+', " ");
        let (k, v) = pair.split_once('=').unwrap_or((&pair, ""));
        args.push(decode(k));
        args.push(decode(v));
    }
    Ok((PathBuf::from(path), args))
}

/// Starts the logging binary of a `binary://` URI the way containerd's shims do: the process's
/// stdout and stderr are pipes whose read ends the logger gets as fds 3 and 4, fd 5 is a pipe it
/// closes once it is ready (waited for here, bounded), its environment holds only CONTAINER_ID
/// and CONTAINER_NAMESPACE, and its stdio is /dev/null. Returns the write ends (the process's
/// stdout and stderr) and the logger. The logger sees EOF once every holder of the write ends
/// (the container's sandbox) is gone.
pub fn start_logger(uri: &str, who: &LogFor<'_>) -> std::io::Result<(File, File, Logger)> {
    let (program, args) = parse_binary_uri(uri)?;
    let pipe = || nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(std::io::Error::from);
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (ready_r, ready_w) = pipe()?;
    let null = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map(OwnedFd::from)?;
    // Copies numbered above 5, so that moving them to 0-5 in the child never overwrites one that
    // is still to be moved.
    let high = |fd: &OwnedFd| -> std::io::Result<OwnedFd> {
        let n =
            fcntl(fd.as_raw_fd(), FcntlArg::F_DUPFD_CLOEXEC(10)).map_err(std::io::Error::from)?;
        // SAFETY: `n` is the new descriptor F_DUPFD_CLOEXEC just returned; nothing else owns it.
        Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(n) })
    };
    let child_fds = [high(&out_r)?, high(&err_r)?, high(&ready_w)?, high(&null)?];
    drop((out_r, err_r, ready_w, null));
    let pid = spawn_logger(&program, &args, who, &child_fds).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot start logging binary {}: {e}", program.display()),
        )
    })?;
    // Our copies of the read ends and of the ready pipe's write end: only the logger holds them.
    drop(child_fds);
    let logger = Logger { pid };
    // Ready once fd 5 reads EOF: the logger closed it (or exited).
    let mut fds = [nix::poll::PollFd::new(
        ready_r.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    let timeout = nix::poll::PollTimeout::try_from(LOGGER_READY.as_millis() as i32)
        .unwrap_or(nix::poll::PollTimeout::MAX);
    let ready = loop {
        match nix::poll::poll(&mut fds, timeout) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => break Err(std::io::Error::from(e)),
            Ok(0) => {
                break Err(std::io::Error::other(format!(
                    "logging binary {} did not close its fd 5 within {} s",
                    program.display(),
                    LOGGER_READY.as_secs()
                )))
            }
            Ok(_) => break Ok(()),
        }
    };
    if let Err(e) = ready {
        // Not reaped yet (only the shim's reaper reaps it), so the pid is still the logger's.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(logger.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        return Err(e);
    }
    Ok((File::from(out_w), File::from(err_w), logger))
}

/// posix_spawn(3) of a logger: `fds` (the stdout and stderr read ends, the ready pipe's write
/// end, /dev/null; all close-on-exec and numbered above 5) become its fds 3, 4, 5 and its stdio,
/// with `who` as its whole environment. Not std's `Command`: moving descriptors to 3-5 needs
/// `pre_exec`, hence a fork, and after a fork whose exec fails std waits for the child itself
/// and panics if that wait finds no child, which is what happens when the shim's reaper
/// (containerd-shim's SIGCHLD thread, waitpid(-1)) collects it first: the create request then
/// died with its handler thread, unanswered, and containerd (and `ctr run`) waited for it
/// forever. posix_spawn reports a failed exec as its result, whoever reaps the child (the
/// reaper reports it as an exit nobody claims).
fn spawn_logger(
    program: &Path,
    args: &[String],
    who: &LogFor<'_>,
    fds: &[OwnedFd; 4],
) -> std::io::Result<u32> {
    use nix_spawn::spawn::{posix_spawn, PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags};
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let cstring = |b: &[u8]| {
        CString::new(b).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a NUL byte in the logger's command line or environment",
            )
        })
    };
    let mut argv = vec![cstring(program.as_os_str().as_bytes())?];
    for a in args {
        argv.push(cstring(a.as_bytes())?);
    }
    let envp = [
        cstring(format!("CONTAINER_ID={}", who.id).as_bytes())?,
        cstring(format!("CONTAINER_NAMESPACE={}", who.namespace).as_bytes())?,
    ];
    let [out, err, ready, null] = fds.each_ref().map(|f| f.as_raw_fd());
    let mut actions = PosixSpawnFileActions::init()?;
    // dup2 clears close-on-exec on the copy: these six survive the exec, nothing else does.
    for (from, to) in [
        (null, 0),
        (null, 1),
        (null, 2),
        (out, 3),
        (err, 4),
        (ready, 5),
    ] {
        actions.add_dup2(from, to)?;
    }
    // The shim's signal dispositions and mask are not the logger's business (std's Command
    // resets them the same way).
    let mut attr = PosixSpawnAttr::init()?;
    attr.set_flags(
        PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF | PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK,
    )?;
    let mut pipe_default = nix_spawn::sys::signal::SigSet::empty();
    pipe_default.add(nix_spawn::sys::signal::Signal::SIGPIPE);
    attr.set_sigdefault(&pipe_default)?;
    attr.set_sigmask(&nix_spawn::sys::signal::SigSet::empty())?;
    let pid = posix_spawn(program, &actions, &attr, &argv, &envp)?;
    Ok(pid.as_raw() as u32)
}

/// Opens an output (stdout, stderr): a FIFO whose reader containerd (or ctr) already holds or
/// is opening, a `file://` URI, or a `binary://` logger (then only its stdout pipe is used: the
/// caller is a terminal's relay). Empty means none.
pub fn open_output(uri: &str, who: &LogFor<'_>) -> std::io::Result<(Option<File>, Option<Logger>)> {
    if uri.starts_with("binary://") {
        let (out, _err, logger) = start_logger(uri, who)?;
        return Ok((Some(out), Some(logger)));
    }
    Ok((open_plain_output(uri)?, None))
}

/// [`open_output`] of a FIFO or `file://` URI.
fn open_plain_output(uri: &str) -> std::io::Result<Option<File>> {
    if uri.is_empty() {
        return Ok(None);
    }
    if let Some(p) = uri.strip_prefix("file://") {
        if let Some(dir) = Path::new(p).parent() {
            std::fs::create_dir_all(dir)?;
        }
        return OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map(Some);
    }
    if uri.contains("://") {
        return Err(std::io::Error::other(format!(
            "stdio URI {uri} is not supported by the rootcell shim (FIFO paths, file:// and binary:// are)"
        )));
    }
    // Non-blocking so that a reader that went away cannot hang the shim; a reader blocked in
    // its own open already counts. Blocking again afterwards, as the container expects.
    let f = match OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(uri)
    {
        Ok(f) => f,
        // No reader yet: open read-write, which does not wait, and keeps the FIFO usable.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(uri)?,
        Err(e) => return Err(e),
    };
    fcntl(f.as_raw_fd(), FcntlArg::F_SETFL(OFlag::empty())).map_err(std::io::Error::from)?;
    Ok(Some(f))
}

/// Opens the stdin FIFO for reading: a pipe whose read end is the container's stdin, fed by a
/// thread that waits for containerd's writer, copies, and closes the pipe at the writer's EOF
/// (so the container sees EOF when `ctr`'s stdin ends).
fn open_input(path: &str) -> std::io::Result<Option<File>> {
    if path.is_empty() {
        return Ok(None);
    }
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(std::io::Error::from)?;
    let path = path.to_string();
    std::thread::spawn(move || {
        let mut w = File::from(w);
        // Blocks until containerd opens the write side, as runc's shim does.
        match File::open(&path) {
            Ok(mut f) => {
                let _ = std::io::copy(&mut f, &mut w);
            }
            Err(e) => log::warn!("stdin {path}: {e}"),
        }
    });
    Ok(Some(File::from(r)))
}

/// The three stdio files for a process, and the logging binary started for its output. A
/// `binary://` stdout takes stderr too (containerd gives a logger both, as fds 3 and 4; its
/// clients set both to the same URI).
pub fn open(
    stdin: &str,
    stdout: &str,
    stderr: &str,
    who: &LogFor<'_>,
) -> std::io::Result<(Stdio3, Option<Logger>)> {
    if stdout.starts_with("binary://") {
        let (out, err, logger) = start_logger(stdout, who)?;
        let stdin = open_input(stdin).inspect_err(|_| {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(logger.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        })?;
        let stdio = Stdio3 {
            stdin,
            stdout: Some(out),
            stderr: Some(err),
        };
        return Ok((stdio, Some(logger)));
    }
    let stdio = Stdio3 {
        stdin: open_input(stdin)?,
        stdout: open_plain_output(stdout)?,
        stderr: open_plain_output(stderr)?,
    };
    Ok((stdio, None))
}

/// Unmounts what the shim mounted on a bundle's rootfs (nothing if it is not a mount point).
pub fn unmount_rootfs(rootfs: &Path) {
    for _ in 0..8 {
        if nix::mount::umount2(rootfs, nix::mount::MntFlags::MNT_DETACH).is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_uri_program_and_arguments() {
        let (p, a) =
            parse_binary_uri("binary:///usr/bin/log%20ger?--driver=json&dir=/var/log+x").unwrap();
        assert_eq!(p, PathBuf::from("/usr/bin/log ger"));
        assert_eq!(a, ["--driver", "json", "dir", "/var/log x"]);
        // The form containerd's docs show, with an empty host and four slashes.
        let (p, a) = parse_binary_uri("binary:////opt/logger").unwrap();
        assert_eq!(p, PathBuf::from("//opt/logger"));
        assert!(a.is_empty());
        for bad in [
            "binary://host/logger",
            "binary://",
            "binary:///",
            "file:///x",
        ] {
            let e = parse_binary_uri(bad).unwrap_err().to_string();
            assert!(
                e.contains(bad) && e.contains("binary:///ABSOLUTE/PATH"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_logger_gets_the_output_on_fds_3_and_4_and_its_environment() {
        let dir = tempfile_dir();
        let script = dir.join("logger");
        std::fs::write(
            &script,
            "#!/bin/sh\nd=$2\necho \"$1 $CONTAINER_NAMESPACE/$CONTAINER_ID ${HOME:-nohome}\" > $d/env\nexec 5>&-\ncat <&3 > $d/out &\ncat <&4 > $d/err\nwait\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let uri = format!("binary://{}?dir={}", script.display(), dir.display());
        let who = LogFor {
            id: "c1",
            namespace: "ns",
        };
        let (mut out, mut err, logger) = start_logger(&uri, &who).unwrap();
        use std::io::Write;
        out.write_all(b"to stdout\n").unwrap();
        err.write_all(b"to stderr\n").unwrap();
        drop((out, err));
        let st =
            nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(logger.pid as i32), None).unwrap();
        assert_eq!(
            st,
            nix::sys::wait::WaitStatus::Exited(nix::unistd::Pid::from_raw(logger.pid as i32), 0)
        );
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(read("env"), "dir ns/c1 nohome\n");
        assert_eq!(read("out"), "to stdout\n");
        assert_eq!(read("err"), "to stderr\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_logger_is_a_clear_error() {
        assert_missing_logger_fails();
    }

    /// Starting a logger that does not exist fails, saying which.
    fn assert_missing_logger_fails() {
        let who = LogFor {
            id: "c1",
            namespace: "ns",
        };
        let e = start_logger("binary:///no/such/logger", &who)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot start logging binary /no/such/logger"),
            "{e}"
        );
    }

    #[test]
    fn a_logger_that_never_says_ready_is_killed_and_the_start_fails() {
        let dir = tempfile_dir_named("never");
        let script = dir.join("logger");
        std::fs::write(&script, "#!/bin/sh\necho $$ > \"$0.pid\"\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let who = LogFor {
            id: "c1",
            namespace: "ns",
        };
        let uri = format!("binary://{}", script.display());
        let e = start_logger(&uri, &who).unwrap_err().to_string();
        assert!(e.contains("did not close its fd 5 within 1 s"), "{e}");
        // Killed, not left sleeping.
        let pid: i32 = std::fs::read_to_string(dir.join("logger.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let st = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).unwrap();
        assert!(
            matches!(
                st,
                nix::sys::wait::WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGKILL, _)
            ),
            "{st:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The shim's reaper (containerd-shim's SIGCHLD thread) collects every child with
    /// waitpid(-1): a logger whose exec fails must still fail cleanly, not in a wait of its own
    /// for a child the reaper may have taken first (std's spawn then panics, the create request
    /// is never answered, and containerd waits for it forever). Runs in a process of its own,
    /// where such a reaper takes no other test's children.
    #[test]
    fn a_missing_logger_fails_cleanly_while_a_reaper_collects_every_child() {
        let name = "io::tests::a_missing_logger_fails_cleanly_while_a_reaper_collects_every_child";
        if crate::reaper_test::alone(name) {
            crate::reaper_test::with_reaper(|| {
                for _ in 0..300 {
                    assert_missing_logger_fails();
                }
            });
        }
    }

    fn tempfile_dir() -> PathBuf {
        tempfile_dir_named("ok")
    }

    fn tempfile_dir_named(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rc-shim-io-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
