//! INGInious 0.9.2 (from PyPI) grades need_root tasks through rootcell, as an operator would run
//! it: its backend and docker agent on this machine, a private dockerd (Debian's docker.io) with
//! rootcell registered in daemon.json as `kata-runtime`, a Debian grading image with INGInious'
//! base-containers/base, and jobs submitted with INGInious' client library. The agent finds the
//! runtime by itself (it looks for a runtime named kata-runtime in `docker info`) and gives it
//! the course's "kata" tasks, whose grading scripts run as root.
//!
//! Three registrations of `kata-runtime`, one after the other, each with its own daemon:
//! 1. rootcell with `runtimeArgs: ["--guest-privileged"]` (the recipe in the README): a
//!    need_root task with a 100 MB limit mounts, adds an interface, writes /proc/sys, sets the
//!    hostname, and its clock is the host's; run_student (stdin, stdout, exit code, as the worker
//!    and with --run-as-root); a task allocating past its limit ends as `overflow`.
//! 2. runc, the reference: the same need_root task runs, its capability checks fail.
//! 3. rootcell without the flag: the same checks pass and fail exactly as under runc (the policy
//!    is opt-in).
//!
//! Every check of every phase is made and the failures are reported together at the end. The
//! need_root job's wall time (submission to result, INGInious' client) is printed for rootcell
//! and runc side by side; it is not asserted.
//!
//! First run: builds the venv and the grading image (cached in /var/cache/rootcell, about 3
//! minutes with a fresh debootstrap).

use rootcell_e2e::artifacts;
use rootcell_e2e::inginious::{Grading, Job};
use rootcell_e2e::{processes_mentioning, run_dir};
use serde_json::{json, Value};
use std::time::Duration;

/// Need_root checks whose outcome depends on capabilities and writable /proc/sys.
const ROOT_CHECKS: &[&str] = &["mount_tmpfs", "dummy_interface", "ip_forward", "hostname"];
/// How many need_root jobs are timed per registration.
const TIMED_RUNS: usize = 3;
const PER_JOB: Duration = Duration::from_secs(300);

fn rootcell(runtime_args: &[&str]) -> Value {
    json!({"path": artifacts().bin, "runtimeArgs": runtime_args})
}

/// Soft assertions: every phase runs, every failure is listed at the end.
#[derive(Default)]
struct Checks(Vec<String>);

impl Checks {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            let msg = what();
            eprintln!("inginious: FAILED: {msg}");
            self.0.push(msg);
        }
    }
}

/// Where a need_root job's wall time went, from the client's times and the grading script's own
/// (its clock is the host's, within a second): submission to the script's start, the script,
/// its end to the result; and how long the guest kernel had been up when the script started.
fn breakdown(j: &Job, vm: bool) -> String {
    let (t0, t1) = j.host_window();
    let f = |k: &str| j.custom(k).as_f64().unwrap_or(f64::NAN);
    let (start, end) = (f("t_start"), f("t_end"));
    let mut s = format!(
        "{:.1} s = submission -> grading script {:.1} + script {:.1} + script end -> result {:.1}",
        t1 - t0,
        start - t0,
        end - start,
        t1 - end
    );
    if vm {
        s += &format!(
            " (guest kernel up {:.1} s when the script started)",
            f("uptime_at_start")
        );
    }
    s
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    s[s.len() / 2]
}

/// Checks that the agent detected kata-runtime itself and that the backend announced the
/// "kata" environment type with the grading image.
fn check_detection(c: &mut Checks, g: &Grading, envs: &Value, label: &str) {
    let log = g.agent_log();
    c.check(log.contains("Using kata-runtime as runtime"), || {
        format!("{label}: the agent log never says it uses kata-runtime:\n{log}")
    });
    c.check(
        envs["kata"]
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e == "default")),
        || format!("{label}: no kata/default environment announced: {envs}"),
    );
}

