//! What the container process sees and how it ends: exit codes, signals, identity, filesystems,
//! and root powers that stay inside the guest.

use rootcell_e2e::*;
use serde_json::json;
use std::time::Duration;

fn run_bundle(rt: &Runtime, bundle: &Bundle, prefix: &str) -> std::process::Output {
    let id = unique_id(prefix);
    let o = rt.run(&["run", "--bundle", bundle.path().to_str().unwrap(), &id]);
    assert_no_leftovers(rt, &id);
    o
}

#[test]
fn exit_codes_pass_through() {
    let rt = Runtime::new();
    for want in [0, 1, 7] {
        let b = Bundle::new(&["sh", "-c", &format!("exit {want}")]);
        let o = run_bundle(&rt, &b, "exit");
        assert_eq!(code(&o), want, "exit {want}: stderr {}", text(&o.stderr));
    }
}

#[test]
fn missing_executable_exits_127_with_message() {
    let rt = Runtime::new();
    let b = Bundle::new(&["no-such-program"]);
    let o = run_bundle(&rt, &b, "nf");
    assert_eq!(code(&o), 127, "stderr: {}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(
        err.contains("no-such-program") && err.contains("not found"),
        "error names the program: {err}"
    );
}

#[test]
fn non_executable_file_exits_126() {
    let rt = Runtime::new();
    let b = Bundle::new(&["/etc/passwd"]);
    let o = run_bundle(&rt, &b, "nx");
    assert_eq!(code(&o), 126, "stderr: {}", text(&o.stderr));
}

/// Starts `run` in the background, waits for running, sends `signal` with `rootcell kill`.
fn run_and_kill(rt: &Runtime, bundle: &Bundle, signal: &str) -> i32 {
    let id = unique_id("sig");
    let mut c = rt.command(&["run", "--bundle", bundle.path().to_str().unwrap(), &id]);
    c.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    let child = c.spawn().unwrap();
    let mut st = serde_json::Value::Null;
    for _ in 0..1200 {
        let o = rt.run(&["state", &id]);
        if o.status.success() {
            st = serde_json::from_slice(&o.stdout).unwrap();
            if st["status"] == "running" {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(st["status"], "running", "container never ran");
    let k = rt.run(&["kill", &id, signal]);
    assert_eq!(code(&k), 0, "kill {signal}: {}", text(&k.stderr));
    let status = wait_with_timeout(child, COMMAND_TIMEOUT);
    assert_no_leftovers(rt, &id);
    status.code().expect("run exits normally")
}

#[test]
fn kill_9_gives_137() {
    let rt = Runtime::new();
    let b = Bundle::new(&["sleep", "1000"]);
    assert_eq!(run_and_kill(&rt, &b, "9"), 128 + 9);
}

#[test]
fn kill_term_gives_143() {
    let rt = Runtime::new();
    // Without its own pid namespace the process is not an init, so TERM's default action applies
    // (a pid-namespace init ignores signals it has no handler for, as under runc).
    let b = Bundle::new(&["sleep", "1000"]).edit(|s| {
        s["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .retain(|n| n["type"] != "pid");
    });
    assert_eq!(run_and_kill(&rt, &b, "TERM"), 128 + 15);
    let b = Bundle::new(&["sleep", "1000"]).edit(|s| {
        s["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .retain(|n| n["type"] != "pid");
    });
    assert_eq!(run_and_kill(&rt, &b, "SIGTERM"), 128 + 15);
}

#[test]
fn env_cwd_user_groups_hostname() {
    let rt = Runtime::new();
    let b = Bundle::new(&[
        "sh",
        "-c",
        "echo \"$GREETING\"; pwd; id -u; id -g; id -G; hostname; ulimit -n",
    ])
    .edit(|s| {
        s["process"]["env"]
            .as_array_mut()
            .unwrap()
            .push(json!("GREETING=hello from the guest"));
        s["process"]["cwd"] = json!("/var/work");
        s["process"]["user"] = json!({"uid": 1234, "gid": 2345, "additionalGids": [3456, 4567]});
        s["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": 4321, "soft": 4321}]);
        s["hostname"] = json!("box-under-test");
    });
    let o = run_bundle(&rt, &b, "ident");
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    let out = text(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "hello from the guest",
            "/var/work",
            "1234",
            "2345",
            "2345 3456 4567",
            "box-under-test",
            "4321"
        ],
        "full output: {out}"
    );
}

#[test]
fn read_only_root_and_read_write_bind_mount() {
    let rt = Runtime::new();
    let host_dir = tempfile::tempdir().unwrap();
    std::fs::write(host_dir.path().join("from-host"), "host data\n").unwrap();
    let b = Bundle::new(&[
        "sh",
        "-c",
        "cat /data/from-host; echo guest data > /data/from-guest; if touch /root-write 2>/dev/null; then echo root writable; else echo root read-only; fi",
    ])
    .edit(|s| {
        s["root"]["readonly"] = json!(true);
        s["mounts"].as_array_mut().unwrap().push(json!({
            "destination": "/data", "type": "bind", "source": host_dir.path(), "options": ["rbind", "rw"]
        }));
    });
    let o = run_bundle(&rt, &b, "ro");
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "host data\nroot read-only\n");
    assert_eq!(
        std::fs::read_to_string(host_dir.path().join("from-guest")).unwrap(),
        "guest data\n"
    );
    assert!(!b.rootfs().join("root-write").exists());
}

#[test]
fn read_only_bind_mount_refuses_writes() {
    let rt = Runtime::new();
    let host_dir = tempfile::tempdir().unwrap();
    let b = Bundle::new(&["sh", "-c", "if echo x > /data/f 2>/dev/null; then echo wrote; else echo refused; fi"]).edit(|s| {
        s["mounts"].as_array_mut().unwrap().push(json!({
            "destination": "/data", "type": "bind", "source": host_dir.path(), "options": ["rbind", "ro"]
        }));
    });
    let o = run_bundle(&rt, &b, "robind");
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "refused\n");
    assert!(!host_dir.path().join("f").exists());
}

