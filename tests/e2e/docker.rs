//! Docker 20.10 drives rootcell as a `daemon.json`-style runtime: what `docker run` users do, on
//! real guests, through a private dockerd (see `rootcell_e2e::docker`).
//!
//! `docker26.rs` runs these same tests against Debian 13's Docker 26 and containerd 1.7: it
//! includes this file as a module and gives it its own `daemon()`, which every test here reaches
//! as `crate::daemon()`.

use rootcell_e2e::docker::{
    inspect, logs, ok, run_detached, run_rm, wait_until, DockerDaemon, IMAGE,
};
use rootcell_e2e::*;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The daemon the tests drive when this file is its own test binary: the host's Docker.
#[allow(dead_code)] // unused where docker26.rs includes this file with a daemon of its own
fn daemon() -> &'static DockerDaemon {
    rootcell_e2e::docker::daemon()
}

#[test]
fn run_prints_root_and_guest_kernel_under_both_names() {
    let d = crate::daemon();
    let release = artifacts().kernel_release;
    for runtime in ["rootcell", "kata-runtime"] {
        let o = d.docker(&[
            "run",
            "--rm",
            "--runtime",
            runtime,
            IMAGE,
            "sh",
            "-c",
            "id -u; uname -r",
        ]);
        assert_eq!(
            code(&o),
            0,
            "{runtime}: {}\n{}",
            text(&o.stderr),
            d.log_tail(20)
        );
        assert_eq!(text(&o.stdout), format!("0\n{release}\n"), "{runtime}");
    }
    assert_ne!(
        release,
        text(
            &std::process::Command::new("uname")
                .arg("-r")
                .output()
                .unwrap()
                .stdout
        )
        .trim()
    );
}

#[test]
fn exit_codes_and_runtime_errors() {
    let d = crate::daemon();
    assert_eq!(code(&run_rm(d, &[], &["true"])), 0);
    assert_eq!(code(&run_rm(d, &[], &["sh", "-c", "exit 3"])), 3);

    let id = run_detached(d, &[], "sleep 1; exit 5");
    assert_eq!(
        ok(d, &["wait", &id]).trim(),
        "5",
        "docker wait prints the exit code"
    );
    assert_eq!(inspect(d, &id, "{{.State.ExitCode}}"), "5");
    ok(d, &["rm", &id]);

    let o = run_rm(d, &[], &["no-such-command"]);
    assert_eq!(code(&o), 127, "stderr: {}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("executable file not found"),
        "Docker shows the runtime's message: {}",
        text(&o.stderr)
    );

    let o = run_rm(d, &[], &["/etc/passwd"]);
    assert_eq!(code(&o), 126, "stderr: {}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("permission denied"),
        "stderr: {}",
        text(&o.stderr)
    );
}

