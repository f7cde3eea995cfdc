//! Every process the agent starts reports exactly one exit, and nothing on the host waits
//! forever for one: a stuck guest console, exec storms with signals, a killed exec relay.

use rootcell_e2e::*;
use std::io::{BufRead, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A bundle whose process sleeps, with `/gate` bound to a host directory the test controls.
fn gated_bundle(gate: &Path) -> Bundle {
    Bundle::new(&["sleep", "1000"]).edit(|s| {
        s["mounts"].as_array_mut().unwrap().push(serde_json::json!({
            "destination": "/gate", "type": "bind", "source": gate, "options": ["rbind", "rw"]
        }));
    })
}

fn create_and_start(rt: &Runtime, bundle: &Bundle, prefix: &str) -> String {
    let id = unique_id(prefix);
    let (o, _, _) = rt.create(bundle, &id);
    assert_eq!(code(&o), 0, "create failed: {}", text(&o.stderr));
    assert_eq!(code(&rt.run(&["start", &id])), 0, "start failed");
    id
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    let r = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(r, 0, "mkfifo {}", path.display());
}

fn open_rdwr_nonblock(path: &Path) -> OwnedFd {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: open with a valid path; the fd is owned by the returned OwnedFd.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    assert!(fd >= 0, "open {}", path.display());
    // SAFETY: fd was just opened and is ours alone.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// The guest's serial console stops draining (QEMU's end of it is a pipe the test stops
/// reading, as when the host side of a console stalls or the guest stops getting its transmit
/// interrupts): the agent's log lines then cannot be written. Exits must still be reported:
/// before the fix, the reaper logged each exit before reporting it and stopped there for good,
/// so the exec relay waited forever, as in issue 13.
#[test]
fn exits_are_reported_while_the_guest_console_is_stuck() {
    let work = tempfile::tempdir().unwrap();
    let fifo = work.path().join("console");
    mkfifo(&fifo.with_extension("in"));
    mkfifo(&fifo.with_extension("out"));
    // Held open by the test for the whole run: QEMU opens the same pipes, and the pipe keeps the
    // one-page size set here (less room, so the console fills after a few KiB).
    let _input = open_rdwr_nonblock(&fifo.with_extension("in"));
    let out = open_rdwr_nonblock(&fifo.with_extension("out"));
    // SAFETY: F_SETPIPE_SZ on a pipe fd we own.
    let size = unsafe { libc::fcntl(out.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    assert_eq!(size, 4096, "F_SETPIPE_SZ");
    let wrapper = work.path().join("qemu.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n# The runtime's -serial file:.../console.log becomes the test's pipe.\n\
             for a in \"$@\"; do shift; case \"$a\" in file:*console.log) a=pipe:{};; esac; set -- \"$@\" \"$a\"; done\n\
             exec qemu-system-x86_64 \"$@\"\n",
            fifo.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();

    // Drain the console (and keep what it said) until the test stops it.
    let console = Arc::new(Mutex::new(Vec::<u8>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let drain = {
        let (console, stop) = (console.clone(), stop.clone());
        let fd = out.as_raw_fd();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stop.load(Ordering::SeqCst) {
                // SAFETY: reading into a local buffer from the fd the test keeps open.
                let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                if n > 0 {
                    console
                        .lock()
                        .unwrap()
                        .extend_from_slice(&buf[..n as usize]);
                } else {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        })
    };
    let said = |what: &str| -> usize {
        String::from_utf8_lossy(&console.lock().unwrap())
            .matches(what)
            .count()
    };

    // Unjailed: the wrapper swaps the console for the test's pipe by path, which a jailed
    // QEMU (console passed as an fd, the test's directory not in its root) could not open.
    let rt = Runtime::new()
        .env("ROOTCELL_QEMU", wrapper.to_str().unwrap())
        .env("ROOTCELL_HYPERVISOR", "qemu")
        .env("ROOTCELL_JAIL", "0");
    let gate = tempfile::tempdir().unwrap();
    let bundle = gated_bundle(gate.path());
    let id = create_and_start(&rt, &bundle, "stuck");
    let o = rt.run(&["exec", &id, "sh", "-c", "exit 3"]);
    assert_eq!(
        code(&o),
        3,
        "exec before the console stalls: {}",
        text(&o.stderr)
    );

    // An exec that ends only when the test says so, after the console has stopped.
    let mut waiter = rt.command(&[
        "exec",
        &id,
        "sh",
        "-c",
        "while [ ! -e /gate/go ]; do sleep 0.1; done; exit 9",
    ]);
    waiter.stdin(Stdio::null()).stdout(Stdio::null());
    let waiter = waiter.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while said(": pid ") < 2 {
        assert!(
            Instant::now() < deadline,
            "the second exec never started: {}",
            String::from_utf8_lossy(&console.lock().unwrap())
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Stop draining; the agent's log lines about missing programs with long names fill the
    // pipe, then the guest's own transmit buffer.
    stop.store(true, Ordering::SeqCst);
    drain.join().unwrap();
    let long = format!("/{}", "no-such-dir/".repeat(130));
    for _ in 0..5 {
        let o = rt.run(&["exec", &id, &long]);
        assert_eq!(
            code(&o),
            127,
            "exec of a missing program while the console is stuck: {}",
            text(&o.stderr)
        );
    }
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD into a local int on a pipe fd we own.
    unsafe { libc::ioctl(out.as_raw_fd(), libc::FIONREAD, &mut queued) };
    assert_eq!(
        queued, 4096,
        "the guest's console is full (bytes waiting in its pipe)"
    );

    std::fs::write(gate.path().join("go"), b"").unwrap();
    let status = wait_with_timeout(waiter, Duration::from_secs(90));
    assert_eq!(
        status.code(),
        Some(9),
        "an exec that exits while the console is stuck reports its own status"
    );
    let o = rt.run(&["exec", &id, "sh", "-c", "exit 7"]);
    assert_eq!(code(&o), 7, "exec after the stall: {}", text(&o.stderr));
    assert_eq!(code(&rt.run(&["delete", "--force", &id])), 0);
    assert_no_leftovers(&rt, &id);
}

/// Runs `rootcell exec` of a process that arms a TERM trap, waits for it to say so, sends
/// TERM to the exec's host process and returns its exit status.
fn exec_and_term(rt: &Runtime, id: &str, status: i32) -> Option<i32> {
    let script = format!("trap 'exit {status}' TERM; echo armed; while :; do sleep 0.1; done");
    let mut c = rt.command(&["exec", id, "sh", "-c", &script]);
    c.stdin(Stdio::null()).stdout(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let pid = child.id() as i32;
    let mut line = String::new();
    let mut r = std::io::BufReader::new(child.stdout.take().unwrap());
    let got = bounded(COMMAND_TIMEOUT, pid, move || {
        r.read_line(&mut line).ok();
        line
    });
    assert_eq!(
        got.trim_end(),
        "armed",
        "exec {status} never armed its trap"
    );
    // SAFETY: kill(2) of the exec process this test started; not reaped yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    wait_with_timeout(child, COMMAND_TIMEOUT).code()
}

/// Runs `f` on a thread; if it takes longer than `limit`, kills `pid` and its scope (which ends
/// whatever `f` reads) and panics.
fn bounded<T: Send + 'static>(
    limit: Duration,
    pid: i32,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(_) => {
            let killed = kill_tree(pid);
            panic!("no answer within {limit:?} from pid {pid}; killed {killed:#?}");
        }
    }
}

/// Ten concurrent execs into one container, twice: half exit on their own with their own
/// status, half are sent TERM through their host process while others start and end. Every
/// status is the one the process gave, and the container is untouched.
#[test]
fn exec_storm_with_signals_reports_every_status() {
    let rt = Runtime::new();
    let bundle = Bundle::new(&["sleep", "1000"]);
    let id = create_and_start(&rt, &bundle, "storm");
    for round in 0..2 {
        let results: Vec<(i32, Option<i32>)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..10)
                .map(|i| {
                    let want = 10 * round + i + 1;
                    let (rt, id) = (&rt, &id);
                    s.spawn(move || {
                        let got = if i % 2 == 0 {
                            let o = rt.run(&["exec", id, "sh", "-c", &format!("exit {want}")]);
                            o.status.code()
                        } else {
                            exec_and_term(rt, id, want)
                        };
                        (want, got)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (want, got) in results {
            assert_eq!(got, Some(want), "round {round}: exec that gave {want}");
        }
    }
    assert_eq!(rt.state(&id)["status"], "running");
    assert_eq!(code(&rt.run(&["delete", "--force", &id])), 0);
    assert_no_leftovers(&rt, &id);
}

/// SIGKILL of an exec's host process (its relay; Docker's shim signals that pid) cannot be
/// forwarded: the process in the guest is killed with it instead of running on unseen.
#[test]
fn killing_an_exec_relay_kills_its_guest_process() {
    let rt = Runtime::new();
    let bundle = Bundle::new(&["sleep", "1000"]);
    let id = create_and_start(&rt, &bundle, "relay");
    let mut c = rt.command(&["exec", &id, "sh", "-c", "echo armed; exec sleep 777"]);
    c.stdin(Stdio::null()).stdout(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let pid = child.id() as i32;
    let mut r = std::io::BufReader::new(child.stdout.take().unwrap());
    let line = bounded(COMMAND_TIMEOUT, pid, move || {
        let mut l = String::new();
        r.read_line(&mut l).ok();
        (l, r)
    });
    assert_eq!(line.0.trim_end(), "armed");
    let relay = scope_processes(&rt.scope)
        .into_iter()
        .find(|(_, cmd)| cmd.contains("exec-relay"))
        .expect("the exec relay is running");
    // SAFETY: kill(2) of the relay this test's exec started.
    assert_eq!(unsafe { libc::kill(relay.0, libc::SIGKILL) }, 0);
    let status = wait_with_timeout(child, COMMAND_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(137),
        "rootcell exec reports its relay's SIGKILL"
    );
    let mut rest = String::new();
    let _ = line.1.into_inner().read_to_string(&mut rest);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = rt.run(&["exec", &id, "ps", "-o", "args"]);
        assert_eq!(code(&o), 0, "ps in the container: {}", text(&o.stderr));
        if !text(&o.stdout).contains("sleep 777") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the exec's process outlived its killed relay: {}",
            text(&o.stdout)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(rt.state(&id)["status"], "running");
    assert_eq!(code(&rt.run(&["delete", "--force", &id])), 0);
    assert_no_leftovers(&rt, &id);
}