#[test]
fn root_in_the_guest_mounts_and_creates_interfaces_without_touching_the_host() {
    let rt = Runtime::new();
    let ifname = format!("rc{}", std::process::id() % 100000);
    let b = Bundle::new(&[
        "sh",
        "-c",
        &format!(
            "set -e; mount -t tmpfs none /mnt; echo hi > /mnt/f; grep -q ' /mnt tmpfs' /proc/mounts; \
             ip link add {ifname} type dummy; ip link set {ifname} up; ip -o link show {ifname} | grep -q {ifname}; echo ok"
        ),
    ])
    .edit(|s| set_caps(s, ALL_CAPS));
    let o = run_bundle(&rt, &b, "root");
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "ok\n");
    let host_links = std::fs::read_dir("/sys/class/net")
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect::<Vec<_>>();
    assert!(
        !host_links.iter().any(|n| n.to_string_lossy() == ifname),
        "interface leaked to the host"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(b.rootfs().join("mnt").to_str().unwrap()),
        "guest mount visible on the host"
    );
    assert!(
        !b.rootfs().join("mnt/f").exists(),
        "tmpfs write reached the host rootfs"
    );
}

#[test]
fn default_capabilities_cannot_mount() {
    let rt = Runtime::new();
    let b = Bundle::new(&[
        "sh",
        "-c",
        "mount -t tmpfs none /mnt 2>/dev/null && echo mounted || echo denied",
    ]);
    let o = run_bundle(&rt, &b, "nocap");
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "denied\n");
}

#[test]
fn spec_device_nodes_get_exactly_their_mode() {
    // linux.devices fileMode is the node's mode; no umask applies (runc gives 0660 for 0660).
    let rt = Runtime::new();
    let b = Bundle::new(&[
        "sh",
        "-c",
        "stat -c '%a %t %T %u %g' /dev/mynull /dev/extra/myzero",
    ])
    .edit(|s| {
        s["linux"]["devices"] = json!([
            {"path": "/dev/mynull", "type": "c", "major": 1, "minor": 3, "fileMode": 0o660, "uid": 0, "gid": 0},
            {"path": "/dev/extra/myzero", "type": "c", "major": 1, "minor": 5, "fileMode": 0o606, "uid": 1000, "gid": 5},
        ]);
    });
    let o = run_bundle(&rt, &b, "devmode");
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    assert_eq!(
        text(&o.stdout).lines().collect::<Vec<_>>(),
        ["660 1 3 0 0", "606 1 5 1000 5"],
        "mode, major, minor, owner of the spec's device nodes"
    );
}

#[test]
fn bind_mounts_show_their_source_path_as_root_in_mountinfo() {
    // Under runc a bind mount's root (field 4 of /proc/self/mountinfo) is the source's path;
    // tools that map container paths back to the host read it.
    let rt = Runtime::new();
    let host_dir = tempfile::tempdir().unwrap();
    let real = std::fs::canonicalize(host_dir.path()).unwrap();
    std::fs::create_dir(real.join("data")).unwrap();
    std::fs::write(real.join("note"), "hello\n").unwrap();
    let b = Bundle::new(&[
        "sh",
        "-c",
        "while read -r id parent dev root point rest; do \
           case $point in /data|/note) echo \"$point $root\";; esac; \
         done < /proc/self/mountinfo; cat /note",
    ])
    .edit(|s| {
        let mounts = s["mounts"].as_array_mut().unwrap();
        mounts.push(json!({"destination": "/data", "type": "bind", "source": real.join("data"), "options": ["rbind", "rw"]}));
        mounts.push(json!({"destination": "/note", "type": "bind", "source": real.join("note"), "options": ["bind", "ro"]}));
    });
    let o = run_bundle(&rt, &b, "mntroot");
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    let want = format!(
        "/data {}\n/note {}\nhello\n",
        real.join("data").display(),
        real.join("note").display()
    );
    assert_eq!(
        text(&o.stdout),
        want,
        "bind mount roots in the guest's mountinfo"
    );
}
