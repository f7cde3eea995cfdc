//! Bad input: a clear one-line error, a non-zero exit, and nothing left behind.

use rootcell_e2e::*;
use std::path::Path;

/// Runs `create` on `bundle_dir` and checks the failure: message mentions every `needles`
/// (case-insensitively), exit is non-zero, and no trace of the container remains.
fn create_fails(rt: &Runtime, bundle_dir: &Path, needles: &[&str]) -> String {
    let id = unique_id("bad");
    let o = rt.run(&["create", "--bundle", bundle_dir.to_str().unwrap(), &id]);
    let err = text(&o.stderr);
    assert_ne!(code(&o), 0, "create should fail; stderr: {err}");
    for n in needles {
        assert!(
            err.to_lowercase().contains(&n.to_lowercase()),
            "error should mention {n:?}: {err}"
        );
    }
    assert!(err.trim().lines().count() >= 1);
    assert!(
        !rt.list_ids().contains(&id),
        "failed create left the container listed"
    );
    assert_no_leftovers(rt, &id);
    err
}

#[test]
fn missing_bundle() {
    let rt = Runtime::new();
    create_fails(
        &rt,
        Path::new("/nonexistent/bundle"),
        &["/nonexistent/bundle"],
    );
}

#[test]
fn missing_config_json() {
    let rt = Runtime::new();
    let b = Bundle::new(&["true"]);
    std::fs::remove_file(b.path().join("config.json")).unwrap();
    create_fails(&rt, b.path(), &["config.json"]);
}

#[test]
fn invalid_json() {
    let rt = Runtime::new();
    let b = Bundle::new(&["true"]);
    std::fs::write(b.path().join("config.json"), b"{ \"ociVersion\": ").unwrap();
    create_fails(&rt, b.path(), &["config.json"]);
}

#[test]
fn unsupported_spec_field() {
    let rt = Runtime::new();
    // Joining an existing namespace by path cannot be honoured from inside a separate VM.
    let b = Bundle::new(&["true"]).edit(|s| {
        s["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"type": "ipc", "path": "/proc/1/ns/ipc"}));
        s["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .retain(|n| n["type"] != "ipc" || n.get("path").is_some());
    });
    create_fails(&rt, b.path(), &["ipc"]);
}

#[test]
fn rootfs_missing() {
    let rt = Runtime::new();
    let b = Bundle::new(&["true"]);
    std::fs::remove_dir_all(b.rootfs()).unwrap();
    create_fails(&rt, b.path(), &["rootfs"]);
}

#[test]
fn missing_kernel_and_initramfs() {
    let b = Bundle::new(&["true"]);
    // The bzImage is QEMU's kernel (the builtin backend boots ROOTCELL_VMLINUX).
    let rt = Runtime::new()
        .env("ROOTCELL_HYPERVISOR", "qemu")
        .env("ROOTCELL_KERNEL", "/nonexistent/bzImage");
    create_fails(&rt, b.path(), &["/nonexistent/bzImage"]);
    let rt = Runtime::new().env("ROOTCELL_INITRD", "/nonexistent/initramfs.cpio.gz");
    create_fails(&rt, b.path(), &["/nonexistent/initramfs.cpio.gz"]);
}

#[test]
fn missing_vmlinux_for_the_builtin_hypervisor() {
    let b = Bundle::new(&["true"]);
    let rt = Runtime::new()
        .env("ROOTCELL_HYPERVISOR", "builtin")
        .env("ROOTCELL_VMLINUX", "/nonexistent/vmlinux");
    create_fails(&rt, b.path(), &["/nonexistent/vmlinux", "ROOTCELL_VMLINUX"]);
}

#[test]
fn no_usable_hypervisor() {
    let b = Bundle::new(&["true"]);
    let rt = Runtime::new()
        .env("ROOTCELL_HYPERVISOR", "qemu")
        .env("ROOTCELL_QEMU", "/nonexistent/qemu-system-x86_64");
    create_fails(&rt, b.path(), &["qemu"]);
}

/// An initramfs without the agent (just `/dev`), in `dir`.
fn initramfs_without_agent(dir: &Path) -> std::path::PathBuf {
    let initrd = dir.join("empty.cpio.gz");
    let st = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "mkdir -p {d}/s/dev && cd {d}/s && find . | cpio -o -H newc --quiet | gzip > {i}",
            d = dir.display(),
            i = initrd.display()
        ))
        .status()
        .unwrap();
    assert!(st.success());
    initrd
}

