//! Runs the container builder on this host (as root) against a busybox rootfs in a temp dir:
//! the same code path the agent runs in the guest, minus vsock.

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use oci_spec::runtime::Spec;
use rootcell_agent::container::{self, spec, ExecRequest, InitRequest, MountEnv, Stdio};
use rootcell_protocol::ErrorCode;
use serde_json::{json, Value};
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "hostname", "id", "pwd", "env", "touch", "sleep", "true", "false", "kill",
    "ls", "test", "grep", "mount", "readlink", "head", "wc",
];

/// A busybox root filesystem plus a directory to bind-mount into it.
struct Bundle {
    _tmp: tempfile::TempDir,
    rootfs: PathBuf,
    shared: PathBuf,
}

fn bundle() -> Bundle {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tmp.path().join("rootfs");
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "root"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    for a in APPLETS {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(a)).unwrap();
    }
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(rootfs.join("etc/notexec"), "data\n").unwrap();
    let shared = tmp.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::write(shared.join("hello.txt"), "hello from the host\n").unwrap();
    Bundle {
        _tmp: tmp,
        rootfs,
        shared,
    }
}

/// A Docker-like spec running `args`.
fn spec_json(b: &Bundle, args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "root": {"path": b.rootfs},
        "hostname": "cell",
        "process": {
            "args": args,
            "cwd": "/",
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "FOO=bar"],
            "user": {"uid": 0, "gid": 0},
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]},
            {"destination": "/data", "type": "bind", "source": b.shared, "options": ["rbind", "ro"]},
            {"destination": "/etc/hosts-file", "type": "bind", "source": b.shared.join("hello.txt"), "options": ["bind"]},
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/cmdline", "/proc/irq", "/proc/does-not-exist"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"],
        }
    })
}

fn subreaper() {
    // The process is forked by a short-lived helper; this test process must inherit it.
    nix::sys::prctl::set_child_subreaper(true).unwrap();
}

fn pipe() -> (std::fs::File, OwnedFd) {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    (std::fs::File::from(r), w)
}

fn wait_status(pid: i32) -> i32 {
    match waitpid(Pid::from_raw(pid), None).unwrap() {
        WaitStatus::Exited(_, c) => c,
        WaitStatus::Signaled(_, s, _) => 128 + s as i32,
        other => panic!("unexpected wait status {other:?}"),
    }
}

/// Creates and starts the container; returns (exit status, stdout, stderr).
fn run_spec(spec_value: Value) -> Result<(i32, String, String), container::SetupError> {
    subreaper();
    let spec: Spec = serde_json::from_value(spec_value).unwrap();
    let plan = spec::validate(&spec)?;
    let (mut out_r, out_w) = pipe();
    let (mut err_r, err_w) = pipe();
    let stdio = Stdio {
        stdout: Some(out_w),
        stderr: Some(err_w),
        ..Default::default()
    };
    let req = InitRequest {
        spec: &spec,
        plan: &plan,
        cgroup: None,
        env: MountEnv::default(),
    };
    let prepared = container::create_init(req, stdio)?;
    wait_status(prepared.helper_pid);
    let pid = prepared.pid;
    prepared.release().unwrap();
    let status = wait_status(pid);
    let (mut out, mut err) = (String::new(), String::new());
    out_r.read_to_string(&mut out).unwrap();
    err_r.read_to_string(&mut err).unwrap();
    Ok((status, out, err))
}

fn run(b: &Bundle, script: &str) -> (i32, String, String) {
    run_spec(spec_json(b, &["sh", "-c", script])).unwrap()
}