/// The need_root job's own checks, common to every registration: the job succeeded, root is
/// uid 0, the guest's clock (date +%s in the grading script, also on its stdout) is within 5 s
/// of the host's time during the job. Returns whether the job succeeded; the other checks are
/// made only then (a crashed job has no values to check).
fn check_need_root_job(c: &mut Checks, j: &Job, label: &str) -> bool {
    if j.result() != "success" {
        c.check(false, || {
            format!(
                "{label}: need_root job result {:?}, not success:\n{}",
                j.result(),
                j.summary()
            )
        });
        return false;
    }
    c.check(j.custom("root") == "ok", || {
        format!("{label}: need_root: not uid 0: {}", j.custom("root"))
    });
    let (t0, t1) = j.host_window();
    let printed = j.custom("date").as_str().unwrap_or("?");
    let date: f64 = printed.parse().unwrap_or(f64::NAN);
    c.check(date >= t0 - 5.0 && date <= t1 + 5.0, || {
        format!(
            "{label}: the grading script's `date +%s` is {printed}, the host's time during the job was {t0:.0}..{t1:.0} (off by {:.0} s)",
            if date < t0 { date - t0 } else { date - t1 }
        )
    });
    let stdout = j.0["stdout"].as_str().unwrap_or("");
    c.check(stdout.contains(&format!("date: {printed}")), || {
        format!("{label}: the grading script's stdout lacks its date line: {stdout:?}")
    });
    true
}

fn outcomes(j: &Job) -> Vec<(String, bool)> {
    ROOT_CHECKS
        .iter()
        .map(|k| (k.to_string(), j.custom(k) == "ok"))
        .collect()
}

