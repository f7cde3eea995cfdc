//! OOM events: rootcell relays an OOM kill inside the guest to a real one in the container's
//! memory cgroup on the host (runtime/src/oom.rs); the shim watches that cgroup as runc's shim
//! does: on cgroup v1 an eventfd registered for `memory.oom_control`, on cgroup v2 the
//! `oom_kill` count in `memory.events`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsFd, AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the host's cgroup hierarchies are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The longest a v2 watch waits for the kernel's change notification before it reads
/// `memory.events` anyway (and notices that the cgroup is gone).
const V2_POLL: Duration = Duration::from_secs(1);

/// The memory cgroup of a process.
#[derive(Debug, PartialEq)]
enum MemoryCgroup {
    /// A v1 memory controller directory.
    V1(PathBuf),
    /// A v2 (unified) cgroup directory with the memory controller.
    V2(PathBuf),
}

/// The memory cgroup named by `/proc/PID/cgroup` text `data`, with the hierarchies under
/// `root`: the v1 memory controller's if there is one (a hybrid host), else the unified one's.
fn memory_cgroup_in(data: &str, root: &Path) -> Option<MemoryCgroup> {
    let mut unified = None;
    for l in data.lines() {
        let mut f = l.splitn(3, ':');
        let (Some(_), Some(ctl), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if ctl.split(',').any(|c| c == "memory") {
            let dir = root.join("memory").join(rel);
            if dir.join("memory.oom_control").exists() {
                return Some(MemoryCgroup::V1(dir));
            }
        } else if ctl.is_empty() {
            unified = Some(rel.to_string());
        }
    }
    let rel = unified?;
    // A pure v2 host mounts the unified hierarchy at the root; only there does it carry the
    // memory controller (a hybrid host's /sys/fs/cgroup/unified has none).
    let dir = root.join(rel);
    dir.join("memory.events")
        .exists()
        .then_some(MemoryCgroup::V2(dir))
}

/// The `oom_kill` count of a v2 `memory.events` text.
fn oom_kills(events: &str) -> Option<u64> {
    events
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
}

/// Calls `on_oom` for each OOM kill in `pid`'s memory cgroup, until the cgroup goes. Returns
/// false if there is nothing to watch (no memory cgroup).
pub fn watch(pid: u32, on_oom: impl Fn() + Send + 'static) -> bool {
    let Ok(data) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return false;
    };
    match memory_cgroup_in(&data, Path::new(CGROUP_ROOT)) {
        Some(MemoryCgroup::V1(dir)) => watch_v1(dir, on_oom),
        Some(MemoryCgroup::V2(dir)) => watch_v2(dir, on_oom),
        None => false,
    }
}

fn watch_v1(dir: PathBuf, on_oom: impl Fn() + Send + 'static) -> bool {
    let Ok(control) = File::open(dir.join("memory.oom_control")) else {
        return false;
    };
    // SAFETY: eventfd(2) with no pointers; the result is checked.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if efd < 0 {
        return false;
    }
    // SAFETY: a fresh fd owned by nobody else.
    let mut ev = unsafe { File::from_raw_fd(efd) };
    let reg = format!("{} {}", ev.as_raw_fd(), control.as_raw_fd());
    if std::fs::write(dir.join("cgroup.event_control"), reg).is_err() {
        return false;
    }
    watch_thread(move || {
        let _control = control;
        let mut b = [0u8; 8];
        // The eventfd also fires when the cgroup is removed: that ends the watch.
        while ev.read_exact(&mut b).is_ok() {
            if !dir.exists() {
                break;
            }
            on_oom();
        }
    });
    true
}

fn watch_v2(dir: PathBuf, on_oom: impl Fn() + Send + 'static) -> bool {
    let file = dir.join("memory.events");
    let Ok(mut events) = File::open(&file) else {
        return false;
    };
    let Some(mut seen) = oom_kills_of(&mut events) else {
        return false;
    };
    watch_thread(move || {
        loop {
            // The kernel signals every change of memory.events to pollers of the open file
            // (POLLPRI): an OOM kill is seen at once, before the container's exit leads to
            // `delete` removing the cgroup (a plain poll once a second missed one that way: the
            // cgroup was gone 0.4 s after the kill). V2_POLL bounds the wait all the same.
            let mut fds = [nix::poll::PollFd::new(
                events.as_fd(),
                nix::poll::PollFlags::POLLPRI,
            )];
            let _ = nix::poll::poll(
                &mut fds,
                nix::poll::PollTimeout::try_from(V2_POLL.as_millis() as i32)
                    .unwrap_or(nix::poll::PollTimeout::MAX),
            );
            // Ends when the cgroup (and with it the file) goes: reading then fails.
            let Some(n) = oom_kills_of(&mut events).filter(|_| file.exists()) else {
                break;
            };
            for _ in seen..n {
                on_oom();
            }
            seen = seen.max(n);
        }
    });
    true
}

