//! Containers that share a VM (issue 14): a container whose spec joins a running rootcell
//! container's namespaces runs in that container's VM, with its own rootfs, stdio, exit status
//! and lifecycle; joins that cannot work are refused with one line and leave nothing. (Docker's
//! `--network container:` is in docker.rs, so it also runs against Docker 26.)

use rootcell_e2e::docker::wait_until;
use rootcell_e2e::*;
use serde_json::json;
use std::time::{Duration, Instant};

/// Sets namespace `kind`'s path in a spec (adding the namespace if missing).
fn join_ns(spec: &mut serde_json::Value, kind: &str, path: &str) {
    let list = spec["linux"]["namespaces"].as_array_mut().unwrap();
    list.retain(|n| n["type"] != kind);
    list.push(json!({"type": kind, "path": path}));
}

/// The VMM processes (QEMU, or the built-in VMM's `rootcell builtin-vmm`) of container `id`
/// under `root`: their command lines name its state dir (`-name guest=<root>/<id>`,
/// `--for <root>/<id>`).
fn vmms_of(root: &std::path::Path, id: &str) -> Vec<String> {
    let needle = root.join(id).to_string_lossy().into_owned();
    processes_mentioning(&needle)
        .into_iter()
        .filter(|p| p.contains("qemu-system") || p.contains("builtin-vmm"))
        .collect()
}

/// Whether container `id` (state under `root`) runs a VMM of its own: QEMU or the built-in
/// VMM's process (the record's `vm_pid`), or vCPU threads (`vcpuN`) in its sandbox process
/// (where an older built-in VMM ran them). A container in another's VM has neither.
fn runs_own_vmm(root: &std::path::Path, id: &str) -> bool {
    let path = root.join(id).join("state.json");
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap();
    if record["vm_pid"].as_i64().unwrap_or(0) > 0 {
        return true;
    }
    let pid = record["pid"].as_i64().unwrap_or(0);
    pid > 0
        && std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|tasks| {
            tasks.flatten().any(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("vcpu"))
            })
        })
}

/// Nothing of container `id` is left (while other containers of the same root may run): no
/// process, state or run dir, no mount in this namespace or in any sandbox's.
fn nothing_of(rt: &Runtime, id: &str) {
    wait_until(
        "the container's processes to end",
        Duration::from_secs(10),
        || processes_mentioning(id).is_empty(),
    );
    assert!(
        !rt.root().join(id).exists(),
        "state dir of {id} left behind"
    );
    assert!(
        !run_dir(&rt.root(), id).exists(),
        "run dir of {id} left behind"
    );
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(m) = std::fs::read_to_string(e.path().join("mountinfo")) {
            assert!(
                !m.contains(&format!("/{id}/")),
                "a mount of {id} is left in the namespace of {}",
                e.path().display()
            );
        }
    }
}