/// No process and no mount mentions any of `dirs`, within 20 s.
fn check_nothing_left(c: &mut Checks, dirs: &[String], label: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let procs: Vec<String> = dirs.iter().flat_map(|d| processes_mentioning(d)).collect();
        let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| dirs.iter().any(|d| l.contains(d.as_str())))
            .map(String::from)
            .collect();
        if procs.is_empty() && mounts.is_empty() {
            return;
        }
        if std::time::Instant::now() > deadline {
            c.check(false, || {
                format!(
                    "{label}: left behind after stopping: processes {procs:#?}, mounts {mounts:#?}"
                )
            });
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Container ids (64 hex digits) the agent's log names: every grading and student container.
fn logged_container_ids(log: &str) -> Vec<String> {
    let mut ids: Vec<String> = log
        .split(|ch: char| !ch.is_ascii_hexdigit())
        .filter(|w| w.len() == 64)
        .map(String::from)
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Stops a Grading (agent, backend, containers, daemon), printing its logs if this phase failed
/// a check (more than `failures_before`), and checks nothing is left: no process
/// or mount mentions its directories (dockerd, containerd, shims, sandboxes), and no VM of a
/// container it ran (QEMU names the container's run dir) nor that run dir remains.
fn finish(c: &mut Checks, g: Grading, label: &str, failures_before: usize) {
    if c.0.len() > failures_before {
        eprintln!("inginious: {label}: logs\n{}", g.logs_tail(60));
    }
    let mut needles = vec![
        g.dir().to_string_lossy().into_owned(),
        g.daemon.dir().to_string_lossy().into_owned(),
    ];
    let root = g.daemon.runtime_root();
    let ids = logged_container_ids(&g.agent_log());
    c.check(!ids.is_empty(), || {
        format!("{label}: the agent's log names no container")
    });
    let run_dirs: Vec<std::path::PathBuf> = ids.iter().map(|id| run_dir(&root, id)).collect();
    needles.extend(run_dirs.iter().map(|d| d.to_string_lossy().into_owned()));
    drop(g);
    check_nothing_left(c, &needles, label);
    for d in &run_dirs {
        c.check(!d.exists(), || {
            format!("{label}: run dir {} left behind", d.display())
        });
    }
}

#[test]
fn inginious_grades_need_root_tasks_through_rootcell() {
    let mut c = Checks::default();

    // 1. rootcell --guest-privileged.
    let label = "rootcell --guest-privileged";
    eprintln!("inginious: {label}: starting dockerd, backend, agent");
    let g = Grading::start(rootcell(&["--guest-privileged"]));
    let jobs = [
        format!("need_root:{TIMED_RUNS}"),
        "run_student".into(),
        "overflow".into(),
    ];
    let jobs: Vec<&str> = jobs.iter().map(String::as_str).collect();
    let (envs, results) = g.submit(&jobs, PER_JOB);
    check_detection(&mut c, &g, &envs, label);
    let need_root: Vec<&Job> = results
        .iter()
        .filter(|j| j.0["task"] == "need_root")
        .collect();
    for j in &need_root {
        if !check_need_root_job(&mut c, j, label) {
            continue;
        }
        for k in ROOT_CHECKS {
            c.check(j.custom(k) == "ok", || {
                format!("{label}: need_root check {k}: {}", j.custom(k))
            });
        }
    }
    let rootcell_walls: Vec<f64> = need_root.iter().map(|j| j.wall()).collect();
    let rootcell_breakdown: Vec<String> = need_root.iter().map(|j| breakdown(j, true)).collect();

    let rs = results
        .iter()
        .find(|j| j.0["task"] == "run_student")
        .unwrap();
    c.check(rs.result() == "success", || {
        format!(
            "{label}: run_student job result {:?}:\n{}",
            rs.result(),
            rs.summary()
        )
    });
    let w = rs.custom("as_worker");
    let ran = rs.result() == "success";
    c.check(
        !ran || (w["stdout"] == "hello from the grader:4242\n" && w["code"] == 3),
        || format!("{label}: run_student (stdin in, stdout and exit code 3 back, as worker 4242): got {w}"),
    );
    let r = rs.custom("as_root");
    c.check(
        !ran || (r["stdout"] == "as root:0\n" && r["code"] == 0),
        || format!("{label}: run_student --run-as-root: got {r}"),
    );
    let n = rs.custom("share_network");
    c.check(
        !ran || (n["stdout"] == "hello from the grader's localhost\n" && n["code"] == 0),
        || format!("{label}: run_student --share-network reaching the grader's 127.0.0.1: got {n}"),
    );

    let ov = results.iter().find(|j| j.0["task"] == "overflow").unwrap();
    c.check(ov.result() == "overflow", || {
        format!(
            "{label}: the overflow task's result is {:?}, not overflow:\n{}",
            ov.result(),
            ov.summary()
        )
    });
    finish(&mut c, g, label, 0);

    // 2. runc as kata-runtime: the reference for the checks, and for the wall time.
    let label = "runc";
    let before = c.0.len();
    eprintln!("inginious: {label} as kata-runtime: starting dockerd, backend, agent");
    let g = Grading::start(json!({"path": "/usr/sbin/runc"}));
    let (envs, results) = g.submit(&[&format!("need_root:{TIMED_RUNS}")], PER_JOB);
    check_detection(&mut c, &g, &envs, label);
    for j in &results {
        check_need_root_job(&mut c, j, label);
    }
    let runc_walls: Vec<f64> = results.iter().map(|j| j.wall()).collect();
    let runc_breakdown: Vec<String> = results.iter().map(|j| breakdown(j, false)).collect();
    let runc_outcomes = outcomes(&results[0]);
    c.check(runc_outcomes.iter().all(|(_, ok)| !ok), || {
        format!("{label}: expected every capability check to fail under runc: {runc_outcomes:?}")
    });
    finish(&mut c, g, label, before);

    // 3. rootcell without --guest-privileged: root as Docker's spec says, as under runc.
    let label = "rootcell (no runtimeArgs)";
    let before = c.0.len();
    eprintln!("inginious: {label}: starting dockerd, backend, agent");
    let g = Grading::start(rootcell(&[]));
    let (envs, results) = g.submit(&["need_root"], PER_JOB);
    check_detection(&mut c, &g, &envs, label);
    let j = &results[0];
    let ran = check_need_root_job(&mut c, j, label);
    let plain = outcomes(j);
    c.check(!ran || plain == runc_outcomes, || {
        format!(
            "{label}: the capability checks should come out as under runc {runc_outcomes:?}, got {plain:?}: {}",
            j.summary()
        )
    });
    finish(&mut c, g, label, before);

    let fmt = |v: &[f64]| {
        v.iter()
            .map(|s| format!("{s:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    eprintln!(
        "inginious: need_root job wall time, submission -> result (INGInious client), seconds:"
    );
    eprintln!(
        "inginious:   rootcell --guest-privileged: median {:.1}  [{}]",
        median(&rootcell_walls),
        fmt(&rootcell_walls)
    );
    eprintln!(
        "inginious:   runc:                        median {:.1}  [{}]",
        median(&runc_walls),
        fmt(&runc_walls)
    );
    for (label, lines) in [("rootcell", &rootcell_breakdown), ("runc", &runc_breakdown)] {
        for l in lines {
            eprintln!("inginious:   {label}: {l}");
        }
    }
    assert!(
        c.0.is_empty(),
        "{} INGInious check(s) failed:\n- {}",
        c.0.len(),
        c.0.join("\n- ")
    );
}
