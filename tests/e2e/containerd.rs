//! containerd (Debian's 1.6, private) running busybox through `containerd-shim-rootcell-v2`:
//! `ctr run --runtime io.containerd.rootcell.v2`, exit codes, exec, kill, pause/resume, metrics,
//! and the cleanup path after the shim is killed; Kubernetes-style pods through its CRI plugin.
//! After every container: no process, VMM, run dir, mount, cgroup or rootcell state is left.
//!
//! `containerd17.rs` runs these same tests against Debian 13's containerd 1.7: it includes this
//! file as a module and gives it its own `engine()`, which every test here reaches as
//! `crate::engine()`.

use rootcell_e2e::containerd::{Containerd, CRI_NAMESPACE, IMAGE, NAMESPACE, PAUSE_IMAGE};
use rootcell_e2e::cri::{Cri, Pod};
use rootcell_e2e::docker::Engine;
use rootcell_e2e::{processes_mentioning, run_dir, text, unique_id};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The containerd the tests drive when this file is its own test binary: the host's (1.6).
#[allow(dead_code)] // unused where containerd17.rs includes this file with an engine of its own
fn engine() -> Engine {
    Engine::Host
}

const RUNTIME: &str = "io.containerd.rootcell.v2";

fn enabled() -> bool {
    std::env::var("ROOTCELL_E2E").is_ok()
}

/// A private containerd of this binary's engine (with its CRI plugin if `cri`), or `None` (the
/// test is skipped) outside the e2e run.
fn containerd(cri: bool) -> Option<Containerd> {
    if !enabled() {
        eprintln!("skipped: set ROOTCELL_E2E=1 (scripts/test.sh does)");
        return None;
    }
    Some(if cri {
        Containerd::start_cri_on(crate::engine())
    } else {
        Containerd::start_on(crate::engine())
    })
}

/// Starts `sleep 600` in a new task of the busybox image (`ctr run -d`, with `extra` flags
/// before the image) and waits until it runs; returns the task's id.
fn run_sleeper(c: &Containerd, extra: &[&str]) -> String {
    let id = unique_id("ctrd");
    let mut args = vec!["run", "-d", "--runtime", RUNTIME];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[IMAGE, &id, "sleep", "600"]);
    let o = c.ctr(&args);
    assert!(
        o.status.success(),
        "{}\n{}",
        text(&o.stderr),
        c.log_tail(40)
    );
    wait_task(c, &id, "RUNNING");
    id
}

