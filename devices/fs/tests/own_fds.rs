//! The vhost-user back end with `Jail::own_fd_table`: its threads serve from an fd table of
//! their own, so their `/proc/self/fd` (through which the passthrough reopens inodes, and a
//! subverted back end could reopen anything listed) holds none of the caller's files; the
//! caller's table gets nothing of theirs but the stop eventfd; a stop still ends a connected
//! session, and when the back end ends its threads are gone and nothing is left open.
//!
//! One test in its own binary: it compares the process's whole fd table before and after.
//! Needs root (mount namespaces), as `rootcell-test-support` says.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use rootcell_fs::{serve_vhost_user_confined, BackendHandle, FsConfig, Jail};
use vhost::vhost_user::Frontend;
use vhost::VhostBackend;

/// fd number → what it names, in the fd directory `dir` (test-support's reader).
fn table(dir: &str) -> BTreeMap<i32, String> {
    rootcell_test_support::fd_targets(Path::new(dir))
}

/// What the process's table holds (name → how many fds), without the listing's own fd.
fn process_table() -> BTreeMap<String, usize> {
    let mut names = BTreeMap::new();
    for n in table("/proc/self/fd").into_values() {
        if !n.ends_with("/fd") {
            *names.entry(n).or_insert(0) += 1;
        }
    }
    names
}

/// What `now` holds beyond `before`, one entry per extra fd.
fn added(before: &BTreeMap<String, usize>, now: &BTreeMap<String, usize>) -> Vec<String> {
    let mut out = Vec::new();
    for (n, &c) in now {
        for _ in before.get(n).copied().unwrap_or(0)..c {
            out.push(n.clone());
        }
    }
    out
}

fn threads_named(prefix: &str) -> Vec<u32> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.starts_with(prefix))
        })
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `wait` on another thread and fails if it does not return in time.
fn wait_bounded(handle: BackendHandle) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(handle.wait());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the back end did not finish in time")
        .expect("the back end ended with an error");
}

fn start(share: &Path, socket: &Path, own_fd_table: bool) -> (BackendHandle, Duration) {
    start_logging(share, socket, own_fd_table, None)
}

/// With `log`, the back end's threads write a line to that fd number (as the process's log
/// writer would) once they have their own table, and it is relayed.
fn start_logging(
    share: &Path,
    socket: &Path,
    own_fd_table: bool,
    log: Option<std::os::fd::RawFd>,
) -> (BackendHandle, Duration) {
    let started = Instant::now();
    let handle = serve_vhost_user_confined(
        socket,
        FsConfig {
            shared_dir: share.to_owned(),
            read_only: false,
        },
        Jail {
            share_root: true,
            own_fd_table,
            relay: log.into_iter().collect(),
            confine: log.map(|fd| {
                Box::new(move || {
                    let line = b"from the back end\n";
                    // SAFETY: write(2) from a valid buffer to a number of this thread's table.
                    let n = unsafe { libc::write(fd, line.as_ptr().cast(), line.len()) };
                    assert_eq!(
                        n,
                        line.len() as isize,
                        "{}",
                        std::io::Error::last_os_error()
                    );
                    Ok(())
                }) as rootcell_fs::Confine
            }),
        },
    )
    .expect("back end starts");
    (handle, started.elapsed())
}