#[test]
fn guest_that_never_comes_up() {
    // An initramfs without the agent: the kernel boots but nothing ever answers on vsock.
    let dir = tempfile::tempdir().unwrap();
    let initrd = initramfs_without_agent(dir.path());
    let b = Bundle::new(&["true"]);
    let rt = Runtime::new()
        .env("ROOTCELL_INITRD", initrd.to_str().unwrap())
        .env("ROOTCELL_BOOT_TIMEOUT", "20");
    create_fails(&rt, b.path(), &["guest"]);
}

/// A runtime whose guests never answer and never stop, as a guest that hangs while it boots:
/// their `/init` (busybox, from `b`'s rootfs) sleeps for good, and no agent ever listens.
fn silent_guests(dir: &Path, b: &Bundle, boot_timeout_s: u64) -> Runtime {
    let s = dir.join("s");
    std::fs::create_dir_all(s.join("bin")).unwrap();
    std::fs::create_dir_all(s.join("dev")).unwrap();
    std::fs::copy(b.rootfs().join("bin/busybox"), s.join("bin/busybox")).unwrap();
    std::fs::write(
        s.join("init"),
        "#!/bin/busybox sh\nexec /bin/busybox sleep 1000000\n",
    )
    .unwrap();
    std::fs::set_permissions(
        s.join("init"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let initrd = dir.join("silent.cpio.gz");
    let st = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {s} && find . | cpio -o -H newc --quiet | gzip > {i}",
            s = s.display(),
            i = initrd.display()
        ))
        .status()
        .unwrap();
    assert!(st.success());
    Runtime::new()
        .env("ROOTCELL_INITRD", initrd.to_str().unwrap())
        .env("ROOTCELL_BOOT_TIMEOUT", boot_timeout_s.to_string())
}

/// Starts `rootcell ARGS` with its stdout and stderr in files of the runtime's directory (the
/// sandbox inherits them: pipes would stay open); returns it and the stderr file.
fn spawn_logged(
    rt: &Runtime,
    args: &[&str],
    name: &str,
) -> (std::process::Child, std::path::PathBuf) {
    let err = rt.dir.path().join(format!("{name}.stderr"));
    let mut c = rt.command(args);
    c.stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(rt.dir.path().join(format!("{name}.stdout"))).unwrap())
        .stderr(std::fs::File::create(&err).unwrap());
    (c.spawn().expect("spawn rootcell"), err)
}

/// Nothing of container `id` is left, also no process of the runtime's scope (a VMM's command
/// line names neither the id nor the root).
fn nothing_left(rt: &Runtime, id: &str) {
    assert_no_leftovers(rt, id);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let live: Vec<_> = scope_processes(&rt.scope)
            .into_iter()
            .filter(|(pid, _)| {
                std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                    s.rsplit_once(") ")
                        .is_some_and(|(_, r)| !r.starts_with('Z'))
                })
            })
            .collect();
        if live.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "processes of container {id} left behind: {live:#?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        !run_dir(&rt.root(), id).exists(),
        "run dir of {id} left behind"
    );
}

