//! Unit tests of the parent module.

use super::*;

/// A forked stand-in for the VMM: holds `bytes` of touched memory until killed.
fn memory_holder(bytes: usize) -> libc::pid_t {
    // SAFETY: the child only makes raw system calls.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: the forked child touches fresh memory and exits; no locks are taken.
        unsafe {
            touch_new_memory(bytes);
            loop {
                libc::pause();
            }
        }
    }
    assert!(pid > 0);
    pid
}

/// Registers an eventfd on `memory.oom_control`, as containerd's shim does on cgroup v1.
fn oom_eventfd(dir: &Path) -> (std::fs::File, std::fs::File) {
    use std::os::fd::{AsRawFd, FromRawFd};
    let control = std::fs::File::open(dir.join("memory.oom_control")).unwrap();
    // SAFETY: a new eventfd, owned by the File.
    let efd = unsafe {
        std::fs::File::from_raw_fd(libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK))
    };
    let line = format!("{} {}", efd.as_raw_fd(), control.as_raw_fd());
    std::fs::write(dir.join("cgroup.event_control"), line).unwrap();
    (efd, control)
}

fn field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

/// What one relay on a real cgroup did, read right after it.
struct Observed {
    result: Result<()>,
    /// The shim's view: v1's eventfd fired, or v2's `memory.events` counts one `oom_kill`.
    notified: bool,
    oom_kills: Option<u64>,
    stand_in_alive: bool,
    procs_after: Vec<u32>,
    stand_in: u32,
    /// The limit and swap setting before and after.
    settings: [[(String, String); 2]; 2],
    holding_left: bool,
    /// v2: whether the cgroup was seen unpopulated during the relay (see [`watch_populated`]).
    emptied: bool,
}

/// Watches `dir`'s `cgroup.events` and `memory.events` as containerd's runc shim does on cgroup
/// v2 (inotify, IN_MODIFY) until `stop`; returns whether any wake-up found the cgroup
/// unpopulated. The shim stops watching a cgroup for good once it finds it so, and then never
/// reports an OOM kill in it (the relay's included).
fn watch_populated(
    dir: PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<bool> {
    use std::os::unix::ffi::OsStrExt;
    let events = dir.join("cgroup.events");
    // SAFETY: a new inotify fd, closed below.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
    if fd < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
        // A kernel without inotify (rootcell's guest kernel, where tests/e2e/cgroup_v2.rs runs
        // this test): reading the file every millisecond sees at least what the shim's
        // wake-ups would.
        return std::thread::spawn(move || {
            let mut emptied = false;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let text = std::fs::read_to_string(&events).unwrap_or_default();
                emptied |= field(&text, "populated ") == Some(0);
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            emptied
        });
    }
    assert!(
        fd >= 0,
        "inotify_init1: {}",
        std::io::Error::last_os_error()
    );
    for f in ["cgroup.events", "memory.events"] {
        let path = std::ffi::CString::new(dir.join(f).as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path and the fd just made.
        let wd = unsafe { libc::inotify_add_watch(fd, path.as_ptr(), libc::IN_MODIFY) };
        assert!(
            wd >= 0,
            "inotify_add_watch {f}: {}",
            std::io::Error::last_os_error()
        );
    }
    std::thread::spawn(move || {
        let mut emptied = false;
        let mut buf = [0u8; 4096];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll(2) on one pollfd that lives for the call.
            if unsafe { libc::poll(&mut p, 1, 20) } <= 0 {
                continue;
            }
            // SAFETY: reading into a local buffer of its length.
            while unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
            let text = std::fs::read_to_string(&events).unwrap_or_default();
            emptied |= field(&text, "populated ") == Some(0);
        }
        // SAFETY: the fd made above, closed once.
        unsafe { libc::close(fd) };
        emptied
    })
}

/// Runs one relay on a fresh cgroup under `root` (a v1 memory hierarchy or the v2 root)
/// holding a forked 32 MiB stand-in for the VMM, and removes everything afterwards.
fn relay_on_a_real_cgroup(root: &Path, v2: bool) -> Observed {
    use std::io::Read;
    let parent = format!("/rootcell-oom-test-{}", std::process::id());
    let path = format!("{parent}/c1");
    let parent_dir = if v2 {
        root.join(&parent[1..])
    } else {
        root.join("memory").join(&parent[1..])
    };
    std::fs::create_dir_all(&parent_dir).unwrap();
    if v2 {
        // c1 gets memory.* files only when its parent hands the controller down.
        write_value(&parent_dir.join("cgroup.subtree_control"), "+memory").unwrap();
    }
    std::fs::create_dir_all(parent_dir.join("c1")).unwrap();
    let cg = MemoryCgroup::find(root, &path).expect("the test cgroup has memory files");
    let holder = memory_holder(32 << 20);
    std::thread::sleep(Duration::from_millis(300));
    write_value(&cg.dir.join("cgroup.procs"), &holder.to_string()).unwrap();
    let settings = |cg: &MemoryCgroup| {
        [cg.limit, cg.no_swap.0].map(|f| (f.to_string(), cg.read(f).unwrap_or_default()))
    };
    let before = settings(&cg);
    let efd = (!v2).then(|| oom_eventfd(&cg.dir));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = v2.then(|| watch_populated(cg.dir.clone(), stop.clone()));

    let result = relay_in(&cg);

    // Time for a last wake-up (the kernel spaces these notifications 10 ms apart).
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let emptied = watcher.is_some_and(|w| w.join().unwrap());

    let notified = match efd {
        Some((mut efd, _control)) => {
            let mut count = [0u8; 8];
            efd.read(&mut count).is_ok() && u64::from_ne_bytes(count) > 0
        }
        None => true,
    };
    let counts = cg
        .read(if v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        })
        .unwrap();
    let after = settings(&cg);
    let observed = Observed {
        result,
        notified,
        oom_kills: field(&counts, "oom_kill "),
        // SAFETY: probing our own child with signal 0.
        stand_in_alive: unsafe { libc::kill(holder, 0) } == 0,
        procs_after: procs(&cg.dir).unwrap(),
        stand_in: holder as u32,
        settings: [before, after],
        holding_left: cg.holding_dir().exists(),
        emptied,
    };
    // SAFETY: our own child, killed and reaped.
    unsafe {
        libc::kill(holder, libc::SIGKILL);
        libc::waitpid(holder, std::ptr::null_mut(), 0);
    }
    std::thread::sleep(Duration::from_millis(100));
    let _ = std::fs::remove_dir(&cg.dir);
    let _ = std::fs::remove_dir(&parent_dir);
    observed
}