/// Waits until `ctr task ls` shows `id` with `status`.
fn wait_task(c: &Containerd, id: &str, status: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = c.ctr(&["task", "ls"]);
        let out = text(&o.stdout);
        if out.lines().any(|l| l.starts_with(id) && l.contains(status)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "task {id} never {status}: {out}\n{}",
            c.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Nothing of the test's containers is left: no process under the rootcell root, no mount
/// under containerd's directories, no rootcell state.
fn assert_clean(c: &Containerd, ids: &[&str]) {
    assert_clean_in(c, &c.rootcell_root(), ids)
}

/// The host cgroup directories (any v1 controller, or the v2 tree) named after one of `ids`, up
/// to three levels down: where containerd's cgroupsPath (`/NAMESPACE/ID`) puts a container.
fn cgroups_named(ids: &[&str]) -> Vec<PathBuf> {
    fn walk(dir: &Path, depth: u32, ids: &[&str], found: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let p = e.path();
            if ids.iter().any(|id| e.file_name().to_str() == Some(*id)) {
                found.push(p.clone());
            }
            if depth > 1 {
                walk(&p, depth - 1, ids, found);
            }
        }
    }
    let mut found = Vec::new();
    walk(Path::new("/sys/fs/cgroup"), 4, ids, &mut found);
    found
}

/// [`assert_clean`] for the rootcell state root `root` (one per containerd namespace): no
/// process names the root, a container id or a container's run dir (the sandbox names the
/// root, the shim the id, the VMM its run dir's sockets); no run dir under /run/rootcell/r, no
/// rootcell state, no mount of containerd's tasks or of the containers, no host cgroup.
fn assert_clean_in(c: &Containerd, root: &std::path::Path, ids: &[&str]) {
    let root = root.to_path_buf();
    let run_dirs: Vec<PathBuf> = ids.iter().map(|id| run_dir(&root, id)).collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut procs = processes_mentioning(&root.display().to_string());
        for id in ids {
            procs.extend(processes_mentioning(id));
        }
        for d in &run_dirs {
            procs.extend(processes_mentioning(&d.display().to_string()));
        }
        if procs.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "processes left: {procs:#?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let left: Vec<_> = std::fs::read_dir(&root)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "rootcell state left: {left:?}");
    let stray: Vec<_> = run_dirs.iter().filter(|d| d.exists()).collect();
    assert!(stray.is_empty(), "run dirs left: {stray:?} (ids {ids:?})");
    let mounts = c.mountinfo();
    let task_dir = c
        .dir()
        .join("state/io.containerd.runtime.v2.task")
        .display()
        .to_string();
    let leaked: Vec<&str> = mounts
        .lines()
        .filter(|l| l.contains(&task_dir) || ids.iter().any(|id| l.contains(id)))
        .collect();
    assert!(leaked.is_empty(), "mounts left: {leaked:#?}");
    let cgroups = cgroups_named(ids);
    assert!(cgroups.is_empty(), "cgroups left: {cgroups:#?}");
}

#[test]
fn ctr_run_exec_kill_pause_metrics() {
    let Some(c) = containerd(false) else {
        return;
    };

    // Output and exit code of a run to completion.
    let id = unique_id("ctrd");
    let t = Instant::now();
    let o = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        IMAGE,
        &id,
        "sh",
        "-c",
        "echo hello from $(uname -r); exit 7",
    ]);
    eprintln!("ctr run to exit: {} ms", t.elapsed().as_millis());
    assert_eq!(
        o.status.code(),
        Some(7),
        "stdout {} stderr {}\n{}",
        text(&o.stdout),
        text(&o.stderr),
        c.log_tail(40)
    );
    assert!(
        text(&o.stdout).contains("hello from"),
        "{}",
        text(&o.stdout)
    );
    assert_clean(&c, &[&id]);

    // A long-running task: exec, pause/resume, metrics, kill.
    let id = run_sleeper(&c, &["--memory-limit", "67108864"]);
    // What assert_clean looks for is there while the container runs.
    assert!(
        run_dir(&c.rootcell_root(), &id).exists(),
        "no run dir {}",
        run_dir(&c.rootcell_root(), &id).display()
    );
    assert!(
        !cgroups_named(&[&id]).is_empty(),
        "no host cgroup named {id}"
    );

    let o = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        &id,
        "sh",
        "-c",
        "echo exec-out; echo exec-err >&2; exit 5",
    ]);
    assert_eq!(
        o.status.code(),
        Some(5),
        "{}\n{}",
        text(&o.stderr),
        c.log_tail(40)
    );
    assert!(text(&o.stdout).contains("exec-out"), "{}", text(&o.stdout));
    assert!(text(&o.stderr).contains("exec-err"), "{}", text(&o.stderr));

    let o = c.ctr(&["task", "pause", &id]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    wait_task(&c, &id, "PAUSED");
    let o = c.ctr(&["task", "resume", &id]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    wait_task(&c, &id, "RUNNING");
    let o = c.ctr(&["task", "exec", "--exec-id", "e2", &id, "true"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "exec after resume: {}",
        text(&o.stderr)
    );

    // Pids (`ctr task ps`): the host processes that hold the container, its sandbox (the
    // task's pid) and its VMM, a process of its own with either backend (QEMU, or `rootcell
    // builtin-vmm`, which `auto` picks on a real KVM; before the built-in VMM had a process of
    // its own this test expected one pid there, and failed in the nested lane with two); the
    // guest's processes live in another kernel.
    let o = c.ctr(&["task", "ps", &id]);
    let out = text(&o.stdout);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let pids: Vec<&str> = out
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let task = task_pid(&c, &id);
    assert!(pids.contains(&task.as_str()), "task pid {task}: {out}");
    assert_eq!(pids.len(), 2, "ctr task ps: {out}");
    let vmm = pids.iter().find(|p| **p != task).unwrap();
    let cmd = std::fs::read(format!("/proc/{vmm}/cmdline")).unwrap_or_default();
    let cmd = String::from_utf8_lossy(&cmd);
    assert!(
        cmd.contains("qemu-system") || cmd.contains("builtin-vmm"),
        "the other pid is not the VMM: {cmd}"
    );

    // Metrics: the container's own usage and limits, from its cgroup in the guest (the VM's
    // host cgroup has no limit and holds the whole VM, ~100 MiB and more).
    let o = c.ctr(&["task", "metrics", &id]);
    let out = text(&o.stdout);
    eprintln!("metrics: {out}{}", text(&o.stderr));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let metric = |name: &str| -> u64 {
        out.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in ctr task metrics: {out}"))
    };
    assert_eq!(metric("memory.limit_in_bytes"), 64 << 20, "{out}");
    let usage = metric("memory.usage_in_bytes");
    assert!(usage > 0 && usage < 64 << 20, "memory usage {usage}: {out}");
    let pids = metric("pids.current");
    assert!((1..10).contains(&pids), "pids.current {pids}: {out}");

    let o = c.ctr(&["task", "kill", "-s", "SIGKILL", &id]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    wait_task(&c, &id, "STOPPED");
    let o = c.ctr(&["task", "ls"]);
    let line = text(&o.stdout);
    assert!(
        line.lines()
            .any(|l| l.starts_with(&id) && l.contains("STOPPED")),
        "{line}"
    );
    let o = c.ctr(&["task", "delete", &id]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = c.ctr(&["container", "delete", &id]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_clean(&c, &[&id]);
}

#[test]
fn killed_shim_is_cleaned_up_by_containerd() {
    let Some(c) = containerd(false) else {
        return;
    };
    let id = run_sleeper(&c, &[]);
    // The shim serving this task: its command line names the task id and our containerd.
    let shim: Vec<i32> = processes_mentioning("containerd-shim-rootcell-v2")
        .iter()
        .filter(|p| p.contains(&id))
        .filter_map(|p| p.split(':').next()?.parse().ok())
        .collect();
    assert_eq!(shim.len(), 1, "{shim:?}");
    // SAFETY: kill(2) on the shim this test's containerd started.
    unsafe { libc::kill(shim[0], libc::SIGKILL) };
    // containerd notices the dead shim, runs `containerd-shim-rootcell-v2 delete` and marks
    // the task stopped; deleting it then leaves nothing.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = c.ctr(&["task", "ls"]);
        let out = text(&o.stdout);
        if !out
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("RUNNING"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "task still running after its shim died: {out}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let _ = c.ctr(&["task", "delete", &id]);
    let o = c.ctr(&["container", "delete", &id]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_clean(&c, &[&id]);
}

/// A containerd logging binary, as a user would write one: records its arguments and
/// environment, closes fd 5 to say it is ready, copies fd 3 (the container's stdout) and fd 4
/// (its stderr) to files until both end, then leaves a `done` mark.
const LOGGER: &str = r#"#!/bin/sh
[ "$1" = dir ] || exit 2
d=$2
echo "$CONTAINER_NAMESPACE/$CONTAINER_ID" > "$d/env"
exec 5>&-
cat <&3 > "$d/stdout" &
cat <&4 > "$d/stderr"
wait
echo done > "$d/done"
"#;

/// `ctr run --log-uri binary://...` hands the container's stdout and stderr to a logging binary
/// (containerd's protocol: fds 3 and 4, ready on fd 5), `file://` to a file; a logger that
/// cannot start fails the run clearly. Nothing is left, the logger included.
#[test]
fn log_uris_binary_and_file() {
    let Some(c) = containerd(false) else {
        return;
    };
    // Under /tmp, which the chrooted containerd of the 1.7 lane sees at the same path.
    let dir = tempfile::Builder::new()
        .prefix("rc-logger-")
        .tempdir_in("/tmp")
        .unwrap();
    let d = dir.path();
    let logger = d.join("logger");
    std::fs::write(&logger, LOGGER).unwrap();
    std::fs::set_permissions(&logger, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let script = "echo to stdout; echo to stderr >&2; exit 3";

    let id = unique_id("ctrd");
    let uri = format!("binary://{}?dir={}", logger.display(), d.display());
    let o = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--log-uri",
        &uri,
        IMAGE,
        &id,
        "sh",
        "-c",
        script,
    ]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "stdout {} stderr {}\n{}",
        text(&o.stdout),
        text(&o.stderr),
        c.log_tail(40)
    );
    let read =
        |f: &str| std::fs::read_to_string(d.join(f)).unwrap_or_else(|e| format!("({f}: {e})"));
    // All there when ctr returns: the shim's delete waits for the logger to finish.
    assert_eq!(read("stdout"), "to stdout\n");
    assert_eq!(read("stderr"), "to stderr\n");
    assert_eq!(read("env"), format!("{NAMESPACE}/{id}\n"));
    assert_eq!(read("done"), "done\n", "the logger had not finished");
    assert!(
        processes_mentioning(&logger.display().to_string()).is_empty(),
        "logger left"
    );
    assert_clean(&c, &[&id]);

    // An exec's output through its own logger, which gets the exec's id.
    let id = run_sleeper(&c, &[]);
    let exec_dir = d.join("exec");
    std::fs::create_dir(&exec_dir).unwrap();
    let uri = format!("binary://{}?dir={}", logger.display(), exec_dir.display());
    let o = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "--log-uri",
        &uri,
        &id,
        "sh",
        "-c",
        "echo exec out; echo exec err >&2; exit 4",
    ]);
    assert_eq!(
        o.status.code(),
        Some(4),
        "{}\n{}",
        text(&o.stderr),
        c.log_tail(40)
    );
    let read_exec = |f: &str| {
        std::fs::read_to_string(exec_dir.join(f)).unwrap_or_else(|e| format!("({f}: {e})"))
    };
    assert_eq!(read_exec("stdout"), "exec out\n");
    assert_eq!(read_exec("stderr"), "exec err\n");
    assert_eq!(read_exec("env"), format!("{NAMESPACE}/e1\n"));
    assert_eq!(
        read_exec("done"),
        "done\n",
        "the exec's logger had not finished"
    );
    let _ = c.ctr(&["task", "kill", "--signal", "SIGKILL", &id]);
    wait_task(&c, &id, "STOPPED");
    let _ = c.ctr(&["task", "delete", &id]);
    let _ = c.ctr(&["container", "delete", &id]);
    assert_clean(&c, &[&id]);

    // file://: both streams appended to one file.
    let id = unique_id("ctrd");
    let log = d.join("file.log");
    let uri = format!("file://{}", log.display());
    let o = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--log-uri",
        &uri,
        IMAGE,
        &id,
        "sh",
        "-c",
        script,
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    let mut lines: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    lines.sort();
    assert_eq!(lines, ["to stderr", "to stdout"]);
    assert_clean(&c, &[&id]);

    // A logger that is not there: the task fails to start, saying which logger.
    let id = unique_id("ctrd");
    let o = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--log-uri",
        "binary:///no/such/logger",
        IMAGE,
        &id,
        "true",
    ]);
    let err = text(&o.stderr);
    eprintln!("ctr with a missing logger: {err}");
    assert!(!o.status.success());
    assert!(
        err.contains("cannot start logging binary /no/such/logger"),
        "{err}\n{}",
        c.log_tail(20)
    );
    let _ = c.ctr(&["container", "delete", &id]);
    assert_clean(&c, &[&id]);
}

/// Runs `cmd` with a terminal of its own (script(1)), bounded.
fn in_terminal(cmd: std::process::Command) -> std::process::Output {
    let line = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| format!("'{}'", a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ");
    let mut s = std::process::Command::new("script");
    s.args(["-qec", &line, "/dev/null"]);
    rootcell_e2e::output_with_timeout(s, None, rootcell_e2e::COMMAND_TIMEOUT)
}

#[test]
fn tty_and_oom_event() {
    let Some(c) = containerd(false) else {
        return;
    };

    // `ctr run -t` needs a terminal of its own: script(1) gives it one.
    let id = unique_id("ctrd");
    let ctr = c.ctr_command(&[
        "run",
        "--rm",
        "-t",
        "--runtime",
        RUNTIME,
        IMAGE,
        &id,
        "sh",
        "-c",
        "tty; stty size; exit 3",
    ]);
    let o = in_terminal(ctr);
    let out = text(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{out} {}\n{}",
        text(&o.stderr),
        c.log_tail(40)
    );
    assert!(out.contains("/dev/pts/"), "tty in the container: {out}");
    assert_clean(&c, &[&id]);

    // `ctr task exec -t` into a running container.
    let id = run_sleeper(&c, &[]);
    let o = in_terminal(c.ctr_command(&[
        "task",
        "exec",
        "-t",
        "--exec-id",
        "t1",
        &id,
        "sh",
        "-c",
        "tty; exit 4",
    ]));
    let out = text(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(4),
        "{out} {}\n{}",
        text(&o.stderr),
        c.log_tail(40)
    );
    assert!(out.contains("/dev/pts/"), "tty in the exec: {out}");
    let o = c.ctr(&["task", "kill", "-s", "SIGKILL", &id]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    wait_task(&c, &id, "STOPPED");
    let _ = c.ctr(&["task", "delete", &id]);
    let _ = c.ctr(&["container", "delete", &id]);
    assert_clean(&c, &[&id]);

    // An OOM kill in the guest under a memory limit reaches containerd as a /tasks/oom event.
    let mut events = c
        .ctr_command(&["events"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let id = unique_id("ctrd");
    let o = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--memory-limit",
        "33554432",
        IMAGE,
        &id,
        "sh",
        "-c",
        "tail /dev/zero",
    ]);
    assert_eq!(
        o.status.code(),
        Some(137),
        "{}\n{}",
        text(&o.stderr),
        c.log_tail(40)
    );
    std::thread::sleep(Duration::from_secs(1));
    let _ = events.kill();
    let mut ev = String::new();
    use std::io::Read;
    let _ = events.stdout.take().unwrap().read_to_string(&mut ev);
    let _ = events.wait();
    let oom: Vec<&str> = ev.lines().filter(|l| l.contains("/tasks/oom")).collect();
    assert!(!oom.is_empty(), "no /tasks/oom event: {ev}");
    assert!(oom.iter().any(|l| l.contains(&id)), "{oom:?}");
    assert_clean(&c, &[&id]);
}

/// The pid of a running task, from `ctr task ls`.
fn task_pid(c: &Containerd, id: &str) -> String {
    let o = c.ctr(&["task", "ls"]);
    let out = text(&o.stdout);
    out.lines()
        .find(|l| l.starts_with(id))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_else(|| panic!("no task {id}: {out}"))
        .to_string()
}

/// What containerd's CRI plugin does for a pod, done with `ctr`: the second container carries
/// the pod's `io.kubernetes.cri.sandbox-id` annotation (so containerd reaches the pod's shim)
/// and the sandbox container's namespace paths (so rootcell puts it in that VM).
#[test]
fn pod_annotation_shares_the_shim_and_the_vm() {
    let Some(c) = containerd(false) else {
        return;
    };
    let pod = unique_id("pod");
    let sandbox_ann = format!("io.kubernetes.cri.sandbox-id={pod}");
    let o = c.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--annotation",
        &sandbox_ann,
        IMAGE,
        &pod,
        "sh",
        "-c",
        "mkdir /www; echo pod-hello > /www/x; exec httpd -f -p 8080 -h /www",
    ]);
    assert!(
        o.status.success(),
        "{}\n{}",
        text(&o.stderr),
        c.log_tail(40)
    );
    wait_task(&c, &pod, "RUNNING");
    let pid = task_pid(&c, &pod);
    let member = unique_id("member");
    let ns = |t: &str| {
        format!(
            "{t}:/proc/{pid}/ns/{}",
            if t == "network" { "net" } else { t }
        )
    };
    let o = c.ctr(&[
        "run", "--rm", "--runtime", RUNTIME, "--annotation", &sandbox_ann,
        "--with-ns", &ns("network"), "--with-ns", &ns("ipc"), "--with-ns", &ns("uts"),
        IMAGE, &member, "sh", "-c",
        "for i in 1 2 3 4 5 6 7 8 9 10; do wget -qO- http://127.0.0.1:8080/x && exit 0; sleep 0.5; done; exit 1",
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}{}\n{}",
        text(&o.stdout),
        text(&o.stderr),
        c.log_tail(40)
    );
    assert!(text(&o.stdout).contains("pod-hello"), "{}", text(&o.stdout));
    // One shim for the pod: none was started for the member.
    let shims: Vec<String> = processes_mentioning("containerd-shim-rootcell-v2")
        .into_iter()
        .filter(|p| p.contains(&c.dir().display().to_string()))
        .collect();
    assert_eq!(shims.len(), 1, "{shims:#?}");
    assert!(shims[0].contains(&pod), "{shims:#?}");
    let o = c.ctr(&["task", "kill", "-s", "SIGKILL", &pod]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    wait_task(&c, &pod, "STOPPED");
    let o = c.ctr(&["task", "delete", &pod]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = c.ctr(&["container", "delete", &pod]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_clean(&c, &[&pod, &member]);
}

/// A program that cannot run: ctr fails with rootcell's message, and nothing is left.
#[test]
fn missing_program_is_a_clear_error_and_leaves_nothing() {
    let Some(c) = containerd(false) else {
        return;
    };
    let id = unique_id("ctrd");
    let o = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        IMAGE,
        &id,
        "/no/such/program",
    ]);
    let err = text(&o.stderr);
    eprintln!("ctr: {err}");
    assert!(!o.status.success());
    assert!(
        err.contains("/no/such/program"),
        "{err}\n{}",
        c.log_tail(40)
    );
    let _ = c.ctr(&["container", "delete", &id]);
    assert_clean(&c, &[&id]);
}

/// A root file system rootcell cannot share into a VM (`ctr run --rootfs`, a path containerd's
/// snapshotter does not manage): missing, or a file rather than a directory. ctr fails with
/// rootcell's reason naming the rootfs, and nothing is left.
#[test]
fn rootfs_that_cannot_be_shared_is_a_clear_error_and_leaves_nothing() {
    let Some(c) = containerd(false) else {
        return;
    };
    // Under /tmp, which the chrooted containerd of the 1.7 lane sees at the same path.
    let dir = tempfile::Builder::new()
        .prefix("rc-rootfs-")
        .tempdir_in("/tmp")
        .unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    for rootfs in [dir.path().join("no-such-dir"), file] {
        let id = unique_id("ctrd");
        let rootfs = rootfs.display().to_string();
        let o = c.ctr(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--rootfs",
            &rootfs,
            &id,
            "/bin/true",
        ]);
        let err = text(&o.stderr);
        eprintln!("ctr run --rootfs {rootfs}: {err}");
        assert!(!o.status.success(), "ran with rootfs {rootfs}");
        assert!(
            err.contains("rootfs") && err.contains(&rootfs),
            "{err}\n{}",
            c.log_tail(20)
        );
        let _ = c.ctr(&["container", "delete", &id]);
        assert_clean(&c, &[&id]);
    }
}

/// Connects to the CRI plugin of `c` (it serves a moment after containerd answers ctr).
fn cri_client(c: &Containerd) -> Cri {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Ready when it answers and has seen both imported images (without the pause image,
        // RunPodSandbox would try to pull it from a registry).
        let ready = Cri::connect(&c.cri_socket()).and_then(|mut k| {
            k.version()?;
            let ok = k.has_image(PAUSE_IMAGE)? && k.has_image(IMAGE)?;
            Ok((k, ok))
        });
        match ready {
            Ok((k, true)) => return k,
            Ok((_, false)) => assert!(
                Instant::now() < deadline,
                "CRI never saw the imported images\n{}",
                c.log_tail(40)
            ),
            Err(e) => assert!(
                Instant::now() < deadline,
                "CRI never answered: {e}\n{}",
                c.log_tail(40)
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until CRI reports container `id` running.
fn wait_running(c: &Containerd, cri: &mut Cri, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = cri.container_state(id).unwrap();
        if s == "ContainerRunning" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "container {id} is {s}\n{}",
            c.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The parent pid of `pid`, from /proc/PID/stat (after the parenthesised command name).
fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.split(' ').nth(1)?.parse().ok()
}

/// Whether `pid` holds a KVM VM (an `anon_inode:kvm-vm` descriptor): the built-in VMM, which
/// runs as threads of the container's sandbox, or QEMU on KVM.
fn holds_a_kvm_vm(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|d| {
        d.flatten().any(|e| {
            std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == "anon_inode:kvm-vm")
        })
    })
}

/// The pids of the processes running VMs below `c`'s rootcell shims (the shim is the subreaper
/// of the sandboxes that run the VMs): QEMU processes, and processes holding a KVM VM (the
/// built-in VMM, which `auto` picks where KVM works, as in the nested lane's L1).
fn vmms_of(c: &Containerd) -> Vec<u32> {
    let dir = c.dir().display().to_string();
    let shims: Vec<u32> = processes_mentioning("containerd-shim-rootcell-v2")
        .into_iter()
        .filter(|p| p.contains(&dir))
        .filter_map(|p| p.split(':').next().and_then(|s| s.parse().ok()))
        .collect();
    let below_a_shim = |q: u32| {
        let mut p = q;
        for _ in 0..32 {
            match ppid(p) {
                Some(pp) if shims.contains(&pp) => return true,
                Some(pp) if pp > 1 => p = pp,
                _ => return false,
            }
        }
        false
    };
    let mut vmms: Vec<u32> = processes_mentioning("qemu-system")
        .into_iter()
        .filter_map(|p| p.split(':').next().and_then(|s| s.parse::<u32>().ok()))
        .collect();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) {
            if !vmms.contains(&pid) && holds_a_kvm_vm(pid) {
                vmms.push(pid);
            }
        }
    }
    vmms.retain(|&q| below_a_shim(q));
    vmms
}

/// A Kubernetes-style pod through containerd's CRI gRPC API with the `rootcell` runtime handler:
/// RunPodSandbox, two containers that talk over 127.0.0.1, ExecSync, the CRI log file, one VM for
/// the pod, and StopPodSandbox + RemovePodSandbox leaving nothing.
#[test]
fn cri_pod_with_two_containers_is_one_vm() {
    let Some(c) = containerd(true) else {
        return;
    };
    let mut cri = cri_client(&c);
    let logs = c.dir().join("pods/web");
    std::fs::create_dir_all(&logs).unwrap();
    let t = Instant::now();
    let pod: Pod = cri
        .run_pod(&unique_id("pod"), "rootcell", &logs)
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", c.log_tail(60)));
    eprintln!("RunPodSandbox: {} ms", t.elapsed().as_millis());
    // CRI gave the pod a CNI network namespace, which rootcell took for the pod's VM.
    let netns = cri.pod_netns(&pod.id).unwrap();
    assert!(netns.starts_with("/var/run/netns/cni-"), "netns {netns:?}");
    assert!(c.host_path(&netns).exists(), "{netns} missing");

    let web = cri
        .create_container(
            &pod,
            "web",
            IMAGE,
            &[
                "sh",
                "-c",
                "mkdir -p /www; echo pod-hello > /www/x; exec httpd -f -p 8080 -h /www",
            ],
        )
        .unwrap_or_else(|e| panic!("CreateContainer web: {e}\n{}", c.log_tail(60)));
    cri.start_container(&web)
        .unwrap_or_else(|e| panic!("StartContainer web: {e}\n{}", c.log_tail(60)));
    wait_running(&c, &mut cri, &web);
    let client = cri
        .create_container(
            &pod,
            "client",
            IMAGE,
            &[
                "sh",
                "-c",
                "for i in $(seq 1 40); do wget -qO- http://127.0.0.1:8080/x && break; sleep 0.5; done; echo client-done; exec sleep 600",
            ],
        )
        .unwrap_or_else(|e| panic!("CreateContainer client: {e}\n{}", c.log_tail(60)));
    cri.start_container(&client)
        .unwrap_or_else(|e| panic!("StartContainer client: {e}\n{}", c.log_tail(60)));
    wait_running(&c, &mut cri, &client);

    // The client's output, in the CRI log format ("TIME stdout F LINE"), in the pod's log dir.
    let log = logs.join("client.log");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let l = std::fs::read_to_string(&log).unwrap_or_default();
        if l.contains("client-done") {
            assert!(
                l.lines()
                    .any(|x| x.contains(" stdout F pod-hello") || x.contains(" stdout P pod-hello")),
                "{l}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "client log {}: {l:?}\n{}",
            log.display(),
            c.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // ExecSync into the server: output, error output and exit code.
    let (code, out, err) = cri
        .exec_sync(
            &web,
            &["sh", "-c", "cat /www/x; echo to-err >&2; exit 3"],
            60,
        )
        .unwrap_or_else(|e| panic!("ExecSync: {e}\n{}", c.log_tail(60)));
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (3, "pod-hello\n", "to-err\n")
    );

    // UpdateContainerResources (through the shim's Update) reaches the container's cgroup in
    // the guest.
    let limits = [
        "sh",
        "-c",
        "cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/memory.max",
    ];
    // Without a limit of its own the container may use the VM's RAM less the guest's share.
    let (code, out, err) = cri.exec_sync(&web, &limits, 60).unwrap();
    assert_eq!(code, 0, "{err}");
    assert_ne!(out.trim(), (200u64 << 20).to_string(), "before the update");
    cri.update_memory(&web, 200 << 20)
        .unwrap_or_else(|e| panic!("UpdateContainerResources: {e}\n{}", c.log_tail(60)));
    let (code, out, err) = cri.exec_sync(&web, &limits, 60).unwrap();
    assert_eq!(
        (code, out.trim()),
        (0, (200u64 << 20).to_string().as_str()),
        "{err}"
    );

    // ContainerStats (kubelet's view, from the shim's metrics): the server's own usage in the
    // guest, a few MiB, not the pod VM's host cgroup (the whole VM, over 100 MiB).
    let (mem, cpu) = cri
        .container_stats(&web)
        .unwrap_or_else(|e| panic!("ContainerStats: {e}\n{}", c.log_tail(60)));
    eprintln!("ContainerStats web: working set {mem} B, cpu {cpu} ns");
    assert!(mem > 0 && mem < 32 << 20, "working set {mem}");
    assert!(cpu > 0, "cpu {cpu}");

    // One VM for the pod (sandbox + two containers), one shim.
    let vmms = vmms_of(&c);
    assert_eq!(
        vmms.len(),
        1,
        "{vmms:?} {:#?}",
        processes_mentioning("qemu-system")
    );
    eprintln!(
        "the pod's VMM: pid {} ({})",
        vmms[0],
        std::fs::read_to_string(format!("/proc/{}/comm", vmms[0]))
            .unwrap_or_default()
            .trim()
    );
    let shims: Vec<String> = processes_mentioning("containerd-shim-rootcell-v2")
        .into_iter()
        .filter(|p| p.contains(&c.dir().display().to_string()))
        .collect();
    assert_eq!(shims.len(), 1, "{shims:#?}");

    let t = Instant::now();
    cri.stop_pod(&pod.id)
        .unwrap_or_else(|e| panic!("StopPodSandbox: {e}\n{}", c.log_tail(60)));
    cri.remove_pod(&pod.id)
        .unwrap_or_else(|e| panic!("RemovePodSandbox: {e}\n{}", c.log_tail(60)));
    eprintln!(
        "StopPodSandbox + RemovePodSandbox: {} ms",
        t.elapsed().as_millis()
    );
    assert_clean_in(
        &c,
        &c.rootcell_root_in(CRI_NAMESPACE),
        &[&pod.id, &web, &client],
    );
    for q in vmms {
        assert!(
            !std::path::Path::new(&format!("/proc/{q}")).exists(),
            "the pod's VMM {q} is left"
        );
    }
    assert!(!c.host_path(&netns).exists(), "{netns} left");
    // Nor the sandbox's /dev/shm or any other mount of the pod or its containers.
    let mounts = c.mountinfo();
    let leaked: Vec<&str> = mounts
        .lines()
        .filter(|l| {
            [&pod.id, &web, &client]
                .iter()
                .any(|id| l.contains(id.as_str()))
        })
        .collect();
    assert!(leaked.is_empty(), "mounts left: {leaked:#?}");
}

/// A `hostNetwork: true` pod with the `rootcell` handler: RunPodSandbox fails with rootcell's
/// reason (a VM cannot share the host's network stack), and nothing is left.
#[test]
fn cri_host_network_pod_is_refused_clearly() {
    let Some(c) = containerd(true) else {
        return;
    };
    let mut cri = cri_client(&c);
    let logs = c.dir().join("pods/hostnet");
    std::fs::create_dir_all(&logs).unwrap();
    let name = unique_id("hostnet");
    let err = match cri.run_pod_with(&name, "rootcell", &logs, true, 0, 0) {
        Ok(p) => panic!("a hostNetwork pod started: {}", p.id),
        Err(e) => e.to_string(),
    };
    eprintln!("RunPodSandbox: {err}");
    assert!(err.contains("host's network"), "{err}");
    // The shim that containerd started for the pod ends with its failed task.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let shims: Vec<String> = processes_mentioning("containerd-shim-rootcell-v2")
            .into_iter()
            .filter(|p| p.contains(&c.dir().display().to_string()))
            .collect();
        if shims.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "shim left: {shims:#?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_clean_in(&c, &c.rootcell_root_in(CRI_NAMESPACE), &[&name]);
}

/// A container that does not fit the pod's VM (its memory limit is more than the VM booted
/// with): StartContainer fails with rootcell's reason, the pod's other container goes on, and
/// removing the pod leaves nothing.
#[test]
fn cri_container_too_big_for_the_pod_vm_is_refused_clearly() {
    let Some(c) = containerd(true) else {
        return;
    };
    let mut cri = cri_client(&c);
    let logs = c.dir().join("pods/big");
    std::fs::create_dir_all(&logs).unwrap();
    let pod = cri
        .run_pod(&unique_id("big"), "rootcell", &logs)
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", c.log_tail(60)));
    let small = cri
        .create_container(&pod, "small", IMAGE, &["sleep", "600"])
        .unwrap();
    cri.start_container(&small).unwrap();
    wait_running(&c, &mut cri, &small);
    let big = cri
        .create_container_with(&pod, "big", IMAGE, &["sleep", "600"], 64 << 30)
        .unwrap_or_else(|e| panic!("CreateContainer big: {e}\n{}", c.log_tail(60)));
    let err = match cri.start_container(&big) {
        Ok(()) => panic!("a 64 GiB container started in the pod's VM"),
        Err(e) => e.to_string(),
    };
    eprintln!("StartContainer: {err}");
    assert!(err.contains("does not fit in the VM"), "{err}");
    // The same reason is in containerd's own log, where an operator looks.
    let log = std::fs::read_to_string(c.dir().join("containerd.log")).unwrap_or_default();
    let logged: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("does not fit in the VM"))
        .collect();
    assert!(
        !logged.is_empty(),
        "containerd's log lacks the reason:\n{}",
        c.log_tail(30)
    );
    eprintln!("containerd log: {}", logged[0]);
    // The pod is unharmed.
    let (code, out, _) = cri.exec_sync(&small, &["echo", "still-here"], 60).unwrap();
    assert_eq!((code, out.as_str()), (0, "still-here\n"));
    cri.stop_pod(&pod.id).unwrap();
    cri.remove_pod(&pod.id).unwrap();
    assert_clean_in(
        &c,
        &c.rootcell_root_in(CRI_NAMESPACE),
        &[&pod.id, &small, &big],
    );

    // A pod whose pod-level resources (what kubelet passes for the pod's containers) are 1 GiB
    // and 2 CPUs: its VM is sized for them, and a 700 MiB container, too big for a default VM,
    // runs in it and sees both CPUs (this host has 2).
    let pod = cri
        .run_pod_with(&unique_id("big"), "rootcell", &logs, false, 1 << 30, 2)
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", c.log_tail(60)));
    let big = cri
        .create_container_with(&pod, "big2", IMAGE, &["sleep", "600"], 700 << 20)
        .unwrap();
    cri.start_container(&big)
        .unwrap_or_else(|e| panic!("StartContainer in a 1 GiB pod: {e}\n{}", c.log_tail(60)));
    wait_running(&c, &mut cri, &big);
    let (code, out, _) = cri
        .exec_sync(&big, &["sh", "-c", "grep MemTotal /proc/meminfo"], 60)
        .unwrap();
    let kib: u64 = out
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert_eq!(code, 0, "{out}");
    assert!(kib > 900 * 1024, "guest MemTotal {kib} KiB");
    let (code, out, _) = cri.exec_sync(&big, &["nproc"], 60).unwrap();
    assert_eq!((code, out.trim()), (0, "2"), "guest CPUs");
    cri.stop_pod(&pod.id).unwrap();
    cri.remove_pod(&pod.id).unwrap();
    assert_clean_in(&c, &c.rootcell_root_in(CRI_NAMESPACE), &[&pod.id, &big]);
}

/// Benchmark (bench/containerd.sh; printed, not asserted): through one CRI containerd, pod start
/// (RunPodSandbox) to its first container running, and a second container added to the running
/// pod, for the `rootcell` handler against `runc`. `BENCH_N` runs per handler (default 3).
#[test]
#[ignore = "benchmark: bench/containerd.sh"]
fn cri_bench() {
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let c = Containerd::start_cri_on(crate::engine());
    let mut cri = cri_client(&c);
    let stats = |mut v: Vec<u128>| {
        v.sort();
        format!(
            "median {} ms (min {}, max {}, n={})",
            v[v.len() / 2],
            v[0],
            v[v.len() - 1],
            v.len()
        )
    };
    for handler in ["runc", "rootcell"] {
        let (mut first, mut second) = (Vec::new(), Vec::new());
        for i in 0..n {
            let logs = c.dir().join(format!("pods/{handler}-{i}"));
            std::fs::create_dir_all(&logs).unwrap();
            let t0 = Instant::now();
            let pod = cri
                .run_pod(&unique_id("bench"), handler, &logs)
                .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", c.log_tail(60)));
            let a = cri
                .create_container(&pod, "a", IMAGE, &["sleep", "600"])
                .unwrap();
            cri.start_container(&a).unwrap();
            wait_running(&c, &mut cri, &a);
            first.push(t0.elapsed().as_millis());
            let t1 = Instant::now();
            let b = cri
                .create_container(&pod, "b", IMAGE, &["sleep", "600"])
                .unwrap();
            cri.start_container(&b).unwrap();
            wait_running(&c, &mut cri, &b);
            second.push(t1.elapsed().as_millis());
            cri.stop_pod(&pod.id).unwrap();
            cri.remove_pod(&pod.id).unwrap();
        }
        println!(
            "containerd CRI {handler:8} pod start to first container running: {}",
            stats(first)
        );
        println!(
            "containerd CRI {handler:8} second container added to the pod:     {}",
            stats(second)
        );
    }
}