/// A container's record (`state.json`), `Null` until there is one.
fn record(rt: &Runtime, id: &str) -> serde_json::Value {
    std::fs::read(rt.root().join(id).join("state.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Waits (up to `within`) until the record of `id` shows `what` (`holds`); returns it. The
/// failure names `what` and shows the command's stderr (`err`).
fn wait_record(
    rt: &Runtime,
    id: &str,
    what: &str,
    holds: impl Fn(&serde_json::Value) -> bool,
    err: &Path,
    within: std::time::Duration,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + within;
    loop {
        let r = record(rt, id);
        if holds(&r) {
            return r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{id}: {what} not seen within {within:?}: {r}; {}",
            std::fs::read_to_string(err).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Sends `signal` to `child` and waits for it to end, bounded by `within` (past it the child
/// and its scope are killed and the test fails); its status, how long it took, and its stderr.
fn signal_and_wait(
    child: std::process::Child,
    signal: i32,
    err: &Path,
    within: std::time::Duration,
) -> (std::process::ExitStatus, std::time::Duration, String) {
    let t = std::time::Instant::now();
    // SAFETY: kill(2) of the caller's own unreaped child.
    unsafe { libc::kill(child.id() as i32, signal) };
    let status = wait_with_timeout(child, within);
    let took = t.elapsed();
    (
        status,
        took,
        std::fs::read_to_string(err).unwrap_or_default(),
    )
}

#[test]
fn a_guest_that_never_answers_fails_run_at_the_boot_timeout_and_leaves_nothing() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let b = Bundle::new(&["true"]);
    let rt = silent_guests(dir.path(), &b, 10);
    let id = unique_id("silent");
    let t = Instant::now();
    let o = rt.run(&["run", "--bundle", b.path().to_str().unwrap(), &id]);
    let took = t.elapsed();
    let err = text(&o.stderr);
    assert_ne!(code(&o), 0, "run of a silent guest succeeded: {err}");
    // The boot timeout, plus the last vsock attempt (at most 5 s) and the VM's removal.
    assert!(
        took < Duration::from_secs(10 + 12),
        "run took {took:?} with a boot timeout of 10 s: {err}"
    );
    for needle in [
        "did not come up within 10 s",
        "hypervisor log: ",
        "last console lines",
    ] {
        assert!(err.contains(needle), "error lacks {needle:?}: {err}");
    }
    nothing_left(&rt, &id);
}

#[test]
fn sigterm_or_sigint_while_the_guest_boots_ends_run_and_create_and_leaves_nothing() {
    use std::os::unix::process::ExitStatusExt;
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    // A boot timeout far beyond the test's bounds: only the signal can end the commands in time.
    let b = Bundle::new(&["true"]);
    let rt = silent_guests(dir.path(), &b, 300);
    for (command, signal) in [("run", libc::SIGTERM), ("create", libc::SIGINT)] {
        let id = unique_id(command);
        let (child, err) = spawn_logged(
            &rt,
            &[command, "--bundle", b.path().to_str().unwrap(), &id],
            &id,
        );
        // Booting: the sandbox has started the VM (and recorded its hypervisor's pid).
        let started = |r: &serde_json::Value| r["vm_pid"].as_i64().unwrap_or(0) > 0;
        wait_record(&rt, &id, "a VM", started, &err, Duration::from_secs(60));
        std::thread::sleep(Duration::from_secs(1));
        // Bounded: a command that goes on booting is killed (with its scope) and fails here.
        let (status, took, err) = signal_and_wait(child, signal, &err, Duration::from_secs(30));
        assert_eq!(
            status.signal(),
            Some(signal),
            "{command} did not end by signal {signal} ({status:?}): {err}"
        );
        assert!(
            took < Duration::from_secs(10),
            "{command} took {took:?} to end after signal {signal}: {err}"
        );
        assert!(
            err.contains("interrupted by SIG") && err.contains("while the guest was booting"),
            "{command}: {err}"
        );
        nothing_left(&rt, &id);
    }
}

#[test]
fn sigterm_to_run_whose_guest_stopped_answering_ends_it_and_leaves_nothing() {
    use std::time::Duration;
    let rt = Runtime::new();
    let b = Bundle::new(&["sleep", "1000"]);
    let id = unique_id("frozen");
    let (child, err) = spawn_logged(
        &rt,
        &["run", "--bundle", b.path().to_str().unwrap(), &id],
        &id,
    );
    // Running (the sandbox's record says so once the guest started the process).
    let running = |r: &serde_json::Value| r["status"] == "running";
    let r = wait_record(&rt, &id, "running", running, &err, Duration::from_secs(120));
    let vm = r["vm_pid"].as_i64().unwrap_or(0) as i32;
    assert!(vm > 0, "no VMM pid in {r}");
    // The guest stops answering: its hypervisor process frozen, as a guest whose kernel hangs
    // after the container started looks from the host.
    // SAFETY: kill(2) of the VMM of a container this test made.
    unsafe { libc::kill(vm, libc::SIGSTOP) };
    // Bounded: a run that waits on the frozen guest for good is killed and fails here.
    let (status, took, err) = signal_and_wait(child, libc::SIGTERM, &err, Duration::from_secs(60));
    // The signal could not reach the guest; the VM was ended as SIGKILL would.
    assert_eq!(status.code(), Some(137), "{status:?}: {err}");
    assert!(
        took < Duration::from_secs(25),
        "run took {took:?} to end after SIGTERM: {err}"
    );
    nothing_left(&rt, &id);
}

/// `kill` to a container whose guest is dead answers as runc does for a container whose
/// process is gone: `container not running`, exit 1 (containerd's runc shim takes it for
/// "process already finished"), and with `--all` success. A guest that is there but does not
/// answer, asked to stop with SIGTERM, is ended as `run`'s forwarded SIGTERM ends it: `kill`
/// succeeds and the container stops with 137. Before, both were errors that Docker had to
/// follow with SIGKILL (`--all` on the dead one as well).
#[test]
fn kill_to_a_dead_or_stuck_guest_answers_as_runc_does() {
    use std::time::{Duration, Instant};
    let rt = Runtime::new();
    let b = Bundle::new(&["sleep", "1000"]);
    for (case, vmm_signal) in [("dead", libc::SIGKILL), ("stuck", libc::SIGSTOP)] {
        let id = unique_id(case);
        let (o, _, _) = rt.create(&b, &id);
        assert_eq!(code(&o), 0, "create failed: {}", text(&o.stderr));
        assert_eq!(code(&rt.run(&["start", &id])), 0);
        let vm = record(&rt, &id)["vm_pid"].as_i64().unwrap_or(0) as i32;
        assert!(vm > 0, "no VMM pid in {}", record(&rt, &id));
        // SAFETY: kill(2) of the VMM of a container this test made.
        assert_eq!(unsafe { libc::kill(vm, vmm_signal) }, 0);
        let t = Instant::now();
        let k = rt.run(&["kill", &id, "TERM"]);
        let took = t.elapsed();
        if case == "dead" {
            assert_eq!(code(&k), 1, "kill TERM ({case}): {}", text(&k.stderr));
            assert!(
                text(&k.stderr).contains("container not running"),
                "kill TERM ({case}): {}",
                text(&k.stderr)
            );
            let k = rt.run(&["kill", "--all", &id, "TERM"]);
            assert_eq!(code(&k), 0, "kill --all TERM ({case}): {}", text(&k.stderr));
        } else {
            // The agent's answer is awaited for 5 s (timeouts::QUICK), then the VM is ended.
            assert_eq!(code(&k), 0, "kill TERM ({case}): {}", text(&k.stderr));
            assert!(
                took < Duration::from_secs(8),
                "kill TERM ({case}) took {took:?}"
            );
        }
        rt.wait_status(&id, "stopped", Duration::from_secs(30));
        assert_eq!(record(&rt, &id)["exit_status"], 137, "{case}");
        let d = rt.run(&["delete", &id]);
        assert_eq!(code(&d), 0, "delete ({case}): {}", text(&d.stderr));
        nothing_left(&rt, &id);
    }
}

#[test]
fn duplicate_and_unknown_ids() {
    let rt = Runtime::new();
    let b = Bundle::new(&["sleep", "1000"]);
    let id = unique_id("dup");
    let (o, _, _) = rt.create(&b, &id);
    assert_eq!(code(&o), 0, "create failed: {}", text(&o.stderr));
    let again = rt.run(&["create", "--bundle", b.path().to_str().unwrap(), &id]);
    assert_ne!(code(&again), 0);
    assert!(
        text(&again.stderr).contains("already exists"),
        "duplicate: {}",
        text(&again.stderr)
    );
    assert_eq!(
        rt.state(&id)["status"],
        "created",
        "the first container is untouched"
    );
    assert_eq!(code(&rt.run(&["delete", "--force", &id])), 0);
    assert_no_leftovers(&rt, &id);

    for cmd in [&["state"][..], &["start"], &["kill"], &["delete"]] {
        let mut args = cmd.to_vec();
        args.push("no-such-container");
        let o = rt.run(&args);
        assert_ne!(code(&o), 0, "{cmd:?} on an unknown id");
        assert!(
            text(&o.stderr).contains("no-such-container"),
            "{cmd:?}: {}",
            text(&o.stderr)
        );
    }
    let bad = rt.run(&["create", "--bundle", b.path().to_str().unwrap(), "bad/id"]);
    assert_ne!(code(&bad), 0, "an id with a slash is refused");
}

#[test]
fn json_log_carries_the_error_for_dockers_shim() {
    let rt = Runtime::new();
    let log = rt.dir.path().join("log.json");
    let o = rt.run(&[
        "--log",
        log.to_str().unwrap(),
        "--log-format",
        "json",
        "create",
        "--bundle",
        "/nonexistent/b",
        "x1",
    ]);
    assert_ne!(code(&o), 0);
    let content = std::fs::read_to_string(&log).expect("log file written");
    let last: serde_json::Value =
        serde_json::from_str(content.lines().last().unwrap()).expect("last log line is JSON");
    assert_eq!(last["level"], "error");
    assert!(
        last["msg"].as_str().unwrap().contains("/nonexistent/b"),
        "msg: {last}"
    );
}

#[test]
fn repeated_global_flags_take_the_last_value_like_runc() {
    // Docker places daemon.json `runtimeArgs` before its own global flags, so an operator's
    // `--log-format json` or `--root` arrives twice; runc takes the last one.
    let rt = Runtime::new();
    let log = rt.dir.path().join("log.json");
    let decoy = rt.dir.path().join("decoy-root");
    let bundle = Bundle::new(&["sh", "-c", "echo twice-ok"]);
    let id = unique_id("twice");
    let o = rt.run(&[
        "--log-format",
        "text",
        "--root",
        decoy.to_str().unwrap(),
        "--log",
        "/nonexistent-dir/never.log",
        "--log",
        log.to_str().unwrap(),
        "--log-format",
        "json",
        "--root",
        rt.root().to_str().unwrap(),
        "--log-format",
        "json",
        "run",
        "--bundle",
        bundle.path().to_str().unwrap(),
        &id,
    ]);
    assert_eq!(
        code(&o),
        0,
        "run with repeated global flags: {}",
        text(&o.stderr)
    );
    assert_eq!(text(&o.stdout), "twice-ok\n");
    assert!(
        !decoy.exists(),
        "the first --root was overridden by the last"
    );
    // The state and the log went where the last flags said.
    let ls = rt.run(&[
        "--root",
        "/nonexistent-root",
        "--root",
        rt.root().to_str().unwrap(),
        "list",
        "-q",
    ]);
    assert_eq!(code(&ls), 0, "list: {}", text(&ls.stderr));
    assert_no_leftovers(&rt, &id);
}

#[test]
fn a_command_line_error_reaches_the_log_file_as_json() {
    // containerd's shim shows the last JSON error line of --log; a flag rootcell does not know
    // must show up there too, not only on stderr.
    let rt = Runtime::new();
    let log = rt.dir.path().join("log.json");
    let o = rt.run(&[
        "--log",
        log.to_str().unwrap(),
        "--log-format",
        "json",
        "create",
        "--no-such-flag",
        "--bundle",
        "/b",
        "x1",
    ]);
    assert_ne!(code(&o), 0, "an unknown flag is an error");
    assert!(
        text(&o.stderr).contains("--no-such-flag"),
        "stderr names the flag: {}",
        text(&o.stderr)
    );
    let content = std::fs::read_to_string(&log).expect("the parse error was written to --log");
    let last: serde_json::Value = serde_json::from_str(content.lines().last().unwrap())
        .unwrap_or_else(|e| panic!("last log line is not JSON ({e}): {content}"));
    assert_eq!(last["level"], "error", "{last}");
    assert!(
        last["msg"].as_str().unwrap().contains("--no-such-flag"),
        "msg: {last}"
    );
    assert!(last["time"].as_str().is_some(), "{last}");
}

#[test]
fn a_network_the_vm_cannot_have_is_refused() {
    let rt = Runtime::new();
    let net = |path: Option<&str>| {
        Bundle::new(&["true"]).edit(|s| {
            let ns = s["linux"]["namespaces"].as_array_mut().unwrap();
            ns.retain(|n| n["type"] != "network");
            if let Some(p) = path {
                ns.push(serde_json::json!({"type": "network", "path": p}));
            }
        })
    };
    create_fails(
        &rt,
        net(None).path(),
        &["linux.namespaces", "host's network stack"],
    );
    create_fails(
        &rt,
        net(Some("/run/netns/rootcell-absent")).path(),
        &["/run/netns/rootcell-absent", "cannot be opened"],
    );
    // kthreadd (pid 2) lives in the host network namespace.
    create_fails(
        &rt,
        net(Some("/proc/2/ns/net")).path(),
        &["host's network namespace"],
    );
}

#[test]
fn an_interface_that_cannot_be_mirrored_is_refused_and_nothing_is_left() {
    let rt = Runtime::new();
    let ns = NetNs::new("rc-bridge");
    // A bridge is not an endpoint a VM card can stand in for.
    ns.sh("ip link add rcbr0 type bridge && ip addr add 10.215.0.1/24 dev rcbr0 && ip link set rcbr0 up");
    let before = ns.sh("ip -o link; tc qdisc show");
    let b = Bundle::new(&["true"]).edit(|s| {
        let nss = s["linux"]["namespaces"].as_array_mut().unwrap();
        nss.retain(|n| n["type"] != "network");
        nss.push(serde_json::json!({"type": "network", "path": ns.path()}));
    });
    create_fails(&rt, b.path(), &["rcbr0", "bridge"]);
    assert_eq!(
        ns.sh("ip -o link; tc qdisc show"),
        before,
        "the failed create changed the namespace"
    );
}