#[test]
fn a_second_container_runs_in_the_first_ones_vm_with_its_own_root() {
    let rt = Runtime::new();
    let a = unique_id("vm-a");
    let b = unique_id("vm-b");
    let a_bundle = Bundle::new(&["sh", "-c", LOCAL_SERVER]);
    let (o, _, _) = rt.create(&a_bundle, &a);
    assert_eq!(code(&o), 0, "create {a}: {}", text(&o.stderr));
    assert_eq!(code(&rt.run(&["start", &a])), 0);
    let a_pid = rt.state(&a)["pid"].as_i64().unwrap();

    let script = format!(
        "{LOCAL_FETCH}; test -e /a-only || echo own-root; echo b > /b-only; echo fetched; exec sleep 1000"
    );
    let b_bundle = Bundle::new(&["sh", "-c", &script]).edit(|s| {
        join_ns(s, "network", &format!("/proc/{a_pid}/ns/net"));
    });
    let started = Instant::now();
    let (o, b_out, _) = rt.create(&b_bundle, &b);
    assert_eq!(code(&o), 0, "create {b}: {}", text(&o.stderr));
    assert_eq!(code(&rt.run(&["start", &b])), 0);
    wait_until(
        "the second container's fetch",
        Duration::from_secs(60),
        || std::fs::read_to_string(&b_out).is_ok_and(|s| s.contains("fetched")),
    );
    eprintln!(
        "second container: create to fetched in {:?}",
        started.elapsed()
    );
    assert_eq!(
        std::fs::read_to_string(&b_out).unwrap(),
        "hello-from-a\nown-root\nfetched\n",
        "the second container reached the first's server on 127.0.0.1 and has its own root"
    );
    // One VM: the first's (its VMM found by its command line, which names the container), none
    // of the second's own.
    let b_run = run_dir(&rt.root(), &b);
    let vmms = vmms_of(&rt.root(), &a);
    assert_eq!(vmms.len(), 1, "the first container's VMM: {vmms:?}");
    assert_eq!(
        vmms_of(&rt.root(), &b),
        Vec::<String>::new(),
        "the second container booted no VM"
    );
    // Also on the built-in VMM (its VM in a `builtin-vmm` process under the sandbox, recorded
    // as the state's vm_pid).
    assert!(
        runs_own_vmm(&rt.root(), &a) && !runs_own_vmm(&rt.root(), &b),
        "the first container runs the VM, the second none of its own"
    );
    let host_pid_b = rt.state(&b)["pid"].as_i64().unwrap();
    assert!(
        host_pid_b > 0 && host_pid_b != a_pid,
        "each has its own host process"
    );

    // exec into each sees its own root.
    let o = rt.run(&[
        "exec",
        &a,
        "sh",
        "-c",
        "cat /a-only; test -e /b-only || echo no-b",
    ]);
    assert_eq!(
        text(&o.stdout),
        "a\nno-b\n",
        "exec into the first: {}",
        text(&o.stderr)
    );
    let o = rt.run(&[
        "exec",
        &b,
        "sh",
        "-c",
        "cat /b-only; test -e /a-only || echo no-a",
    ]);
    assert_eq!(
        text(&o.stdout),
        "b\nno-a\n",
        "exec into the second: {}",
        text(&o.stderr)
    );

    // What the first container's server answers, fetched from inside it.
    let served = || {
        let o = rt.run(&[
            "exec",
            &a,
            "wget",
            "-q",
            "-O",
            "-",
            "http://127.0.0.1:8080/",
        ]);
        text(&o.stdout) + &text(&o.stderr)
    };

    // Pausing the second freezes only it.
    assert_eq!(code(&rt.run(&["pause", &b])), 0);
    assert_eq!(rt.state(&b)["status"], "paused");
    assert_eq!(
        served(),
        "hello-from-a\n",
        "the first serves while the second is paused"
    );
    assert_eq!(code(&rt.run(&["resume", &b])), 0);
    assert_eq!(rt.state(&b)["status"], "running");

    // A third, killed with SIGKILL at its sandbox, then deleted: its entries leave the first's
    // share too.
    let c = unique_id("vm-c");
    let c_bundle = Bundle::new(&["sleep", "1000"]).edit(|s| {
        join_ns(s, "network", &format!("/proc/{a_pid}/ns/net"));
    });
    let (o, _, _) = rt.create(&c_bundle, &c);
    assert_eq!(code(&o), 0, "create {c}: {}", text(&o.stderr));
    let c_pid = rt.state(&c)["pid"].as_i64().unwrap() as i32;
    let in_a = |id: &str| {
        std::fs::read_to_string(format!("/proc/{a_pid}/mountinfo"))
            .unwrap()
            .contains(&format!("/c/{id}/"))
    };
    assert!(
        in_a(&c),
        "the third's rootfs is attached in the first's share"
    );
    // SAFETY: plain kill(2) of the sandbox process the test created.
    unsafe { libc::kill(c_pid, libc::SIGKILL) };
    assert_eq!(code(&rt.run(&["delete", "--force", &c])), 0);
    assert!(!in_a(&c), "delete detached the killed container's entries");
    nothing_of(&rt, &c);

    // The second ends with its own status; the first goes on serving.
    assert_eq!(code(&rt.run(&["kill", &b, "KILL"])), 0);
    let st = rt.wait_status(&b, "stopped", Duration::from_secs(30));
    assert_eq!(st["status"], "stopped");
    assert_eq!(code(&rt.run(&["delete", &b])), 0);
    assert_eq!(rt.state(&a)["status"], "running");
    assert_eq!(served(), "hello-from-a\n", "the first still serves");
    let mounts = std::fs::read_to_string(format!("/proc/{a_pid}/mountinfo")).unwrap();
    assert!(
        !mounts.contains(&format!("/c/{b}/")),
        "the second's entries left the first's share: {mounts}"
    );
    assert!(
        processes_mentioning(&b).is_empty(),
        "{:?}",
        processes_mentioning(&b)
    );
    assert!(!b_run.exists(), "run dir of {b} left behind");

    assert_eq!(code(&rt.run(&["kill", &a, "KILL"])), 0);
    rt.wait_status(&a, "stopped", Duration::from_secs(30));
    assert_eq!(code(&rt.run(&["delete", &a])), 0);
    assert_eq!(vmms_of(&rt.root(), &a), Vec::<String>::new());
    assert_no_leftovers(&rt, &a);
    assert_no_leftovers(&rt, &b);
}