#[test]
fn hostname_env_cwd_and_user() {
    let b = bundle();
    let mut s = spec_json(
        &b,
        &[
            "sh",
            "-c",
            "hostname; echo FOO=$FOO HOME=$HOME; pwd; id -u; id -g; id -G; echo $$",
        ],
    );
    s["process"]["cwd"] = json!("/work/dir");
    s["process"]["user"] = json!({"uid": 1000, "gid": 1000, "additionalGids": [10, 20]});
    let (status, out, err) = run_spec(s).unwrap();
    assert_eq!(status, 0, "stderr: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "cell",
            "FOO=bar HOME=/home/user",
            "/work/dir",
            "1000",
            "1000",
            "1000 10 20",
            "1"
        ]
    );
}

#[test]
fn exit_codes_and_signals() {
    let b = bundle();
    assert_eq!(run(&b, "exit 0").0, 0);
    assert_eq!(run(&b, "exit 7").0, 7);
    // The container's pid 1 ignores signals it has no handler for when they come from inside,
    // so the kill comes from outside, as `docker kill` would.
    subreaper();
    let spec: Spec = serde_json::from_value(spec_json(&b, &["sleep", "30"])).unwrap();
    let plan = spec::validate(&spec).unwrap();
    let req = InitRequest {
        spec: &spec,
        plan: &plan,
        cgroup: None,
        env: MountEnv::default(),
    };
    let init = container::create_init(req, Stdio::default()).unwrap();
    wait_status(init.helper_pid);
    let pid = init.pid;
    init.release().unwrap();
    nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    assert_eq!(wait_status(pid), 128 + 9);
}

#[test]
fn read_only_root_with_writable_tmpfs() {
    let b = bundle();
    let mut s = spec_json(
        &b,
        &[
            "sh",
            "-c",
            "touch /tmp/ok && echo tmp-ok; touch /newfile || echo root-ro",
        ],
    );
    s["root"]["readonly"] = json!(true);
    let (status, out, _) = run_spec(s).unwrap();
    assert_eq!(status, 0);
    assert_eq!(out, "tmp-ok\nroot-ro\n");
    assert!(!b.rootfs.join("newfile").exists());
}

#[test]
fn bind_mounts_dir_read_only_and_file() {
    let b = bundle();
    let (status, out, _) =
        run(&b, "cat /data/hello.txt; cat /etc/hosts-file; echo x > /data/new 2>/dev/null || echo data-ro; echo y > /etc/hosts-file && echo file-rw");
    assert_eq!(status, 0);
    assert_eq!(
        out,
        "hello from the host\nhello from the host\ndata-ro\nfile-rw\n"
    );
    assert!(!b.shared.join("new").exists());
    assert_eq!(
        std::fs::read_to_string(b.shared.join("hello.txt")).unwrap(),
        "y\n"
    );
}

#[test]
fn dev_proc_masked_and_readonly_paths() {
    let b = bundle();
    let (status, out, err) = run(
        &b,
        "echo -n 'devs='; for d in null zero full random urandom tty; do test -c /dev/$d && echo -n \"$d \"; done; echo; \
         echo ptmx=$(readlink /dev/ptmx) fd=$(readlink /dev/fd) stdin=$(readlink /dev/stdin); \
         echo zero=$(head -c 3 /dev/zero | wc -c); \
         echo cmdline=$(wc -c < /proc/cmdline); echo irq=$(ls /proc/irq | wc -l); \
         echo 1 > /proc/sys/kernel/ns_last_pid 2>/dev/null && echo sys=rw || echo sys=ro; \
         echo procs=$(ls /proc | grep -c '^[0-9]')",
    );
    assert_eq!(status, 0, "stderr: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        &lines[..6],
        [
            "devs=null zero full random urandom tty ",
            "ptmx=pts/ptmx fd=/proc/self/fd stdin=/proc/self/fd/0",
            "zero=3",
            "cmdline=0",
            "irq=0",
            "sys=ro"
        ],
        "{out}"
    );
    // Only the container's processes are visible: sh and the command substitution's children.
    let procs: u32 = lines[6].strip_prefix("procs=").unwrap().parse().unwrap();
    assert!(procs <= 5, "{out}");
}