#[test]
fn fifty_mib_through_run_i_unchanged() {
    let d = crate::daemon();
    let mut data = vec![0u8; 50 << 20];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut data)
        .unwrap();
    let want = Sha256::digest(&data);
    let started = Instant::now();
    let o = d.docker_with_input(
        &["run", "--rm", "-i", "--runtime", "rootcell", IMAGE, "cat"],
        data,
    );
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    assert_eq!(o.stdout.len(), 50 << 20, "all bytes came back");
    assert_eq!(Sha256::digest(&o.stdout), want, "bytes came back unchanged");
    eprintln!(
        "50 MiB through docker run -i in {:.1} s (boot included)",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn detached_logs_kill_stop_restart_rm() {
    let d = crate::daemon();
    // Ignores TERM, reports USR1, ticks so `docker logs` has something to show.
    let id = run_detached(
        d,
        &[],
        "trap '' TERM; trap 'echo got-usr1' USR1; i=0; while true; do echo tick-$i; i=$((i+1)); sleep 0.2; done",
    );
    wait_until("ticks in docker logs", Duration::from_secs(60), || {
        logs(d, &id).contains("tick-2")
    });
    assert_eq!(inspect(d, &id, "{{.State.Status}}"), "running");

    ok(d, &["kill", "-s", "USR1", &id]);
    wait_until("the USR1 trap output", Duration::from_secs(20), || {
        logs(d, &id).contains("got-usr1")
    });
    assert_eq!(
        inspect(d, &id, "{{.State.Status}}"),
        "running",
        "USR1 is trapped, not fatal"
    );

    let started = Instant::now();
    ok(d, &["stop", "-t", "2", &id]);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1900),
        "TERM was ignored, so stop waits its timeout: {took:?}"
    );
    assert!(
        took < Duration::from_secs(15),
        "KILL ends it soon after the timeout: {took:?}"
    );
    assert_eq!(inspect(d, &id, "{{.State.Status}}"), "exited");
    assert_eq!(
        inspect(d, &id, "{{.State.ExitCode}}"),
        "137",
        "killed by KILL"
    );

    ok(d, &["restart", "-t", "1", &id]);
    assert_eq!(inspect(d, &id, "{{.State.Status}}"), "running");
    let ticks = || logs(d, &id).matches("tick-0").count();
    wait_until(
        "ticks from the restarted container",
        Duration::from_secs(60),
        || ticks() >= 2,
    );

    ok(d, &["rm", "-f", &id]);
    let o = d.docker(&["inspect", &id]);
    assert!(!o.status.success(), "container is gone after rm -f");
}

#[test]
fn exec_into_a_running_container_while_it_writes() {
    let d = crate::daemon();
    let id = run_detached(
        d,
        &[],
        "i=0; while true; do echo line-$i; i=$((i+1)); sleep 0.1; done",
    );
    wait_until("the container writes", Duration::from_secs(60), || {
        logs(d, &id).contains("line-3")
    });

    assert_eq!(
        ok(d, &["exec", &id, "sh", "-c", "echo from-exec; id -u"]),
        "from-exec\n0\n"
    );
    let o = d.docker_with_input(
        &["exec", "-i", &id, "sh", "-c", "cat; echo done"],
        b"piped input\n".to_vec(),
    );
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "piped input\ndone\n");
    assert_eq!(
        ok(
            d,
            &["exec", "-u", "1000:1001", &id, "sh", "-c", "id -u; id -g"]
        ),
        "1000\n1001\n"
    );
    assert_eq!(ok(d, &["exec", "-w", "/tmp", &id, "pwd"]), "/tmp\n");
    assert_eq!(
        ok(
            d,
            &[
                "exec",
                "-e",
                "GREETING=hi there",
                &id,
                "sh",
                "-c",
                "echo $GREETING"
            ]
        ),
        "hi there\n"
    );
    // The exec sees the container's own processes (same pid namespace).
    assert!(
        ok(d, &["exec", &id, "ps"]).contains("sleep"),
        "exec runs next to the container's process"
    );
    let o = d.docker(&["exec", &id, "sh", "-c", "exit 7"]);
    assert_eq!(code(&o), 7, "stderr: {}", text(&o.stderr));

    // The container kept writing through all of this.
    let before = logs(d, &id).lines().count();
    wait_until(
        "more output after the execs",
        Duration::from_secs(20),
        || logs(d, &id).lines().count() > before,
    );
    ok(d, &["rm", "-f", &id]);
}

