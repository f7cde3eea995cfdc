//! containerd (Debian's 1.6, private) running busybox through `containerd-shim-rootcell-v2`:
//! `ctr run --runtime io.containerd.rootcell.v2`, exit codes, exec, kill, pause/resume, metrics,
//! and the cleanup path after the shim is killed.

use rootcell_e2e::containerd::{Containerd, IMAGE};
use rootcell_e2e::{processes_mentioning, text, unique_id};
use std::time::{Duration, Instant};

const RUNTIME: &str = "io.containerd.rootcell.v2";

fn enabled() -> bool {
    std::env::var("ROOTCELL_E2E").is_ok()
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
    let root = c.rootcell_root();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        // The sandbox names the root, the VMM and the shim (which ends with its last task) the
        // container id.
        let mut procs = processes_mentioning(&root.display().to_string());
        for id in ids {
            procs.extend(processes_mentioning(id));
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
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let task_dir = c
        .dir()
        .join("state/io.containerd.runtime.v2.task")
        .display()
        .to_string();
    let leaked: Vec<&str> = mounts.lines().filter(|l| l.contains(&task_dir)).collect();
    assert!(leaked.is_empty(), "mounts left: {leaked:#?}");
}

#[test]
fn ctr_run_exec_kill_pause_metrics() {
    if !enabled() {
        eprintln!("skipped: set ROOTCELL_E2E=1 (scripts/test.sh does)");
        return;
    }
    let c = Containerd::start();

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
    let id = unique_id("ctrd");
    let o = c.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--memory-limit",
        "67108864",
        IMAGE,
        &id,
        "sleep",
        "600",
    ]);
    assert!(
        o.status.success(),
        "{}\n{}",
        text(&o.stderr),
        c.log_tail(40)
    );
    wait_task(&c, &id, "RUNNING");

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

    let o = c.ctr(&["task", "metrics", &id]);
    eprintln!("metrics: {}{}", text(&o.stdout), text(&o.stderr));
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("memory"), "{}", text(&o.stdout));

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
    if !enabled() {
        eprintln!("skipped: set ROOTCELL_E2E=1 (scripts/test.sh does)");
        return;
    }
    let c = Containerd::start();
    let id = unique_id("ctrd");
    let o = c.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        IMAGE,
        &id,
        "sleep",
        "600",
    ]);
    assert!(
        o.status.success(),
        "{}\n{}",
        text(&o.stderr),
        c.log_tail(40)
    );
    wait_task(&c, &id, "RUNNING");
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
    if !enabled() {
        eprintln!("skipped: set ROOTCELL_E2E=1 (scripts/test.sh does)");
        return;
    }
    let c = Containerd::start();

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
    let id = unique_id("ctrd");
    let o = c.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        IMAGE,
        &id,
        "sleep",
        "600",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    wait_task(&c, &id, "RUNNING");
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
    if !enabled() {
        eprintln!("skipped: set ROOTCELL_E2E=1 (scripts/test.sh does)");
        return;
    }
    let c = Containerd::start();
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
    if !enabled() {
        eprintln!("skipped: set ROOTCELL_E2E=1 (scripts/test.sh does)");
        return;
    }
    let c = Containerd::start();
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