#[test]
fn sysctl_is_applied_before_proc_sys_turns_read_only() {
    let b = bundle();
    let mut s = spec_json(&b, &["sh", "-c", "cat /proc/sys/kernel/shmmni"]);
    s["linux"]["sysctl"] = json!({"kernel.shmmni": "1234", "net.not.in.this.kernel": "1"});
    let (status, out, err) = run_spec(s).unwrap();
    assert_eq!(status, 0, "{err}");
    assert_eq!(out, "1234\n");
}

#[test]
fn missing_or_non_executable_program() {
    let b = bundle();
    let e = run_spec(spec_json(&b, &["no-such-program"])).unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    assert_eq!(
        e.message,
        "exec: \"no-such-program\": executable file not found in $PATH"
    );
    let e = run_spec(spec_json(&b, &["/etc/notexec"])).unwrap_err();
    assert_eq!(e.code, ErrorCode::PermissionDenied);
}

#[test]
fn capabilities_and_no_new_privileges() {
    let b = bundle();
    let mut s = spec_json(
        &b,
        &[
            "sh",
            "-c",
            "grep -E '^(CapEff|CapBnd|CapPrm|NoNewPrivs)' /proc/self/status",
        ],
    );
    let caps = json!(["CAP_CHOWN", "CAP_KILL"]);
    s["process"]["capabilities"] =
        json!({"bounding": caps, "effective": caps, "permitted": caps, "inheritable": caps});
    s["process"]["noNewPrivileges"] = json!(true);
    let (status, out, err) = run_spec(s).unwrap();
    assert_eq!(status, 0, "{err}");
    // CAP_CHOWN = bit 0, CAP_KILL = bit 5.
    assert!(out.contains("CapEff:\t0000000000000021"), "{out}");
    assert!(out.contains("CapBnd:\t0000000000000021"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
}

#[test]
fn exec_joins_the_running_container() {
    subreaper();
    let b = bundle();
    let spec: Spec = serde_json::from_value(spec_json(&b, &["sleep", "30"])).unwrap();
    let plan = spec::validate(&spec).unwrap();
    let req = InitRequest {
        spec: &spec,
        plan: &plan,
        cgroup: None,
        env: MountEnv::default(),
    };
    let init = container::create_init(req, Stdio::default()).unwrap();
    wait_status(init.helper_pid);
    let init_pid = init.pid;
    init.release().unwrap();

    let process: oci_spec::runtime::Process = serde_json::from_value(json!({
        "args": ["sh", "-c", "hostname; pwd; ls /data; ps_count=$(ls /proc | grep -c '^[0-9]'); echo $ps_count; exit 3"],
        "cwd": "/tmp",
        "env": ["PATH=/bin"],
        "user": {"uid": 0, "gid": 0},
    }))
    .unwrap();
    let (mut out_r, out_w) = pipe();
    let ereq = ExecRequest {
        init_pid,
        plan: &plan,
        cgroup: None,
    };
    let exec = container::create_exec(
        ereq,
        &process,
        Stdio {
            stdout: Some(out_w),
            ..Default::default()
        },
    )
    .unwrap();
    wait_status(exec.helper_pid);
    let exec_pid = exec.pid;
    exec.release().unwrap();
    assert_eq!(wait_status(exec_pid), 3);
    let mut out = String::new();
    out_r.read_to_string(&mut out).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..3], ["cell", "/tmp", "hello.txt"]);
    // sleep (pid 1), sh, and ls/grep: the exec sees the container's pid namespace.
    assert!(lines[3].parse::<u32>().unwrap() <= 6, "{out}");

    let missing: oci_spec::runtime::Process =
        serde_json::from_value(json!({"args": ["nope"], "cwd": "/", "user": {"uid": 0, "gid": 0}}))
            .unwrap();
    let e = container::create_exec(ereq, &missing, Stdio::default()).unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);

    nix::sys::signal::kill(Pid::from_raw(init_pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    assert_eq!(wait_status(init_pid), 137);
}