#[test]
fn run_options_reach_the_container() {
    let d = crate::daemon();
    let rw = tempfile::tempdir().unwrap();
    let ro = tempfile::tempdir().unwrap();
    std::fs::write(ro.path().join("input"), "host-data\n").unwrap();
    let rw_arg = format!("{}:/data", rw.path().display());
    let ro_arg = format!("{}:/ro:ro", ro.path().display());
    let script = "echo hello > /data/out; chown 1234:5678 /data/out; \
        touch /ro/x 2>/dev/null && echo ro-writable || echo ro-denied; cat /ro/input; \
        echo tmpfs=$(grep ' /scratch ' /proc/mounts | cut -d' ' -f3); \
        pwd; echo FOO=$FOO; hostname; ulimit -n; ulimit -Hn; \
        echo ifaces=$(ls /sys/class/net); \
        mount -t tmpfs t /mnt 2>/dev/null && echo mount-ok || echo mount-denied";
    let o = run_rm(
        d,
        &[
            "-v",
            &rw_arg,
            "-v",
            &ro_arg,
            "--tmpfs",
            "/scratch",
            "-w",
            "/data",
            "-e",
            "FOO=bar",
            "--hostname",
            "myhost",
            "--ulimit",
            "nofile=123:456",
            "--network",
            "none",
        ],
        &["sh", "-c", script],
    );
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    let lines: Vec<String> = text(&o.stdout).lines().map(String::from).collect();
    // --network none: loopback only.
    let ifaces: Vec<&str> = lines[8]
        .trim_start_matches("ifaces=")
        .split_whitespace()
        .collect();
    assert_eq!(
        ifaces,
        ["lo"],
        "interfaces with --network none: {}",
        lines[8]
    );
    assert_eq!(
        [&lines[..8], &lines[9..]].concat(),
        [
            "ro-denied",
            "host-data",
            "tmpfs=tmpfs",
            "/data",
            "FOO=bar",
            "myhost",
            "123",
            "456",
            "mount-denied"
        ],
        "stderr: {}",
        text(&o.stderr)
    );
    let out = rw.path().join("out");
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "hello\n",
        "write visible on the host"
    );
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&out).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (1234, 5678),
        "chown preserved on the host"
    );
    assert!(!ro.path().join("x").exists());

    let o = run_rm(
        d,
        &["--read-only", "-u", "1000:1000"],
        &[
            "sh",
            "-c",
            "id -u; id -g; touch /x 2>/dev/null && echo rw || echo ro",
        ],
    );
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "1000\n1000\nro\n");

    let host_mounts = d.mountinfo();
    for extra in [&["--privileged"][..], &["--cap-add", "SYS_ADMIN"][..]] {
        let o = run_rm(d, extra, &["sh", "-c", "mount -t tmpfs guest-only-tmpfs /mnt && grep guest-only-tmpfs /proc/mounts | cut -d' ' -f2"]);
        assert_eq!(code(&o), 0, "{extra:?}: {}", text(&o.stderr));
        assert_eq!(text(&o.stdout), "/mnt\n", "{extra:?}");
    }
    let after = d.mountinfo();
    assert!(
        !after.contains("guest-only-tmpfs"),
        "the host is unaffected"
    );
    assert_eq!(
        host_mounts.lines().filter(|l| l.contains(" /mnt ")).count(),
        after.lines().filter(|l| l.contains(" /mnt ")).count()
    );
}

#[test]
fn memory_cpus_and_pids_limits() {
    let d = crate::daemon();
    // The container's own cgroup in the guest holds its limits, as runc's does on the host.
    let script =
        "grep MemTotal /proc/meminfo; nproc; cg=/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup); \
        echo $(cat $cg/memory.max) $(cat $cg/pids.max); \
        (for i in $(seq 40); do sleep 600 & done); echo forked; exec sleep 600";
    let id = run_detached(
        d,
        &["--memory", "300m", "--cpus", "1.5", "--pids-limit", "20"],
        script,
    );
    wait_until("the limits in the logs", Duration::from_secs(60), || {
        logs(d, &id).contains("forked")
    });
    let out = logs(d, &id);
    let lines: Vec<&str> = out.lines().collect();
    let kib: u64 = lines[0]
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    // The VM has room for the guest kernel and agent on top of the container's 300 MiB.
    assert!(
        (300 * 1024..=364 * 1024).contains(&kib),
        "guest MemTotal {kib} kB for --memory 300m"
    );
    assert_eq!(
        lines[2],
        format!("{} 20", 300 << 20),
        "memory.max and pids.max: {out}"
    );
    // The 40 background sleeps ran into --pids-limit 20 (the shell that forks them gives up).
    assert!(
        out.contains("can't fork"),
        "no fork failed under --pids-limit 20: {out}"
    );
    // 1.5 CPUs of quota need 2 vCPUs (at most the host's).
    let host_cpus = std::thread::available_parallelism().unwrap().get().min(2);
    assert_eq!(
        lines[1],
        host_cpus.to_string().as_str(),
        "vCPUs for --cpus 1.5"
    );
    let full = inspect(d, &id, "{{.Id}}");
    assert_eq!(
        host_cpu_quota(&full),
        "150000",
        "the VM's host CPU time is capped at 1.5 CPUs"
    );
    ok(d, &["rm", "-f", &id]);
}

