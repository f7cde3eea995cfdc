//! Unit tests of the I/O thread: command order, pause, and its seccomp filter.

use super::*;
use std::sync::{Arc, Mutex};

/// Records what the thread saw; its activation is an eventfd to watch under token 7.
struct Recorder(Arc<Mutex<Vec<String>>>, Option<EventFd>);

impl DeviceWorker for Recorder {
    type Activation = EventFd;
    fn start(&mut self, _: &Epoll) -> std::io::Result<()> {
        self.0.lock().unwrap().push("start".into());
        Ok(())
    }
    fn activate(&mut self, epoll: &Epoll, evt: EventFd) -> Result<(), String> {
        watch(epoll, evt.as_raw_fd(), 7)?;
        self.1 = Some(evt);
        self.0.lock().unwrap().push("activate".into());
        Ok(())
    }
    fn reset(&mut self, epoll: &Epoll) -> bool {
        if let Some(e) = self.1.take() {
            unwatch(epoll, e.as_raw_fd());
        }
        self.0.lock().unwrap().push("reset".into());
        true
    }
    fn on_event(&mut self, _: &Epoll, token: u64) {
        if let Some(e) = &self.1 {
            let _ = e.read();
        }
        self.0.lock().unwrap().push(format!("event {token}"));
    }
}

#[test]
fn activation_events_reset_and_stop_reach_the_thread_in_order() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let handle = WorkerHandle::spawn("test-worker", Recorder(log.clone(), None), None).unwrap();
    let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    handle.activate(notify.try_clone().unwrap()).unwrap();
    notify.write(1).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !log.lock().unwrap().iter().any(|s| s == "event 7") {
        assert!(std::time::Instant::now() < deadline, "event never handled");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(handle.reset());
    // After reset the (still open) eventfd is no longer watched.
    notify.write(1).unwrap();
    drop(handle);
    let seen = log.lock().unwrap().clone();
    assert_eq!(seen, ["start", "activate", "event 7", "reset", "reset"]);
}

fn wait_for(log: &Mutex<Vec<String>>, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !log.lock().unwrap().iter().any(|s| s == what) {
        assert!(std::time::Instant::now() < deadline, "{what} never seen");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_paused_thread_serves_nothing_until_resumed_and_stops_when_dropped() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let handle = WorkerHandle::spawn("test-worker", Recorder(log.clone(), None), None).unwrap();
    let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    handle.activate(notify.try_clone().unwrap()).unwrap();
    assert!(handle.pause());
    assert!(handle.pause(), "pausing twice");
    notify.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !log.lock().unwrap().iter().any(|s| s == "event 7"),
        "served while paused"
    );
    handle.resume();
    wait_for(&log, "event 7");
    // Dropped while paused: the thread still resets and ends (drop joins it).
    assert!(handle.pause());
    drop(handle);
    assert_eq!(log.lock().unwrap().last().unwrap(), "reset");
}

/// Makes one syscall, chosen by the test, when its eventfd fires.
struct Syscaller(fn() -> i64, Option<EventFd>, mpsc::Sender<i64>);

impl DeviceWorker for Syscaller {
    type Activation = EventFd;
    fn start(&mut self, _: &Epoll) -> std::io::Result<()> {
        Ok(())
    }
    fn activate(&mut self, epoll: &Epoll, evt: EventFd) -> Result<(), String> {
        watch(epoll, evt.as_raw_fd(), 1)?;
        self.1 = Some(evt);
        Ok(())
    }
    fn reset(&mut self, epoll: &Epoll) -> bool {
        if let Some(e) = self.1.take() {
            unwatch(epoll, e.as_raw_fd());
        }
        true
    }
    fn on_event(&mut self, _: &Epoll, _: u64) {
        if let Some(e) = &self.1 {
            let _ = e.read();
        }
        let _ = self.2.send((self.0)());
    }
}

/// In the child process: a net-io-confined worker makes the syscall named by the env var.
const CHILD_ENV: &str = "ROOTCELL_SECCOMP_CHILD";

fn tcp_socket() -> i64 {
    // SAFETY: plain syscall; the fd (if any) is leaked in a process about to end.
    i64::from(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) })
}

