//! Container lifecycle through the runc-style commands, against real guests.

use rootcell_e2e::*;
use std::time::Duration;

#[test]
fn create_start_state_exit_delete() {
    let rt = Runtime::new();
    // The process blocks until a file appears in a bind mount, so the test controls when it exits.
    let gate = tempfile::tempdir().unwrap();
    let bundle = Bundle::new(&["sh", "-c", "while [ ! -e /gate/go ]; do sleep 0.1; done; echo finished"]).edit(|s| {
        s["mounts"].as_array_mut().unwrap().push(serde_json::json!({
            "destination": "/gate", "type": "bind", "source": gate.path(), "options": ["rbind", "rw"]
        }));
    });
    let id = unique_id("life");

    let (o, out, _err) = rt.create(&bundle, &id);
    assert_eq!(code(&o), 0, "create failed: {}", text(&o.stderr));
    let st = rt.state(&id);
    assert_eq!(st["status"], "created");
    assert_eq!(st["id"], id.as_str());
    assert!(
        st["pid"].as_i64().unwrap() > 0,
        "created container has a host pid: {st}"
    );
    assert_eq!(
        st["bundle"].as_str().unwrap(),
        bundle.path().to_str().unwrap()
    );
    assert!(
        st["ociVersion"].is_string() && st["created"].is_string(),
        "state has ociVersion and created: {st}"
    );
    let pid_file = rt.dir.path().join(format!("{id}.pid"));
    let pid: i64 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(st["pid"].as_i64().unwrap(), pid, "pid file matches state");
    assert!(rt.list_ids().contains(&id));

    let o = rt.run(&["start", &id]);
    assert_eq!(code(&o), 0, "start failed: {}", text(&o.stderr));
    assert_eq!(rt.state(&id)["status"], "running");
    // Starting twice is an error, as with runc.
    assert_ne!(code(&rt.run(&["start", &id])), 0);

    std::fs::write(gate.path().join("go"), b"").unwrap();
    rt.wait_status(&id, "stopped", Duration::from_secs(60));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "finished\n");
    // kill on a stopped container gives runc's wording, which Docker's shim matches.
    let k = rt.run(&["kill", &id, "TERM"]);
    assert_ne!(code(&k), 0);
    assert!(
        text(&k.stderr).contains("container not running"),
        "kill on stopped: {}",
        text(&k.stderr)
    );

    let o = rt.run(&["delete", &id]);
    assert_eq!(code(&o), 0, "delete failed: {}", text(&o.stderr));
    assert!(!rt.list_ids().contains(&id));
    assert_ne!(
        code(&rt.run(&["state", &id])),
        0,
        "state of a deleted container fails"
    );
    // A second delete --force on a container already gone succeeds (Docker's shim does this).
    assert_eq!(code(&rt.run(&["delete", "--force", &id])), 0);
    assert_no_leftovers(&rt, &id);
}

#[test]
fn run_reports_root_and_guest_kernel() {
    let rt = Runtime::new();
    let bundle = Bundle::new(&["sh", "-c", "id -u; id -g; uname -r"]);
    let id = unique_id("run");
    let o = rt.run(&["run", "--bundle", bundle.path().to_str().unwrap(), &id]);
    assert_eq!(code(&o), 0, "run failed: {}", text(&o.stderr));
    let out = text(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "unexpected output: {out:?}");
    assert_eq!(lines[0], "0", "uid inside is root");
    assert_eq!(lines[1], "0", "gid inside is root");
    assert_eq!(
        lines[2], rt.art.kernel_release,
        "uname -r inside is the guest kernel"
    );
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_ne!(
        lines[2],
        host.trim(),
        "guest kernel differs from the host's"
    );
    // run deletes the container when it finishes.
    assert!(!rt.list_ids().contains(&id));
    assert_no_leftovers(&rt, &id);
}

#[test]
fn delete_refuses_running_container_without_force() {
    let rt = Runtime::new();
    let bundle = Bundle::new(&["sleep", "1000"]);
    let id = unique_id("del");
    let (o, _, _) = rt.create(&bundle, &id);
    assert_eq!(code(&o), 0, "create failed: {}", text(&o.stderr));
    assert_eq!(code(&rt.run(&["start", &id])), 0);
    let d = rt.run(&["delete", &id]);
    assert_ne!(code(&d), 0);
    assert!(
        text(&d.stderr).contains("not stopped"),
        "delete running: {}",
        text(&d.stderr)
    );
    assert_eq!(
        rt.state(&id)["status"],
        "running",
        "a refused delete leaves the container alone"
    );
    let d = rt.run(&["delete", "--force", &id]);
    assert_eq!(code(&d), 0, "delete --force failed: {}", text(&d.stderr));
    assert_no_leftovers(&rt, &id);
}