#[test]
fn oom_kills_in_the_guest_reach_docker() {
    let d = crate::daemon();
    let stopped = |id: &str| {
        wait_until("the container to stop", Duration::from_secs(60), || {
            inspect(d, id, "{{.State.Running}}") == "false"
        })
    };
    // Control: a 137 from `docker kill` is not an OOM kill.
    let id = run_detached(d, &["--memory", "128m"], "sleep 600");
    ok(d, &["kill", &id]);
    stopped(&id);
    assert_eq!(
        inspect(d, &id, "{{.State.ExitCode}} {{.State.OOMKilled}}"),
        "137 false"
    );
    ok(d, &["rm", &id]);

    // The main process takes more than its 128 MiB: the guest's OOM killer ends it and Docker
    // says so, as with runc.
    let id = run_detached(
        d,
        &["--memory", "128m"],
        "exec dd if=/dev/zero of=/dev/null bs=150M count=1",
    );
    assert_eq!(ok(d, &["wait", &id]).trim(), "137", "{}", logs(d, &id));
    assert_eq!(
        inspect(d, &id, "{{.State.OOMKilled}}"),
        "true",
        "{}",
        logs(d, &id)
    );
    ok(d, &["rm", &id]);

    // Another process of the container is OOM-killed; the container lives on.
    let id = run_detached(
        d,
        &["--memory", "128m"],
        "dd if=/dev/zero of=/dev/null bs=150M count=1; echo after-oom $?; sleep 600",
    );
    wait_until("the OOM kill", Duration::from_secs(120), || {
        logs(d, &id).contains("after-oom")
    });
    assert!(logs(d, &id).contains("after-oom 137"), "{}", logs(d, &id));
    let since = inspect(d, &id, "{{.Created}}");
    wait_until("Docker's oom event", Duration::from_secs(30), || {
        let until = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            .to_string();
        let filter = format!("container={id}");
        ok(
            d,
            &[
                "events",
                "--since",
                &since,
                "--until",
                &until,
                "--filter",
                &filter,
                "--filter",
                "event=oom",
            ],
        )
        .contains(" oom ")
    });
    // The host saw one real OOM kill in the VM's cgroup (the relay's child), the cgroup's limit
    // is back, the relay's holding cgroup is gone and the VM lives.
    let full = inspect(d, &id, "{{.Id}}");
    // v1: the memory hierarchy's oom_control and limit; v2: the unified cgroup's events and max.
    let (cg, events, max) = if cgroup_v2() {
        (
            format!("/sys/fs/cgroup/docker/{full}"),
            "memory.events",
            "memory.max",
        )
    } else {
        (
            format!("/sys/fs/cgroup/memory/docker/{full}"),
            "memory.oom_control",
            "memory.limit_in_bytes",
        )
    };
    let control = std::fs::read_to_string(format!("{cg}/{events}")).unwrap();
    assert!(control.lines().any(|l| l == "oom_kill 1"), "{control}");
    let limit = std::fs::read_to_string(format!("{cg}/{max}")).unwrap();
    let parent =
        std::fs::read_to_string(std::path::Path::new(&cg).parent().unwrap().join(max)).unwrap();
    assert_eq!(
        limit, parent,
        "the host cgroup's memory limit was not restored"
    );
    assert!(
        !std::path::Path::new(&format!("{cg}.oom-relay")).exists(),
        "holding cgroup left behind"
    );
    assert_eq!(ok(d, &["exec", &id, "echo", "alive"]).trim(), "alive");
    ok(d, &["kill", &id]);
    stopped(&id);
    assert_eq!(inspect(d, &id, "{{.State.OOMKilled}}"), "true");
    ok(d, &["rm", "-f", &id]);
}