fn getpid() -> i64 {
    // SAFETY: no arguments.
    i64::from(unsafe { libc::getpid() })
}

#[test]
fn seccomp_child_worker() {
    // Does nothing unless started by `device_thread_is_killed_outside_its_filter`.
    let Ok(which) = std::env::var(CHILD_ENV) else {
        return;
    };
    if which == "unconfined" {
        // What the runtime's jail answers under ROOTCELL_JAIL=0.
        assert!(crate::jail::set_thread_jail(|_, _| Ok(
            crate::jail::Confine::Not
        )));
    }
    let call: fn() -> i64 = if which == "getpid" {
        getpid
    } else {
        tcp_socket
    };
    let (tx, rx) = mpsc::channel();
    let handle = WorkerHandle::spawn(
        "confined-test",
        Syscaller(call, None, tx),
        Some(Confinement {
            filter: crate::seccomp::net_io_filter,
            caps: &[],
            kind: crate::jail::ThreadKind::Net,
        }),
    )
    .unwrap();
    let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    handle.activate(notify.try_clone().unwrap()).unwrap();
    notify.write(1).unwrap();
    let got = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the syscall returned");
    drop(handle); // the confined thread also exits cleanly
    println!("CHILD-SURVIVED {got}");
}

fn run_child(which: &str) -> std::process::Output {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "devices::virtio::worker::tests::seccomp_child_worker",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, which)
        .output()
        .unwrap()
}

#[test]
fn device_thread_is_killed_outside_its_filter() {
    use std::os::unix::process::ExitStatusExt;
    // An allowed syscall: the child survives, so the setup itself is within the filter.
    let ok = run_child("getpid");
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success() && text.contains("CHILD-SURVIVED"),
        "{ok:?}"
    );
    // socket(AF_INET) from the confined device thread kills the whole process.
    let bad = run_child("forbidden");
    assert_eq!(bad.status.signal(), Some(libc::SIGSYS), "{bad:?}");
    assert!(!String::from_utf8_lossy(&bad.stdout).contains("CHILD-SURVIVED"));
    // A jail that turns confinement off for the thread turns its filter off too: the same
    // socket(AF_INET) succeeds (a descriptor, not an error).
    let off = run_child("unconfined");
    let text = String::from_utf8_lossy(&off.stdout);
    let fd: i64 = text
        .split("CHILD-SURVIVED ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{off:?}"));
    assert!(off.status.success() && fd >= 0, "{off:?}");
}

fn gettid() -> i64 {
    // SAFETY: no arguments.
    i64::from(unsafe { libc::gettid() })
}

fn task_status(tid: i64, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap()
}

/// Each device thread keeps the capabilities its confinement names (virtio-fs: the ownership
/// pass-through ones; the others: none), in effective, permitted and bounding sets, under its
/// seccomp filter. Needs root (the test process must have the capabilities to drop).
#[test]
fn device_threads_keep_only_their_capabilities() {
    let fs_mask = crate::seccomp::FS_CAPS
        .iter()
        .fold(0u64, |m, c| m | c.bitmask());
    for (filter, caps, want) in [
        (
            crate::seccomp::fs_io_filter as FilterFn,
            crate::seccomp::FS_CAPS,
            fs_mask,
        ),
        (crate::seccomp::vsock_io_filter as FilterFn, &[][..], 0),
        (crate::seccomp::net_io_filter as FilterFn, &[][..], 0),
    ] {
        let (tx, rx) = mpsc::channel();
        let handle = WorkerHandle::spawn(
            "caps-test",
            Syscaller(gettid, None, tx),
            Some(Confinement {
                filter,
                caps,
                kind: crate::jail::ThreadKind::Net,
            }),
        )
        .unwrap();
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        handle.activate(notify.try_clone().unwrap()).unwrap();
        notify.write(1).unwrap();
        let tid = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the thread answered");
        let want = format!("{want:016x}");
        for field in ["CapEff", "CapPrm", "CapBnd"] {
            assert_eq!(task_status(tid, field), want, "{field}");
        }
        for field in ["CapInh", "CapAmb"] {
            assert_eq!(task_status(tid, field), "0000000000000000", "{field}");
        }
        assert_eq!(task_status(tid, "Seccomp"), "2");
        drop(handle);
    }
}