#[test]
fn sigkill_of_sandbox_then_delete_force_leaves_nothing() {
    let rt = Runtime::new();
    kill_sandbox_then_delete_force(&rt, &Bundle::new(&["sleep", "1000"]), &unique_id("k9"));
}

/// Creates and starts container `id` of `bundle`, SIGKILLs its sandbox, waits for it to show
/// as stopped, runs `delete --force` and asserts that nothing of it is left.
fn kill_sandbox_then_delete_force(rt: &Runtime, bundle: &Bundle, id: &str) {
    let (o, _, _) = rt.create(bundle, id);
    assert_eq!(code(&o), 0, "create failed: {}", text(&o.stderr));
    assert_eq!(code(&rt.run(&["start", id])), 0);
    let pid = rt.state(id)["pid"].as_i64().unwrap() as i32;
    // SAFETY: plain kill(2) of the sandbox pid this test created.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    rt.wait_status(id, "stopped", Duration::from_secs(30));
    let d = rt.run(&["delete", "--force", id]);
    assert_eq!(code(&d), 0, "delete --force failed: {}", text(&d.stderr));
    assert_no_leftovers(rt, id);
}

#[test]
fn exec_passes_exit_status_and_forwards_signals_from_its_host_process() {
    use std::io::BufRead;
    let rt = Runtime::new();
    let bundle = Bundle::new(&["sleep", "1000"]);
    let id = unique_id("exec");
    let (o, _, _) = rt.create(&bundle, &id);
    assert_eq!(code(&o), 0, "create failed: {}", text(&o.stderr));
    assert_eq!(code(&rt.run(&["start", &id])), 0);

    let o = rt.run(&["exec", &id, "sh", "-c", "echo in-exec; exit 5"]);
    assert_eq!(code(&o), 5, "exec exit status: {}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "in-exec\n");

    // A signal sent to the exec's host process (as Docker's shim does with kill(2)) reaches the
    // process in the guest, whose trap decides the exit status.
    let mut c = rt.command(&[
        "exec",
        &id,
        "sh",
        "-c",
        "trap 'echo got-term; exit 42' TERM; echo armed; while :; do sleep 0.1; done",
    ]);
    c.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    let pid = child.id() as i32;
    // Bound the wait for "armed" so a broken exec cannot hang the suite.
    let (done, cancelled) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if cancelled.recv_timeout(COMMAND_TIMEOUT)
            == Err(std::sync::mpsc::RecvTimeoutError::Timeout)
        {
            // The exec's relay holds the pipe too: end the whole scope, not just `rootcell exec`.
            let killed = kill_tree(pid);
            eprintln!("exec did not finish in time; killed {killed:#?}");
        }
    });
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().and_then(|l| l.ok()).as_deref(), Some("armed"));
    // SAFETY: kill(2) of the exec process this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert_eq!(
        lines.next().and_then(|l| l.ok()).as_deref(),
        Some("got-term")
    );
    let status = wait_with_timeout(child, COMMAND_TIMEOUT);
    drop(done);
    watchdog.join().unwrap();
    assert_eq!(
        status.code(),
        Some(42),
        "exec host process exits with the guest process's status"
    );
    assert_eq!(
        rt.state(&id)["status"],
        "running",
        "the container lives on after its exec ended"
    );

    assert_eq!(code(&rt.run(&["delete", "--force", &id])), 0);
    assert_no_leftovers(&rt, &id);
}

#[test]
fn a_failing_poststart_or_poststop_hook_does_not_stop_the_others() {
    // Runtime spec: a failing poststart or poststop hook is logged as a warning and the
    // remaining hooks of that phase still run.
    let rt = Runtime::new();
    let marks = tempfile::tempdir().unwrap();
    let hook =
        |script: String| serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c", script]});
    let mark = |name: &str| marks.path().join(name);
    let hooks = serde_json::json!({
        "poststart": [
            hook("echo poststart-boom >&2; exit 3".into()),
            hook(format!("touch {}", mark("poststart-2").display())),
        ],
        "poststop": [
            hook(format!("touch {}", mark("poststop-1").display())),
            hook("exit 4".into()),
            hook(format!("touch {}", mark("poststop-3").display())),
        ],
    });
    let bundle = Bundle::new(&["true"]).edit(|s| s["hooks"] = hooks);
    let id = unique_id("hooks");
    let o = rt.run(&["run", "--bundle", bundle.path().to_str().unwrap(), &id]);
    assert_eq!(code(&o), 0, "run with failing hooks: {}", text(&o.stderr));
    for m in ["poststart-2", "poststop-1", "poststop-3"] {
        assert!(
            mark(m).exists(),
            "hook {m} did not run; stderr: {}",
            text(&o.stderr)
        );
    }
    assert!(
        text(&o.stderr).contains("poststart-boom"),
        "the failure is reported as a warning: {}",
        text(&o.stderr)
    );
    assert_no_leftovers(&rt, &id);
}