/// A pty pair: (master, slave).
fn openpty(rows: u16, cols: u16) -> (OwnedFd, OwnedFd) {
    let (mut m, mut s) = (0, 0);
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: plain out-parameters and a valid winsize.
    let r = unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
    assert_eq!(r, 0, "openpty");
    // SAFETY: fresh fds owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) }
}

#[test]
fn tty_session_types_reads_and_resizes() {
    let d = crate::daemon();
    let (master, slave) = openpty(24, 80);
    let name = unique_id("rc-tty");
    let mut cmd = d.command(&[
        "run",
        "-it",
        "--rm",
        "--name",
        &name,
        "--runtime",
        "rootcell",
        IMAGE,
        "sh",
    ]);
    cmd.stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave));
    // SAFETY: setsid and TIOCSCTTY only, between fork and exec: the docker client gets the pty
    // as its controlling terminal, so resizes reach it as SIGWINCH like in a real terminal.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawn docker run -it");
    let seen = Arc::new(Mutex::new(String::new()));
    let mut reader = std::fs::File::from(master.try_clone().unwrap());
    let sink = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let mut writer = std::fs::File::from(master.try_clone().unwrap());
    let expect = |needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if seen.lock().unwrap().contains(needle) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on the terminal; saw {:?}",
                seen.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // The typed text never contains the expected output, so the echo cannot satisfy it.
    writer
        .write_all(b"echo $((6*7))x; tty; stty size\n")
        .unwrap();
    expect("42x");
    // The first `stty size` has failed now and then (about 1 run in 6) with "stty: standard input:
    // No child processes" right after `tty` succeeded on the same terminal; cause not found
    // (issue notes). The size must still be right: asked again, bounded.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen.lock().unwrap().contains("24 80") {
        assert!(
            Instant::now() < deadline,
            "no \"24 80\" on the terminal; saw {:?}",
            seen.lock().unwrap()
        );
        if seen.lock().unwrap().contains("No child processes") {
            writer.write_all(b"stty size\n").unwrap();
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        !seen.lock().unwrap().contains("not a tty"),
        "stdin is a terminal"
    );
    let ws = libc::winsize {
        ws_row: 33,
        ws_col: 101,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ on our pty master with a valid winsize.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    assert_eq!(rc, 0);
    // The resize travels client -> dockerd -> shim -> pty master -> rootcell -> guest: retry.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        writer.write_all(b"stty size\n").unwrap();
        std::thread::sleep(Duration::from_millis(500));
        if seen.lock().unwrap().contains("33 101") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "resize never reached the guest; saw {:?}",
            seen.lock().unwrap()
        );
    }
    // `docker exec -t` into the same container gets a terminal of its own.
    let o = d.docker(&[
        "exec",
        "-t",
        &name,
        "sh",
        "-c",
        "[ -t 0 ] && [ -t 1 ] && echo exec-has-a-tty",
    ]);
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    assert_eq!(
        text(&o.stdout),
        "exec-has-a-tty\r\n",
        "a pty turns \\n into \\r\\n"
    );
    writer.write_all(b"exit 4\n").unwrap();
    let status = wait_with_timeout(child, COMMAND_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(4),
        "docker run -it exits with the shell's code"
    );
}

