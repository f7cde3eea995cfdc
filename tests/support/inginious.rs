//! INGInious for real, for `tests/e2e/inginious.rs`: INGInious 0.9.2 from PyPI (a venv built by
//! `images/inginious/build-venv.sh`), its backend and docker agent on this machine against a
//! private dockerd, the Debian grading image of `images/inginious/build-grading-image.sh`
//! imported into it, and jobs submitted with INGInious' own client library
//! (`tests/inginious/submit.py`) for the course in `tests/inginious/course`.
//!
//! A [`Grading`] owns all of it: dropping it (also while a failed test unwinds) stops the agent
//! and backend, removes the daemon's containers, stops the daemon and removes the directories.

use crate::docker::{private_daemon, PrivateDaemon};
use crate::{output_with_timeout, text};
use serde_json::{json, Value};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The course id the test's course is copied under.
pub const COURSE: &str = "rootcell";
/// Time allowed to build the venv or the image the first time (downloads, debootstrap).
const BUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Time allowed to import the grading image (a few hundred MB) into a daemon.
const IMPORT_TIMEOUT: Duration = Duration::from_secs(300);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs one of the repository's cached build scripts and returns the directory it prints.
fn build(script: &str) -> PathBuf {
    let start = Instant::now();
    let o = output_with_timeout(
        {
            let mut c = Command::new(repo().join(script));
            c.stdin(Stdio::null());
            c
        },
        None,
        BUILD_TIMEOUT,
    );
    assert!(
        o.status.success(),
        "{script} failed ({:?}):\n{}",
        o.status,
        text(&o.stderr)
    );
    let dir = PathBuf::from(text(&o.stdout).trim());
    assert!(dir.is_dir(), "{script} printed no directory: {dir:?}");
    if start.elapsed() > Duration::from_secs(5) {
        eprintln!(
            "inginious: {script} built {} in {:.0} s",
            dir.display(),
            start.elapsed().as_secs_f64()
        );
    }
    dir
}

/// The INGInious venv (built on first use, cached in /var/cache/rootcell).
pub fn venv() -> &'static Path {
    static V: OnceLock<PathBuf> = OnceLock::new();
    V.get_or_init(|| build("images/inginious/build-venv.sh"))
}

/// The grading image's directory: rootfs.tar, changes, name (built on first use, cached).
pub fn grading_image() -> &'static Path {
    static I: OnceLock<PathBuf> = OnceLock::new();
    I.get_or_init(|| build("images/inginious/build-grading-image.sh"))
}

/// A running INGInious installation: private dockerd with one `kata-runtime` registration, the
/// grading image, backend and docker agent, and a tasks directory holding the test's course.
pub struct Grading {
    backend: Option<Child>,
    agent: Option<Child>,
    /// Dropped after the agent and backend are stopped (field order): removes the containers.
    pub daemon: PrivateDaemon,
    dir: tempfile::TempDir,
}

/// What INGInious returned for one job, as `submit.py` prints it.
#[derive(Debug, Clone)]
pub struct Job(pub Value);

impl Job {
    /// The result string (`success`, `failed`, `crash`, `overflow`, `timeout`, ...).
    pub fn result(&self) -> &str {
        self.0["result"].as_str().unwrap_or("")
    }
    /// A value the grading script set with `feedback.set_custom_value`.
    pub fn custom(&self, key: &str) -> &Value {
        &self.0["custom"][key]
    }
    /// Submission to result, seconds, as the client saw it.
    pub fn wall(&self) -> f64 {
        self.0["wall"].as_f64().unwrap_or(f64::NAN)
    }
    /// Host time (seconds since the epoch) at submission and at the result.
    pub fn host_window(&self) -> (f64, f64) {
        (
            self.0["t_submit"].as_f64().unwrap_or(f64::NAN),
            self.0["t_done"].as_f64().unwrap_or(f64::NAN),
        )
    }
    /// The result without the bulky fields, for messages.
    pub fn summary(&self) -> String {
        let mut v = self.0.clone();
        if let Some(o) = v.as_object_mut() {
            o.remove("state");
        }
        serde_json::to_string_pretty(&v).unwrap()
    }
}