/// The directories cgroup `rel` has (or would have) in every mounted hierarchy.
fn host_cgroup_dirs(rel: &str) -> Vec<std::path::PathBuf> {
    let base = std::path::Path::new("/sys/fs/cgroup");
    if base.join("cgroup.procs").exists() {
        return vec![base.join(rel)];
    }
    let mut dirs: Vec<_> = std::fs::read_dir(base)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("cgroup.procs").exists() && !p.is_symlink())
        .map(|p| p.join(rel))
        .collect();
    dirs.sort();
    dirs
}

/// Removes cgroup directories a failed test left (best effort, after its containers are gone).
struct CgroupCleanup(Vec<std::path::PathBuf>);

impl Drop for CgroupCleanup {
    fn drop(&mut self) {
        for d in &self.0 {
            for _ in 0..100 {
                if !d.exists() || std::fs::remove_dir(d).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

#[test]
fn delete_force_removes_the_host_cgroups_of_created_and_running_containers() {
    for start in [false, true] {
        let rt = Runtime::new();
        let id = unique_id("cgdel");
        let rel = format!("rootcell-e2e-{id}");
        let dirs = host_cgroup_dirs(&rel);
        let _cleanup = CgroupCleanup(dirs.clone());
        let bundle = Bundle::new(&["sleep", "1000"])
            .edit(|s| s["linux"]["cgroupsPath"] = serde_json::json!(format!("/{rel}")));
        let (o, _, _) = rt.create(&bundle, &id);
        assert_eq!(code(&o), 0, "create failed: {}", text(&o.stderr));
        assert!(
            dirs.iter().all(|d| d.is_dir()),
            "the sandbox joined its cgroup in every hierarchy: {dirs:?}"
        );
        if start {
            assert_eq!(code(&rt.run(&["start", &id])), 0);
        }
        let d = rt.run(&["delete", "--force", &id]);
        assert_eq!(code(&d), 0, "delete --force: {}", text(&d.stderr));
        let left: Vec<_> = dirs.iter().filter(|d| d.exists()).collect();
        assert!(
            left.is_empty(),
            "delete --force of a {} container left its host cgroups: {left:?}",
            if start { "running" } else { "created" }
        );
        assert_no_leftovers(&rt, &id);
    }
}

#[test]
fn delete_force_of_a_missing_or_half_removed_container_succeeds_and_leaves_nothing() {
    let rt = Runtime::new();
    let d = rt.run(&["delete", "--force", "never-existed"]);
    assert_eq!(
        code(&d),
        0,
        "delete --force of a missing container: {}",
        text(&d.stderr)
    );
    let d = rt.run(&["delete", "never-existed"]);
    assert_ne!(
        code(&d),
        0,
        "plain delete of a missing container is an error"
    );
    assert!(
        text(&d.stderr).contains("does not exist"),
        "{}",
        text(&d.stderr)
    );

    let bundle = Bundle::new(&["sleep", "1000"]);
    for case in [
        "run dir gone",
        "state file gone",
        "both gone",
        "state file gone, sandbox alive",
    ] {
        let id = unique_id("half");
        let (o, _, _) = rt.create(&bundle, &id);
        assert_eq!(code(&o), 0, "create failed: {}", text(&o.stderr));
        assert_eq!(code(&rt.run(&["start", &id])), 0);
        if case == "state file gone, sandbox alive" {
            std::fs::remove_file(rt.root().join(&id).join("state.json")).unwrap();
            let d = rt.run(&["delete", "--force", &id]);
            assert_eq!(code(&d), 0, "delete --force ({case}): {}", text(&d.stderr));
            assert_no_leftovers(&rt, &id);
            assert!(!run_dir(&rt.root(), &id).exists(), "run dir left ({case})");
            continue;
        }
        let pid = rt.state(&id)["pid"].as_i64().unwrap() as i32;
        // SAFETY: plain kill(2) of the sandbox pid this test created.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        rt.wait_status(&id, "stopped", Duration::from_secs(30));
        // The sandbox (and its private mounts) are gone: the run dir holds only empty entries.
        if case != "state file gone" {
            std::fs::remove_dir_all(run_dir(&rt.root(), &id)).unwrap();
        }
        if case != "run dir gone" {
            std::fs::remove_file(rt.root().join(&id).join("state.json")).unwrap();
        }
        let d = rt.run(&["delete", "--force", &id]);
        assert_eq!(code(&d), 0, "delete --force ({case}): {}", text(&d.stderr));
        assert!(!rt.root().join(&id).exists(), "state dir left ({case})");
        assert!(!run_dir(&rt.root(), &id).exists(), "run dir left ({case})");
        assert_no_leftovers(&rt, &id);
    }
}

#[test]
fn delete_then_delete_force_eight_ms_later_succeed_and_poststop_runs_once() {
    // containerd 1.7 runs `delete --force` ~8 ms after its shim's own `delete`: the forced one
    // returns 0 whatever the other did, the container's poststop hooks run once (this one takes
    // a while, so the second delete arrives while the first is still at work), nothing is left.
    // Which of the two takes the container is a race on a slow CPU (the nested-KVM lane): the
    // plain one either deletes it or finds it gone, as runc's would.
    let rt = Runtime::new();
    let marks = tempfile::tempdir().unwrap();
    let log = marks.path().join("poststop");
    let bundle = Bundle::new(&["true"]).edit(|s| {
        s["hooks"] = serde_json::json!({"poststop": [
            {"path": "/bin/sh", "args": ["sh", "-c", format!("echo ran >> {}; sleep 0.3", log.display())]}
        ]})
    });
    for round in 0..3 {
        let id = unique_id("race");
        let (o, _, _) = rt.create(&bundle, &id);
        assert_eq!(code(&o), 0, "create failed: {}", text(&o.stderr));
        assert_eq!(code(&rt.run(&["start", &id])), 0);
        rt.wait_status(&id, "stopped", Duration::from_secs(30));
        let mut plain = rt.command(&["delete", &id]);
        plain
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let first = plain.spawn().unwrap();
        std::thread::sleep(Duration::from_millis(8));
        let forced = rt.run(&["delete", "--force", &id]);
        let first = wait_output(first);
        let gone = text(&first.stderr).contains(&format!("container {id} does not exist"));
        assert!(
            first.status.success() || gone,
            "round {round}: delete: {}",
            text(&first.stderr)
        );
        assert_eq!(
            code(&forced),
            0,
            "round {round}: delete --force 8 ms after delete: {}",
            text(&forced.stderr)
        );
        assert_no_leftovers(&rt, &id);
        let runs = std::fs::read_to_string(&log).unwrap_or_default();
        assert_eq!(
            runs.lines().count(),
            round + 1,
            "round {round}: poststop hooks run once per container"
        );
    }
}

/// Waits (bounded) for a spawned command and collects its stderr.
fn wait_output(mut child: std::process::Child) -> std::process::Output {
    use std::io::Read;
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        b
    });
    let status = wait_with_timeout(child, COMMAND_TIMEOUT);
    std::process::Output {
        status,
        stdout: Vec::new(),
        stderr: reader.join().unwrap(),
    }
}

/// A state dir removed by hand under a running container (an admin's `rm -rf`, a wiped root):
/// `delete --force` finds what is left by the names its processes carry (the sandbox, and the
/// VMM named `<root>/<id>`), ends them, removes the container's cgroup and run dir, and says so
/// in its log only. A container whose id has this one's as a prefix is left running. (Before,
/// `delete --force` returned 0 at once and the sandbox, QEMU, run dir and cgroups stayed.)
#[test]
fn delete_force_after_the_state_dir_was_removed_by_hand_ends_the_vm() {
    let rt = Runtime::new();
    let id = unique_id("rmd");
    let sibling = format!("{id}b");
    let rels = [&id, &sibling].map(|i| format!("rootcell-e2e-{i}"));
    let dirs = rels.clone().map(|r| host_cgroup_dirs(&r));
    let _cleanup = CgroupCleanup(dirs.concat());
    for (i, rel) in [&id, &sibling].iter().zip(&rels) {
        let bundle = Bundle::new(&["sleep", "1000"])
            .edit(|s| s["linux"]["cgroupsPath"] = serde_json::json!(format!("/{rel}")));
        let (o, _, _) = rt.create(&bundle, i);
        assert_eq!(code(&o), 0, "create {i}: {}", text(&o.stderr));
        assert_eq!(code(&rt.run(&["start", i])), 0);
    }
    let sandbox = |i: &str| rt.state(i)["pid"].as_i64().unwrap() as i32;
    let (gone, kept) = (sandbox(&id), sandbox(&sibling));
    // The VMM is the sandbox's child; the sibling's must outlive the delete too.
    let children = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default()
    };
    let gone_vmm: i32 = children(gone)
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no VMM under sandbox {gone}"));
    let kept_vmm = children(kept).trim().to_string();
    assert!(!kept_vmm.is_empty(), "no VMM under sandbox {kept}");

    std::fs::remove_dir_all(rt.root().join(&id)).unwrap();
    let log = rt.dir.path().join("delete.log");
    let d = rt.run(&["--log", log.to_str().unwrap(), "delete", "--force", &id]);
    assert_eq!(code(&d), 0, "delete --force: {}", text(&d.stderr));
    assert!(
        d.stderr.is_empty(),
        "nothing on stderr: {}",
        text(&d.stderr)
    );
    let dead = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
    };
    // Bounded: the VMM goes with its sandbox's process group, a moment later.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !(dead(gone) && dead(gone_vmm)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        dead(gone),
        "sandbox {gone} of {id} still alive after delete --force"
    );
    assert!(
        dead(gone_vmm),
        "VMM {gone_vmm} of {id} still alive after delete --force"
    );
    let left: Vec<_> = dirs[0].iter().filter(|d| d.exists()).collect();
    assert!(left.is_empty(), "cgroups of {id} left: {left:?}");
    assert!(!run_dir(&rt.root(), &id).exists(), "run dir of {id} left");
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        logged.contains(&format!(
            "killing a leftover sandbox or exec relay of container {id}"
        )),
        "the log says what was ended: {logged}"
    );

    assert_eq!(
        rt.state(&sibling)["status"],
        "running",
        "{sibling} was left alone"
    );
    assert_eq!(
        children(kept).trim(),
        kept_vmm,
        "{sibling}'s VMM was left alone"
    );
    assert!(
        dirs[1].iter().all(|d| d.exists()),
        "{sibling}'s cgroups were left alone"
    );

    let d = rt.run(&["delete", "--force", &sibling]);
    assert_eq!(code(&d), 0, "delete --force {sibling}: {}", text(&d.stderr));
    // The sibling's processes name the same root: only now can nothing be left.
    assert_no_leftovers(&rt, &id);
    assert_no_leftovers(&rt, &sibling);
}