/// The VM's owner ending ends the containers in its VM (they are stopped, status 137), and
/// nothing of either is left.
#[test]
fn the_owner_ending_stops_the_containers_in_its_vm() {
    let rt = Runtime::new();
    let a = unique_id("own-a");
    let b = unique_id("own-b");
    let a_bundle = Bundle::new(&["sh", "-c", "echo up; exec sleep 1000"])
        .edit(|s| s["hostname"] = json!("pod-a"));
    let (o, a_out, _) = rt.create(&a_bundle, &a);
    assert_eq!(code(&o), 0, "create {a}: {}", text(&o.stderr));
    assert_eq!(code(&rt.run(&["start", &a])), 0);
    let a_pid = rt.state(&a)["pid"].as_i64().unwrap();
    wait_until("the first container", Duration::from_secs(30), || {
        std::fs::read_to_string(&a_out).is_ok_and(|s| s.contains("up"))
    });
    let b_bundle = Bundle::new(&["sleep", "1000"]).edit(|s| {
        join_ns(s, "network", &format!("/proc/{a_pid}/ns/net"));
        join_ns(s, "ipc", &format!("/proc/{a_pid}/ns/ipc"));
        join_ns(s, "pid", &format!("/proc/{a_pid}/ns/pid"));
        join_ns(s, "uts", &format!("/proc/{a_pid}/ns/uts"));
        s["hostname"] = json!("not-applied");
    });
    let (o, _, _) = rt.create(&b_bundle, &b);
    assert_eq!(code(&o), 0, "create {b}: {}", text(&o.stderr));
    assert_eq!(code(&rt.run(&["start", &b])), 0);
    // The joined PID and UTS namespaces are the first's: its init is pid 1 there, its name is
    // the one the second sees.
    let o = rt.run(&[
        "exec",
        &b,
        "sh",
        "-c",
        "hostname; tr '\\0' ' ' < /proc/1/cmdline",
    ]);
    assert_eq!(
        text(&o.stdout),
        "pod-a\nsleep 1000 ",
        "exec into the second: {}",
        text(&o.stderr)
    );
    assert_eq!(code(&rt.run(&["kill", &a, "KILL"])), 0);
    rt.wait_status(&a, "stopped", Duration::from_secs(30));
    rt.wait_status(&b, "stopped", Duration::from_secs(30));
    for id in [&b, &a] {
        assert_eq!(code(&rt.run(&["delete", id])), 0);
    }
    assert_no_leftovers(&rt, &a);
    assert_no_leftovers(&rt, &b);
}