#[test]
fn back_end_threads_hold_only_their_own_fds_and_leave_nothing() {
    if !rootcell_test_support::require_root("back_end_threads_hold_only_their_own_fds") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let share = tmp.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("inside"), b"shared").unwrap();
    // What the caller holds and the back end must not reach: a host file and a directory
    // outside the share (as the sandbox holds its logs and the container's stdio files).
    let secret = tmp.path().join("secret.log");
    std::fs::write(&secret, b"host only").unwrap();
    let held_file = std::fs::File::open(&secret).unwrap();
    let held_dir = std::fs::File::open(tmp.path()).unwrap();
    let socket = tmp.path().join("fs.sock");
    // A log the process writes through a global writer (as the sandbox's log is).
    let log_path = tmp.path().join("sandbox.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .unwrap();

    // What an fd table of its own costs at start: the same back end without one first.
    let (h, without) = start(&share, &socket, false);
    h.stop();
    wait_bounded(h);
    let before = process_table();

    // 1. Stopped while a VMM is connected.
    let (handle, with) = start_logging(&share, &socket, true, Some(log.as_raw_fd()));
    eprintln!("start: {with:?} with an fd table of its own, {without:?} without");
    // The caller's table got only the stop eventfd, and the relay's end of the log pipe and
    // its own fd of the log.
    let added = added(&before, &process_table());
    assert!(
        added.len() == 3
            && added.contains(&"anon_inode:[eventfd]".to_string())
            && added.contains(&log_path.to_string_lossy().into_owned())
            && added.iter().any(|n| n.starts_with("pipe:")),
        "the back end left {added:?} in the caller's table"
    );
    let frontend = Frontend::connect(&socket, 2).unwrap();
    frontend.set_owner().unwrap();
    assert!(frontend.get_features().is_ok());
    let tid = *threads_named("rootcell-fs\n")
        .first()
        .expect("rootcell-fs thread");
    let pid = std::process::id();
    // What the back end could reopen through its /proc/self/fd: its own table only.
    let its = table(&format!("/proc/{pid}/task/{tid}/fd"));
    let theirs = table("/proc/self/fd");
    assert_ne!(its, theirs, "the back end shares the caller's table");
    let host = |t: &str| t.starts_with('/') && !t.starts_with("/share") && t != "/dev/null";
    let outside: Vec<&String> = its
        .values()
        // The passthrough's handles on its own fd directory and mount table (bound there).
        .filter(|t| host(t) && !["/proc/self/fd", "/proc/self/mountinfo"].contains(&t.as_str()))
        .collect();
    assert!(
        outside.is_empty(),
        "the back end holds host files outside the share: {outside:?} (all: {its:?})"
    );
    assert_eq!(
        its.get(&(held_file.as_raw_fd())).map(String::as_str),
        Some("/dev/null"),
        "the caller's file's number in the back end's table: {its:?}"
    );
    assert_eq!(
        its.get(&(held_dir.as_raw_fd())).map(String::as_str),
        Some("/dev/null")
    );
    // The log's number is a pipe there, whose bytes reach the log.
    let piped = its.get(&(log.as_raw_fd())).cloned().unwrap_or_default();
    assert!(piped.starts_with("pipe:"), "the log's number holds {piped}");
    eventually("the back end's log line reaches the log", || {
        std::fs::read_to_string(&log_path).is_ok_and(|l| l == "from the back end\n")
    });
    // Its root's /proc/self/fd is that table, not the process's.
    let via_root = table(&format!("/proc/{pid}/task/{tid}/root/proc/self/fd"));
    assert!(
        via_root
            .values()
            .all(|t| !t.contains("secret.log") && !t.contains("fs.sock")),
        "{via_root:?}"
    );
    assert_eq!(
        via_root,
        table(&format!("/proc/{pid}/task/{tid}/fd")),
        "the root's /proc/self/fd is not the back end's own table"
    );
    eventually("the stop thread runs", || {
        threads_named("rootcell-fs-sto").len() == 1
    });
    handle.stop();
    wait_bounded(handle);
    assert!(
        frontend.get_features().is_err(),
        "the stop did not shut the connection down"
    );
    drop(frontend);
    eventually("the back end's threads end", || {
        threads_named("rootcell-fs").is_empty()
            && threads_named("vring_worker").is_empty()
            && threads_named("fs-log-relay").is_empty()
    });
    assert_eq!(process_table(), before, "fds left in the caller's table");

    // 2. The VMM hangs up.
    let (handle, _) = start(&share, &socket, true);
    let frontend = Frontend::connect(&socket, 2).unwrap();
    frontend.set_owner().unwrap();
    drop(frontend);
    wait_bounded(handle);
    eventually("the back end's threads end after a hang-up", || {
        threads_named("rootcell-fs").is_empty()
    });
    assert_eq!(process_table(), before, "fds left after a hang-up");

    // 3. Stopped before any VMM came, and dropped without a wait.
    let (handle, _) = start(&share, &socket, true);
    handle.stop();
    drop(handle);
    eventually(
        "the back end's threads end after a stop without a VMM",
        || threads_named("rootcell-fs").is_empty(),
    );
    assert_eq!(process_table(), before, "fds left after an early stop");
    assert!(!socket.exists(), "socket file removed");
}