/// SIGKILL of the sandbox of a container in a network namespace that outlives it (a pod's,
/// one made with `ip netns`, as CNI does): its VMM dies with it (its death signal), and with
/// the VMM the tap, but the ingress qdisc and redirect on the container's interface stay, as
/// nobody was left to remove them. `delete --force` leaves no process, mount or directory, and
/// removes them; the next container in that namespace starts and reaches the peer (before,
/// both stayed and its create failed: "adding an ingress qdisc to eth0: File exists").
#[test]
fn sigkill_of_sandbox_in_a_kept_network_namespace_then_delete_force_and_the_next_container_starts()
{
    let rt = Runtime::new();
    let ns = rootcell_e2e::netns::NetNs::new("rc-k9");
    let peer = rootcell_e2e::netns::NetNs::new("rc-k9p");
    ns.sh(&format!(
        "ip link add eth0 type veth peer name rcpeer0 netns {peer} \
         && ip addr add 10.218.0.2/24 dev eth0 && ip link set eth0 up",
        peer = peer.name()
    ));
    peer.sh("ip addr add 10.218.0.1/24 dev rcpeer0 && ip link set rcpeer0 up");
    let before = ns.sh("ip -o link; tc qdisc show");
    let in_ns = |args: &[&str]| {
        Bundle::new(args).edit(|s| {
            let n = s["linux"]["namespaces"].as_array_mut().unwrap();
            n.retain(|n| n["type"] != "network");
            n.push(serde_json::json!({"type": "network", "path": ns.path()}));
        })
    };
    kill_sandbox_then_delete_force(&rt, &in_ns(&["sleep", "1000"]), &unique_id("k9ns"));
    assert_eq!(
        ns.sh("ip -o link; tc qdisc show"),
        before,
        "tap or tc filter left behind by the killed sandbox"
    );

    let next = unique_id("k9next");
    let o = rt.run(&[
        "run",
        "--bundle",
        in_ns(&[
            "sh",
            "-c",
            "ping -c 1 -W 5 10.218.0.1 >/dev/null && echo reached",
        ])
        .path()
        .to_str()
        .unwrap(),
        &next,
    ]);
    assert_eq!(
        (code(&o), text(&o.stdout).trim()),
        (0, "reached"),
        "the next container in the namespace: {}",
        text(&o.stderr)
    );
    assert_eq!(
        ns.sh("ip -o link; tc qdisc show"),
        before,
        "tap or tc filter left behind by the next container"
    );
    assert_no_leftovers(&rt, &next);
}