/// Starts a watch's thread. Only it reports the container's OOM kills: a panic in it ends the
/// shim, as one in the exit thread does (`crate::guard::end_shim`), rather than leave the kills
/// unreported for good.
fn watch_thread(body: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        crate::guard::or_end_shim(
            "an OOM watch thread",
            "OOM kills would no longer reach containerd",
            body,
        )
    });
}

/// The `oom_kill` count of the open `memory.events`, read again from its start (which also
/// re-arms the kernel's change notification for this open file).
fn oom_kills_of(events: &mut File) -> Option<u64> {
    events.seek(SeekFrom::Start(0)).ok()?;
    let mut text = String::new();
    events.read_to_string(&mut text).ok()?;
    oom_kills(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_memory_controller_wins_on_a_hybrid_host() {
        let root = tempfile_dir("hybrid");
        std::fs::create_dir_all(root.join("memory/ns/c")).unwrap();
        std::fs::write(root.join("memory/ns/c/memory.oom_control"), "").unwrap();
        let data = "12:memory:/ns/c\n1:name=systemd:/x\n0::/ns/c\n";
        assert_eq!(
            memory_cgroup_in(data, &root),
            Some(MemoryCgroup::V1(root.join("memory/ns/c")))
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn unified_cgroup_with_memory_events_on_a_v2_host() {
        let root = tempfile_dir("v2");
        std::fs::create_dir_all(root.join("ns/c")).unwrap();
        std::fs::write(root.join("ns/c/memory.events"), "oom 0\noom_kill 0\n").unwrap();
        assert_eq!(
            memory_cgroup_in("0::/ns/c\n", &root),
            Some(MemoryCgroup::V2(root.join("ns/c")))
        );
        // No memory controller there (a hybrid host's unified tree): nothing to watch.
        assert_eq!(memory_cgroup_in("0::/other\n", &root), None);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn oom_kill_count_is_read_from_memory_events() {
        let e = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(oom_kills(e), Some(2));
        assert_eq!(oom_kills("max 1\n"), None);
    }

    #[test]
    fn a_v2_watch_reports_each_new_oom_kill_and_ends_with_the_cgroup() {
        let root = tempfile_dir("watch");
        std::fs::create_dir_all(&root).unwrap();
        let events = root.join("memory.events");
        std::fs::write(&events, "oom 1\noom_kill 1\n").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        assert!(watch_v2(root.clone(), move || tx.send(()).unwrap()));
        // The kill that came before the watch is not reported; two new ones are.
        std::fs::write(&events, "oom 3\noom_kill 3\n").unwrap();
        for _ in 0..2 {
            rx.recv_timeout(Duration::from_secs(5)).unwrap();
        }
        assert!(rx.recv_timeout(Duration::from_millis(1500)).is_err());
        std::fs::remove_dir_all(&root).unwrap();
        // The thread ends (dropping the sender) once the file is gone.
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
        );
    }

    /// A panic in a watch's thread (here in the report of a kill) ends the shim rather than
    /// leave that container's later OOM kills unreported. Run in a process of its own, which
    /// it ends.
    #[test]
    fn a_panic_in_a_watch_thread_ends_the_shim() {
        use std::os::unix::process::ExitStatusExt;
        const CHILD: &str = "RC_SHIM_OOM_THREAD_TEST";
        if let Some(root) = std::env::var_os(CHILD).map(PathBuf::from) {
            let events = root.join("memory.events");
            std::fs::write(&events, "oom 0\noom_kill 0\n").unwrap();
            assert!(watch_v2(root.clone(), || panic!("publishing the OOM kill")));
            std::fs::write(&events, "oom 1\noom_kill 1\n").unwrap();
            std::thread::sleep(Duration::from_secs(6));
            println!("still alive 6 s after the watch thread's panic");
            return;
        }
        let name = "oom::tests::a_panic_in_a_watch_thread_ends_the_shim";
        let root = tempfile_dir("panic");
        std::fs::create_dir_all(&root).unwrap();
        let o = rootcell_test_support::rerun_test_alone(name, CHILD, &root);
        let out = String::from_utf8_lossy(&o.stdout);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("publishing the OOM kill"), "{out}\n{err}");
        assert_eq!(o.status.signal(), Some(libc::SIGABRT), "{out}\n{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    fn tempfile_dir(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("rc-shim-oom-{tag}-{}", std::process::id()))
    }
}