#[test]
fn top_pause_unpause_update_and_stats() {
    let d = crate::daemon();
    let id = run_detached(
        d,
        &[],
        "i=0; while true; do echo n-$i; i=$((i+1)); sleep 0.1; done",
    );
    wait_until("output", Duration::from_secs(60), || {
        logs(d, &id).contains("n-3")
    });

    let top = ok(d, &["top", &id]);
    assert!(
        top.starts_with("UID") || top.contains("PID"),
        "docker top has a header: {top}"
    );
    assert!(
        top.lines().count() >= 2,
        "docker top lists the container's processes: {top}"
    );

    ok(d, &["pause", &id]);
    assert_eq!(inspect(d, &id, "{{.State.Status}}"), "paused");
    let frozen = logs(d, &id).lines().count();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        logs(d, &id).lines().count(),
        frozen,
        "no output while paused"
    );
    ok(d, &["unpause", &id]);
    assert_eq!(inspect(d, &id, "{{.State.Status}}"), "running");
    wait_until("output after unpause", Duration::from_secs(20), || {
        logs(d, &id).lines().count() > frozen
    });

    // docker update: the CPU quota lands on the host cgroup that holds the VM; memory and pids
    // limits on the container's cgroup in the guest, memory only within the VM's fixed RAM
    // (512 MiB by default), and Docker shows why when it does not fit.
    ok(d, &["update", "--cpus", "0.5", &id]);
    let full = inspect(d, &id, "{{.Id}}");
    assert_eq!(
        host_cpu_quota(&full),
        "50000",
        "host CPU quota for --cpus 0.5"
    );
    ok(
        d,
        &[
            "update",
            "--memory",
            "200m",
            "--memory-swap",
            "400m",
            "--pids-limit",
            "50",
            &id,
        ],
    );
    let limits = "cg=/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup); echo $(cat $cg/memory.max $cg/pids.max)";
    assert_eq!(
        ok(d, &["exec", &id, "sh", "-c", limits]).trim(),
        format!("{} 50", 200 << 20)
    );
    let o = d.docker(&["update", "--memory", "2g", "--memory-swap", "4g", &id]);
    assert!(!o.status.success(), "2 GiB do not fit in a 512 MiB VM");
    assert!(
        text(&o.stderr).contains("this VM has room for"),
        "stderr: {}",
        text(&o.stderr)
    );
    assert_eq!(
        ok(d, &["exec", &id, "sh", "-c", limits]).trim(),
        format!("{} 50", 200 << 20)
    );

    let mem = ok(
        d,
        &["stats", "--no-stream", "--format", "{{.MemUsage}}", &id],
    );
    let used = mem.split('/').next().unwrap().trim();
    let number: f64 = used
        .trim_end_matches(|c: char| c.is_ascii_alphabetic())
        .parse()
        .unwrap_or_else(|_| panic!("{mem}"));
    assert!(number > 0.0, "docker stats shows the VM's memory: {mem}");
    ok(d, &["rm", "-f", &id]);
}

#[test]
fn rm_f_of_ten_running_containers_leaves_nothing() {
    let d = crate::daemon();
    let ids: Vec<String> = (0..10)
        .map(|_| run_detached(d, &[], "while true; do sleep 1; done"))
        .collect();
    for id in &ids {
        assert_eq!(inspect(d, id, "{{.State.Status}}"), "running");
    }
    let root = d.runtime_root();
    let dirs: Vec<_> = ids.iter().map(|id| run_dir(&root, id)).collect();
    assert!(
        dirs.iter().all(|p| p.exists()),
        "the run dirs exist while the containers run"
    );
    let mut args = vec!["rm", "-f"];
    args.extend(ids.iter().map(String::as_str));
    ok(d, &args);

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut left = Vec::new();
        for (id, dir) in ids.iter().zip(&dirs) {
            left.extend(processes_mentioning(id));
            left.extend(processes_mentioning(&dir.to_string_lossy()));
        }
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "processes left behind: {left:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mounts = d.mountinfo();
    for (id, dir) in ids.iter().zip(&dirs) {
        let dir_s = dir.to_string_lossy();
        let leaked: Vec<&str> = mounts
            .lines()
            .filter(|l| l.contains(id.as_str()) || l.contains(&*dir_s))
            .collect();
        assert!(leaked.is_empty(), "mounts left behind: {leaked:#?}");
        assert!(
            !dir.exists(),
            "run dir (sockets, share) left behind: {}",
            dir.display()
        );
        assert!(!root.join(id).exists(), "state left behind for {id}");
    }
}