/// Joins that cannot work: each is refused with one line that says why, and leaves nothing.
#[test]
fn joins_that_cannot_work_are_refused() {
    let rt = Runtime::new();
    let refused = |bundle: &Bundle, id: &str, want: &str| {
        let (o, _, _) = rt.create(bundle, id);
        let err = text(&o.stderr);
        assert_ne!(code(&o), 0, "{id} was created");
        assert!(err.contains(want), "{id}: expected {want:?} in: {err}");
        assert_eq!(err.trim().lines().count(), 1, "a one-line error: {err}");
        nothing_of(&rt, id);
    };

    // A namespace of a process that is not a rootcell container (runc's, or anyone's).
    let mut other = std::process::Command::new("unshare")
        .args(["--net", "--ipc", "sleep", "60"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let pid = other.id();
    let b = Bundle::new(&["true"]).edit(|s| join_ns(s, "network", &format!("/proc/{pid}/ns/net")));
    refused(&b, &unique_id("rf-net"), "already used by process");
    let b = Bundle::new(&["true"]).edit(|s| join_ns(s, "ipc", &format!("/proc/{pid}/ns/ipc")));
    refused(
        &b,
        &unique_id("rf-ipc"),
        "not one of a running rootcell container",
    );
    let _ = other.kill();
    let _ = other.wait();

    // A container that does not fit: the first has 128 MiB (a 192 MiB VM).
    let a = unique_id("rf-a");
    let a_bundle = Bundle::new(&["sleep", "1000"]).edit(|s| {
        s["linux"]["resources"] = json!({"memory": {"limit": 128u64 << 20}});
    });
    let (o, _, _) = rt.create(&a_bundle, &a);
    assert_eq!(code(&o), 0, "create {a}: {}", text(&o.stderr));
    let a_pid = rt.state(&a)["pid"].as_i64().unwrap();
    let b = Bundle::new(&["true"]).edit(|s| {
        join_ns(s, "network", &format!("/proc/{a_pid}/ns/net"));
        s["linux"]["resources"] = json!({"memory": {"limit": 512u64 << 20}});
    });
    refused(&b, &unique_id("rf-big"), "that VM has 192 MiB");
    // Joining the VM but not its network: one VM has one network stack.
    let b = Bundle::new(&["true"]).edit(|s| join_ns(s, "ipc", &format!("/proc/{a_pid}/ns/ipc")));
    refused(&b, &unique_id("rf-own-net"), "must share");

    // A stopped rootcell container: its namespaces are gone.
    assert_eq!(code(&rt.run(&["delete", "--force", &a])), 0);
    let b =
        Bundle::new(&["true"]).edit(|s| join_ns(s, "network", &format!("/proc/{a_pid}/ns/net")));
    refused(&b, &unique_id("rf-stopped"), "cannot be opened");
    assert_no_leftovers(&rt, &a);
}

/// A private Podman (own storage, run root and runtime root), driving rootcell by path.
struct Podman {
    dir: tempfile::TempDir,
}

impl Podman {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("rootcell-podman-")
            .tempdir()
            .unwrap();
        let p = Podman { dir };
        // Podman runs the runtime with an environment of its own: a wrapper carries ours (the
        // guest images under test).
        let mut script = String::from("#!/bin/sh\n");
        for (k, v) in std::env::vars().filter(|(k, _)| k.starts_with("ROOTCELL_")) {
            script.push_str(&format!("export {k}='{}'\n", v.replace('\'', "'\\''")));
        }
        script.push_str(&format!("exec '{}' \"$@\"\n", artifacts().bin.display()));
        let wrapper = p.dir.path().join("rootcell");
        std::fs::write(&wrapper, script).unwrap();
        std::fs::set_permissions(
            &wrapper,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let rootfs = p.dir.path().join("busybox-rootfs");
        let st = std::process::Command::new(images_dir().join("make-rootfs.sh"))
            .arg(&rootfs)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "images/make-rootfs.sh failed");
        let tar = std::process::Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .args(["-c", "."])
            .output()
            .unwrap();
        let mut c = p.command(&["import", "-", "rootcell-busybox:test"]);
        c.stdin(std::process::Stdio::piped());
        let o = output_with_timeout(c, Some(tar.stdout), Duration::from_secs(120));
        assert!(o.status.success(), "podman import: {}", text(&o.stderr));
        p
    }

    fn command(&self, args: &[&str]) -> std::process::Command {
        let d = self.dir.path();
        let mut c = std::process::Command::new("podman");
        no_host_pool(&mut c);
        c.arg("--root")
            .arg(d.join("storage"))
            .arg("--runroot")
            .arg(d.join("run"))
            .arg("--runtime")
            .arg(d.join("rootcell"))
            .args(["--cgroup-manager", "cgroupfs", "--events-backend", "file"])
            .args(args)
            .env("ROOTCELL_LOG", "info");
        c
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        output_with_timeout(self.command(args), None, Duration::from_secs(180))
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "podman {args:?}: {}", text(&o.stderr));
        text(&o.stdout)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.run(&["pod", "rm", "-a", "-f"]);
        let _ = self.run(&["rm", "-a", "-f"]);
        let _ = self.run(&["system", "reset", "-f"]);
        // Overlay mounts of a failed run would keep the storage busy.
        let _ = std::process::Command::new("umount")
            .arg("-R")
            .arg(self.dir.path())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Podman: a pod (its infra container and two more, all on rootcell) is one VM; the two talk
/// over localhost; `podman pod rm -f` leaves nothing.
#[test]
fn podman_pod_is_one_vm() {
    let p = Podman::new();
    let pod = unique_id("pod");
    p.ok(&["pod", "create", "--name", &pod]);
    let server = p.ok(&[
        "run",
        "-d",
        "--pod",
        &pod,
        "rootcell-busybox:test",
        "sh",
        "-c",
        LOCAL_SERVER,
    ]);
    let server = server.trim().to_string();
    let script = format!("{LOCAL_FETCH}; test -e /a-only || echo own-root");
    let out = p.ok(&[
        "run",
        "--rm",
        "--pod",
        &pod,
        "rootcell-busybox:test",
        "sh",
        "-c",
        &script,
    ]);
    assert_eq!(out, "hello-from-a\nown-root\n");
    // One VM for the whole pod: the server's record names the infra container's VM, and only
    // the infra container's sandbox started a VMM. (Podman gives rootcell its default root.)
    let infra = p.ok(&["pod", "inspect", "--format", "{{.InfraContainerID}}", &pod]);
    let infra = infra.trim();
    let record = |id: &str| -> serde_json::Value {
        let path = format!("/run/rootcell/{id}/state.json");
        serde_json::from_slice(&std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}")))
            .unwrap()
    };
    let srv = record(&server);
    assert_eq!(
        srv["shares_vm"]["owner"], infra,
        "the server runs in the infra container's VM: {srv}"
    );
    let root = std::path::Path::new("/run/rootcell");
    assert!(
        !runs_own_vmm(root, &server),
        "the server started no VMM of its own: {srv}"
    );
    assert!(
        runs_own_vmm(root, infra),
        "the infra container runs the pod's VMM: {}",
        record(infra)
    );
    p.ok(&["pod", "rm", "-f", &pod]);
    for id in [infra, server.as_str()] {
        wait_until(
            "the pod's processes to end",
            Duration::from_secs(15),
            || processes_mentioning(id).is_empty(),
        );
        let state = std::path::Path::new("/run/rootcell").join(id);
        assert!(!state.exists(), "{} left behind", state.display());
        let run = run_dir(std::path::Path::new("/run/rootcell"), id);
        assert!(!run.exists(), "{} left behind", run.display());
    }
}