fn check(o: Observed) {
    o.result.unwrap();
    assert!(o.notified, "no OOM notification on the cgroup's eventfd");
    assert_eq!(o.oom_kills, Some(1), "the cgroup's oom_kill count");
    assert!(
        o.stand_in_alive,
        "the process standing in for the VM was killed"
    );
    assert_eq!(
        o.procs_after,
        vec![o.stand_in],
        "the VM's processes are not back"
    );
    assert!(!o.holding_left, "the holding cgroup was left behind");
    assert!(
        !o.emptied,
        "the cgroup was empty during the relay: containerd's shim would stop watching it"
    );
    assert_eq!(
        o.settings[0], o.settings[1],
        "limit and swap setting not restored"
    );
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn relays_a_real_oom_kill_on_cgroup_v1_and_the_vm_stand_in_survives() {
    let root = Path::new(CGROUP_ROOT);
    if !root.join("memory/memory.oom_control").exists() || !is_root() {
        eprintln!("skipped: needs root and a cgroup v1 memory hierarchy (tests/e2e runs the v2 case in a guest)");
        return;
    }
    check(relay_on_a_real_cgroup(root, false));
}

/// Runs on cgroup v2 hosts, and in a rootcell guest (tests/e2e/lifecycle.rs) on v1 hosts.
#[test]
fn relays_a_real_oom_kill_on_cgroup_v2_and_the_vm_stand_in_survives() {
    let root = Path::new(CGROUP_ROOT);
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    if !controllers.split_whitespace().any(|c| c == "memory") || !is_root() {
        eprintln!("skipped: needs root and the memory controller on cgroup v2 at {CGROUP_ROOT}");
        return;
    }
    check(relay_on_a_real_cgroup(root, true));
}

#[test]
fn finds_v1_and_v2_memory_cgroups_and_refuses_odd_paths() {
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(t.path().join("memory/docker/a")).unwrap();
    std::fs::write(t.path().join("memory/docker/a/memory.oom_control"), "").unwrap();
    let v1 = MemoryCgroup::find(t.path(), "/docker/a").unwrap();
    assert_eq!(v1.dir, t.path().join("memory/docker/a"));
    assert_eq!(v1.limit, "memory.limit_in_bytes");
    assert_eq!(v1.holding_dir(), t.path().join("memory/docker/a.oom-relay"));
    std::fs::create_dir_all(t.path().join("docker/b")).unwrap();
    for f in ["memory.events", "memory.max"] {
        std::fs::write(t.path().join("docker/b").join(f), "").unwrap();
    }
    let v2 = MemoryCgroup::find(t.path(), "/docker/b").unwrap();
    assert_eq!(
        (v2.dir, v2.limit),
        (t.path().join("docker/b"), "memory.max")
    );
    for bad in [
        "",
        "/",
        "system.slice:docker:x",
        "/docker/../etc",
        "/docker/none",
    ] {
        assert!(MemoryCgroup::find(t.path(), bad).is_none(), "{bad}");
    }
}

#[test]
fn relays_into_one_cgroup_are_at_least_a_second_apart() {
    let mut last = Vec::new();
    let t0 = Instant::now();
    assert_eq!(admit(&mut last, "/docker/a", t0), Ok(()));
    // A flood of events within the second: none runs.
    for ms in [0, 1, 500, 999] {
        let at = t0 + Duration::from_millis(ms);
        assert_eq!(
            admit(&mut last, "/docker/a", at),
            Err(Duration::from_millis(ms))
        );
    }
    // Another container's cgroup is not held back.
    assert_eq!(admit(&mut last, "/docker/b", t0), Ok(()));
    // A second later the next one runs, and starts a new interval.
    let t1 = t0 + MIN_INTERVAL;
    assert_eq!(admit(&mut last, "/docker/a", t1), Ok(()));
    assert!(admit(&mut last, "/docker/a", t1 + Duration::from_millis(10)).is_err());
}