impl Grading {
    /// Starts it all with `kata_runtime` as the daemon.json registration of `kata-runtime`
    /// (e.g. `{"path": "/usr/local/bin/rootcell", "runtimeArgs": ["--guest-privileged"]}`).
    /// The agent is given no `--runtime`: it finds kata-runtime in `docker info` by itself.
    pub fn start(kata_runtime: Value) -> Grading {
        let venv = venv();
        let image = grading_image();
        // No bridge and no iptables rules: INGInious' tasks here run without network
        // (`network_mode: none`), and the daemon leaves the host's network alone.
        let daemon = private_daemon(&json!({
            "bridge": "none",
            "iptables": false,
            "runtimes": {"kata-runtime": kata_runtime},
        }));
        let dir = tempfile::Builder::new()
            .prefix("rc-inginious-")
            .tempdir_in("/tmp")
            .unwrap();

        // The grading image, labels and command as base-containers/base's Dockerfile sets them.
        let name = fs::read_to_string(image.join("name")).unwrap();
        let changes = fs::read_to_string(image.join("changes")).unwrap();
        let mut args: Vec<String> = vec!["import".into()];
        for line in changes.lines().filter(|l| !l.trim().is_empty()) {
            args.push("--change".into());
            args.push(line.into());
        }
        args.push(image.join("rootfs.tar").to_string_lossy().into_owned());
        args.push(name.trim().into());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = output_with_timeout(daemon.command(&argv), None, IMPORT_TIMEOUT);
        assert!(
            o.status.success(),
            "docker import of the grading image failed: {}",
            text(&o.stderr)
        );

        copy_dir(
            &repo().join("tests/inginious/course"),
            &dir.path().join("tasks").join(COURSE),
        );
        fs::create_dir_all(dir.path().join("agent_tmp")).unwrap();

        let agent_addr = format!("ipc://{}", dir.path().join("agent.sock").display());
        let client_addr = format!("ipc://{}", dir.path().join("client.sock").display());
        let log = |name: &str| fs::File::create(dir.path().join(name)).unwrap();
        let backend_log = log("backend.log");
        let agent_log = log("agent.log");
        let mut g = Grading {
            backend: None,
            agent: None,
            daemon,
            dir,
        };
        g.backend = Some(
            Command::new(venv.join("bin/inginious-backend"))
                .arg(&agent_addr)
                .arg(&client_addr)
                .current_dir(g.dir.path())
                .stdin(Stdio::null())
                .stdout(backend_log.try_clone().unwrap())
                .stderr(backend_log)
                .spawn()
                .expect("start inginious-backend"),
        );
        g.agent = Some(
            Command::new(venv.join("bin/inginious-agent-docker"))
                .arg(&agent_addr)
                .arg("--tasks")
                .arg(g.dir.path().join("tasks"))
                .arg("--tmpdir")
                .arg(g.dir.path().join("agent_tmp"))
                .arg("--friendly-name")
                .arg("rootcell-e2e")
                .arg("--disable-autorestart")
                .arg("-v")
                .env(
                    "DOCKER_HOST",
                    format!("unix://{}", g.daemon.socket().display()),
                )
                .current_dir(g.dir.path())
                .stdin(Stdio::null())
                .stdout(agent_log.try_clone().unwrap())
                .stderr(agent_log)
                .spawn()
                .expect("start inginious-agent-docker"),
        );
        g
    }

    /// The directory holding tasks, agent data, sockets and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The agent's log so far.
    pub fn agent_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// The last `n` lines of the agent's, backend's and dockerd's logs, for failure messages.
    pub fn logs_tail(&self, n: usize) -> String {
        let tail = |s: String| {
            let l: Vec<&str> = s.lines().collect();
            l[l.len().saturating_sub(n)..].join("\n")
        };
        format!(
            "--- agent log:\n{}\n--- backend log:\n{}\n--- dockerd log:\n{}",
            tail(self.agent_log()),
            tail(fs::read_to_string(self.dir.path().join("backend.log")).unwrap_or_default()),
            self.daemon.log_tail(n)
        )
    }

    /// Submits `jobs` (task ids, `TASK:COUNT` for repeats) one after the other through
    /// INGInious' client and returns the environments the backend announced and each result.
    /// Panics with the logs if the client fails to get a result within the bounds.
    pub fn submit(&self, jobs: &[&str], per_job: Duration) -> (Value, Vec<Job>) {
        let mut c = Command::new(venv().join("bin/python"));
        c.arg(repo().join("tests/inginious/submit.py"))
            .arg("--backend")
            .arg(format!(
                "ipc://{}",
                self.dir.path().join("client.sock").display()
            ))
            .arg("--tasks")
            .arg(self.dir.path().join("tasks"))
            .arg("--course")
            .arg(COURSE)
            .arg("--env-timeout")
            .arg("120")
            .arg("--job-timeout")
            .arg(per_job.as_secs().to_string())
            .args(jobs)
            .stdin(Stdio::null());
        let count: u32 = jobs
            .iter()
            .map(|j| j.split(':').nth(1).map_or(1, |n| n.parse().unwrap()))
            .sum();
        let bound = Duration::from_secs(150) + per_job * (count + 1);
        let o = output_with_timeout(c, None, bound);
        let lines: Vec<Value> = text(&o.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let envs = lines
            .iter()
            .find_map(|l| l.get("environments").cloned())
            .unwrap_or_else(|| {
                panic!(
                    "the INGInious client never saw the environments ({:?}): {}\nstderr: {}\n{}",
                    o.status,
                    text(&o.stdout),
                    text(&o.stderr),
                    self.logs_tail(40)
                )
            });
        let results: Vec<Job> = lines
            .into_iter()
            .filter(|l| l.get("task").is_some())
            .map(Job)
            .collect();
        assert!(
            o.status.success() && results.len() == count as usize,
            "the INGInious client got {} of {count} results ({:?}): {}\nstderr: {}\n{}",
            results.len(),
            o.status,
            text(&o.stdout),
            text(&o.stderr),
            self.logs_tail(40)
        );
        (envs, results)
    }
}

impl Drop for Grading {
    fn drop(&mut self) {
        for child in [self.agent.take(), self.backend.take()]
            .into_iter()
            .flatten()
        {
            stop(child);
        }
        // Then the daemon (field order): its containers are removed and it stops.
    }
}

/// SIGTERM, up to 10 s to exit, then SIGKILL.
fn stop(mut child: Child) {
    // SAFETY: signalling a process this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Copies a directory tree, keeping file modes (the grading scripts are executable).
fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            fs::copy(e.path(), &target).unwrap();
        }
    }
}