/// Whether the host's cgroups are v2, one unified hierarchy (the nested lane's L1; these hosts
/// are v1). Docker's cgroupfs driver puts a container at `docker/<id>` in either.
fn cgroup_v2() -> bool {
    std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

/// The CPU quota (µs per period) on a container's host cgroup: v1 `cpu.cfs_quota_us`, or the
/// first field of v2 `cpu.max`.
fn host_cpu_quota(full_id: &str) -> String {
    let path = if cgroup_v2() {
        format!("/sys/fs/cgroup/docker/{full_id}/cpu.max")
    } else {
        format!("/sys/fs/cgroup/cpu/docker/{full_id}/cpu.cfs_quota_us")
    };
    let v = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    v.split_whitespace().next().unwrap_or_default().to_string()
}

/// CPU time charged to a container's host cgroup (v1 cpuacct, v2 `cpu.stat`), in seconds.
fn cpuacct_secs(full_id: &str) -> f64 {
    if cgroup_v2() {
        let path = format!("/sys/fs/cgroup/docker/{full_id}/cpu.stat");
        let stat = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let usec: u64 = stat
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no usage_usec in {path}:\n{stat}"));
        return usec as f64 / 1e6;
    }
    // cpuacct is mounted alone on these hosts, co-mounted with cpu on others.
    let path = ["cpuacct", "cpu,cpuacct"]
        .iter()
        .map(|h| format!("/sys/fs/cgroup/{h}/docker/{full_id}/cpuacct.usage"))
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or_else(|| panic!("no cpuacct cgroup for container {full_id}"));
    let ns: u64 = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim()
        .parse()
        .unwrap();
    ns as f64 / 1e9
}

/// The CPU time (user + system, whole lifetime, every thread) of the processes now in a
/// container's host cgroup: the sandbox and its VMM, with everything they spent booting.
fn cgroup_processes_cpu_secs(full_id: &str) -> f64 {
    let dir = if cgroup_v2() {
        format!("/sys/fs/cgroup/docker/{full_id}")
    } else {
        ["cpuacct", "cpu,cpuacct"]
            .iter()
            .map(|h| format!("/sys/fs/cgroup/{h}/docker/{full_id}"))
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or_else(|| panic!("no cpuacct cgroup for container {full_id}"))
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let procs = std::fs::read_to_string(format!("{dir}/cgroup.procs")).unwrap();
    let ticks: u64 = procs
        .split_whitespace()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .map(|stat| {
            // Fields after the command name (which may hold spaces): state is field 3, utime 14.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<&str> = rest.split_whitespace().collect();
            f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
        })
        .sum();
    ticks as f64 / hz
}

#[test]
fn booting_the_vm_is_not_charged_to_the_container_but_its_work_is() {
    // INGInious reads a grading container's CPU time from this cgroup and kills it past its
    // limit: booting the guest (2-4 CPU-s under TCG) must not count, the container's work must.
    let d = crate::daemon();
    let id = run_detached(d, &[], "exec sleep 600");
    let full = inspect(d, &id, "{{.Id}}");
    std::thread::sleep(Duration::from_secs(2));
    let idle = cpuacct_secs(&full);
    // Against what the VM's processes spent in all, boot included: an idle guest costs its VMM
    // next to nothing on a host, but a visible share under nested KVM (the nested lane's L1
    // measured 0.98 CPU-s charged 5 s after start, of a boot of several), so the bound is that
    // most of what they spent was not charged.
    let spent = cgroup_processes_cpu_secs(&full);
    assert!(
        idle < 0.5 * spent,
        "an idle container started 2 s ago has been charged {idle:.2} CPU-s of the {spent:.2} its VM's processes spent (the boot?)"
    );
    // Work in the guest shows up there, and in docker stats.
    ok(
        d,
        &[
            "exec",
            &id,
            "sh",
            "-c",
            "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done",
        ],
    );
    let busy = cpuacct_secs(&full);
    assert!(
        busy > idle + 0.3,
        "a busy loop in the guest was not charged to the container's cgroup ({idle:.2} -> {busy:.2} CPU-s)"
    );
    let stats = ok(
        d,
        &["stats", "--no-stream", "--format", "{{.CPUPerc}}", &id],
    );
    assert!(
        stats.trim().ends_with('%'),
        "docker stats shows a CPU figure: {stats}"
    );
    println!("idle container after 2 s: {idle:.3} CPU-s charged of {spent:.3} spent; after a busy exec: {busy:.3} CPU-s");
    ok(d, &["rm", "-f", &id]);
}

/// Docker: `--network container:A` puts the second container in A's VM; `docker exec` reaches
/// each; removing the second leaves A serving; removing A last leaves nothing.
#[test]
fn docker_network_container_mode_shares_the_vm() {
    let d = crate::daemon();
    let a = run_detached(d, &[], LOCAL_SERVER);
    let net = format!("container:{a}");
    let script = format!("{LOCAL_FETCH}; test -e /a-only || echo own-root");
    let o = d.docker(&[
        "run",
        "--rm",
        "--runtime",
        "rootcell",
        "--network",
        &net,
        IMAGE,
        "sh",
        "-c",
        &script,
    ]);
    assert_eq!(code(&o), 0, "{}\n{}", text(&o.stderr), d.log_tail(20));
    assert_eq!(text(&o.stdout), "hello-from-a\nown-root\n");

    let b = run_detached(d, &["--network", &net], "echo b > /b-only; exec sleep 1000");
    let exec = |id: &str, script: &str| ok(d, &["exec", id, "sh", "-c", script]);
    wait_until(
        "the second container's file",
        Duration::from_secs(30),
        || d.docker(&["exec", &b, "cat", "/b-only"]).status.success(),
    );
    assert_eq!(
        exec(&b, "cat /b-only; test -e /a-only || echo no-a"),
        "b\nno-a\n"
    );
    assert_eq!(
        exec(&a, "cat /a-only; test -e /b-only || echo no-b"),
        "a\nno-b\n"
    );
    ok(d, &["rm", "-f", &b]);
    assert_eq!(
        exec(&a, "wget -q -O - http://127.0.0.1:8080/"),
        "hello-from-a\n",
        "A serves after B is removed"
    );
    ok(d, &["rm", "-f", &a]);

    // A runc container's namespace: refused, saying why, and nothing is left.
    let r = ok(
        d,
        &["run", "-d", "--runtime", "runc", IMAGE, "sleep", "1000"],
    );
    let r = r.trim().to_string();
    let o = d.docker(&[
        "run",
        "--rm",
        "--runtime",
        "rootcell",
        "--network",
        &format!("container:{r}"),
        IMAGE,
        "true",
    ]);
    assert_ne!(
        code(&o),
        0,
        "joining a runc container's network was accepted"
    );
    assert!(
        text(&o.stderr).contains("already used by process"),
        "the refusal says why: {}",
        text(&o.stderr)
    );
    ok(d, &["rm", "-f", &r]);
    let root = d.runtime_root();
    for id in [&a, &b] {
        wait_until(
            "the container's processes to end",
            Duration::from_secs(15),
            || processes_mentioning(id).is_empty(),
        );
        assert!(
            !root.join(id).exists(),
            "state of {id} left in {}",
            root.display()
        );
    }
}
