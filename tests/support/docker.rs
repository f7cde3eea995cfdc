//! A private dockerd (with its own containerd) for the Docker end-to-end tests.
//!
//! The daemon gets data-root, exec-root, pidfile and socket in a temporary directory, rootcell
//! registered by path under the names `rootcell` and `kata-runtime`, and is stopped when the
//! test process exits (also when a test fails). The busybox image is imported from
//! busybox-static, since no registry can be reached. [`private_daemon`] starts further daemons,
//! each with a daemon.json of its own, stopped when dropped (or at exit).

use crate::text;
use crate::{artifacts, images_dir, output_with_timeout, COMMAND_TIMEOUT};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Docker 20.10's client from Debian's docker.io (a newer client elsewhere on PATH may not speak
/// to this daemon).
pub const DOCKER: &str = "/usr/bin/docker";
/// Debian docker.io's daemon.
pub const DOCKERD: &str = "/usr/sbin/dockerd";
/// The image every Docker test runs.
pub const IMAGE: &str = "rootcell-busybox:test";

/// A running private dockerd.
#[derive(Clone)]
pub struct DockerDaemon {
    dir: PathBuf,
    socket: PathBuf,
    /// dockerd flags beyond the private directories and the runtimes.
    extra: &'static [&'static str],
}

static DAEMON: OnceLock<DockerDaemon> = OnceLock::new();
static CHILD: Mutex<Option<Child>> = Mutex::new(None);
/// Daemons started by [`private_daemon`] and not yet dropped, stopped at exit if still running.
static OTHERS: Mutex<Vec<(DockerDaemon, Child)>> = Mutex::new(Vec::new());
static ATEXIT: std::sync::Once = std::sync::Once::new();

/// The shared daemon of this test process, started on first use.
pub fn daemon() -> &'static DockerDaemon {
    daemon_with(&[])
}

/// The shared daemon, started on first use with `extra` dockerd flags (one set per test binary).
pub fn daemon_with(extra: &'static [&'static str]) -> &'static DockerDaemon {
    let d = DAEMON.get_or_init(|| DockerDaemon::start(extra));
    assert_eq!(d.extra, extra, "one test binary, one set of dockerd flags");
    d
}

extern "C" fn stop_daemon_at_exit() {
    if let Some(d) = DAEMON.get() {
        let child = CHILD.lock().ok().and_then(|mut g| g.take());
        shutdown(d, child);
    }
    let others = OTHERS
        .lock()
        .map(|mut g| std::mem::take(&mut *g))
        .unwrap_or_default();
    for (d, child) in others {
        shutdown(&d, Some(child));
    }
}

/// Removes the daemon's containers, stops it, undoes its mounts and removes its directory.
fn shutdown(d: &DockerDaemon, child: Option<Child>) {
    // Containers the tests left behind first: their sandboxes would otherwise outlive dockerd.
    if child.is_some() {
        let ps = d.docker(&["ps", "-aq"]);
        let ids: Vec<String> = String::from_utf8_lossy(&ps.stdout)
            .split_whitespace()
            .map(String::from)
            .collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids.iter().map(String::as_str));
            let _ = d.docker(&args);
        }
    }
    if let Some(mut child) = child {
        stop_child(&mut child);
    }
    // Docker bind-mounts network namespaces (the host's for --network host) under
    // exec/netns; exec itself is no mount point, so `umount -R exec` would miss them.
    if let Ok(entries) = std::fs::read_dir(d.dir.join("exec/netns")) {
        for e in entries.flatten() {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(e.path())
                .stderr(Stdio::null())
                .status();
        }
    }
    // Usually dockerd unmounted them already; "not mounted" is not worth printing.
    for sub in ["data", "exec"] {
        let _ = Command::new("umount")
            .arg("-R")
            .arg("-l")
            .arg(d.dir.join(sub))
            .stderr(Stdio::null())
            .status();
    }
    let _ = std::fs::remove_dir_all(&d.dir);
}

/// A private dockerd of its own with `daemon_json` as its daemon.json (for example runtimes with
/// `runtimeArgs`, which `--add-runtime` cannot give); it has no runtimes but those the file
/// registers. Dropping it removes its containers and stops it; one never dropped is stopped at
/// process exit like the shared daemon.
pub fn private_daemon(daemon_json: &serde_json::Value) -> PrivateDaemon {
    let (daemon, child) = DockerDaemon::spawn(&[], Some(daemon_json));
    OTHERS.lock().unwrap().push((daemon.clone(), child));
    PrivateDaemon(daemon)
}

/// See [`private_daemon`].
pub struct PrivateDaemon(DockerDaemon);

impl std::ops::Deref for PrivateDaemon {
    type Target = DockerDaemon;
    fn deref(&self) -> &DockerDaemon {
        &self.0
    }
}

impl Drop for PrivateDaemon {
    fn drop(&mut self) {
        let child = OTHERS.lock().ok().and_then(|mut g| {
            let i = g.iter().position(|(d, _)| d.dir == self.0.dir)?;
            Some(g.remove(i).1)
        });
        if child.is_some() {
            shutdown(&self.0, child);
        }
    }
}

fn stop_child(child: &mut Child) {
    // SAFETY: signalling the dockerd this process started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl DockerDaemon {
    fn start(extra: &'static [&'static str]) -> DockerDaemon {
        let (d, child) = Self::spawn(extra, None);
        *CHILD.lock().unwrap() = Some(child);
        d
    }

    /// Starts a dockerd with rootcell registered by `--add-runtime`, or with `config` as its
    /// daemon.json instead; returns once it answers and has the busybox image.
    fn spawn(
        extra: &'static [&'static str],
        config: Option<&serde_json::Value>,
    ) -> (DockerDaemon, Child) {
        let art = artifacts();
        assert!(
            Path::new(DOCKERD).exists(),
            "dockerd missing: scripts/install-deps.sh installs docker.io"
        );
        let dir = tempfile::Builder::new()
            .prefix("rc-docker-")
            .tempdir_in("/tmp")
            .unwrap()
            .keep();
        let socket = dir.join("docker.sock");
        let log = std::fs::File::create(dir.join("dockerd.log")).unwrap();
        let mut cmd = Command::new(DOCKERD);
        cmd.arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .arg("--host")
            .arg(format!("unix://{}", socket.display()));
        match config {
            Some(config) => {
                let file = dir.join("daemon.json");
                std::fs::write(&file, serde_json::to_vec_pretty(config).unwrap()).unwrap();
                cmd.arg("--config-file").arg(file);
            }
            None => {
                cmd.arg("--add-runtime")
                    .arg(format!("rootcell={}", art.bin.display()))
                    .arg("--add-runtime")
                    .arg(format!("kata-runtime={}", art.bin.display()));
            }
        }
        cmd.args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let mut child = cmd.spawn().expect("start dockerd");
        // SAFETY: registering a plain extern "C" function to run at process exit, once.
        ATEXIT.call_once(|| unsafe {
            libc::atexit(stop_daemon_at_exit);
        });
        let d = DockerDaemon { dir, socket, extra };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let o = d.docker(&["version", "--format", "{{.Server.Version}}"]);
            if o.status.success() {
                break;
            }
            if Instant::now() > deadline || matches!(child.try_wait(), Ok(Some(_))) {
                let log = std::fs::read_to_string(d.dir.join("dockerd.log")).unwrap_or_default();
                shutdown(&d, Some(child));
                panic!(
                    "dockerd did not come up within 60 s; its log ends:\n{}",
                    tail(&log, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        d.import_busybox();
        (d, child)
    }

    /// The daemon's API socket (for clients other than the docker CLI: `DOCKER_HOST`).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The daemon's private directory (data-root, exec-root, socket, log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs `docker ARGS` against this daemon, bounded, output captured.
    pub fn docker(&self, args: &[&str]) -> Output {
        output_with_timeout(self.command(args), None, COMMAND_TIMEOUT)
    }

    /// Runs `docker ARGS` with `input` on stdin.
    pub fn docker_with_input(&self, args: &[&str], input: Vec<u8>) -> Output {
        output_with_timeout(self.command(args), Some(input), COMMAND_TIMEOUT)
    }

    /// A `docker ARGS` command against this daemon, not yet started.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(DOCKER);
        c.arg("--host")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args);
        c.stdin(Stdio::null());
        c
    }

    /// The daemon's log so far (for failure messages).
    pub fn log_tail(&self, lines: usize) -> String {
        tail(
            &std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default(),
            lines,
        )
    }

    /// The runtime root Docker passes to rootcell (`--root`). Observed with Docker 20.10: the shim
    /// gets `runtime-runc` for every runtime registered by path, plus the containerd namespace.
    pub fn runtime_root(&self) -> PathBuf {
        self.dir.join("exec/runtime-runc/moby")
    }

    fn import_busybox(&self) {
        let rootfs = self.dir.join("busybox-rootfs");
        let st = Command::new(images_dir().join("make-rootfs.sh"))
            .arg(&rootfs)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "images/make-rootfs.sh failed");
        let tar = Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-c")
            .arg(".")
            .output()
            .unwrap();
        assert!(tar.status.success());
        let o = self.docker_with_input(&["import", "-", IMAGE], tar.stdout);
        assert!(
            o.status.success(),
            "docker import failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let _ = std::fs::remove_dir_all(&rootfs);
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `docker ARGS`, asserting success; returns stdout.
pub fn ok(d: &DockerDaemon, args: &[&str]) -> String {
    let o = d.docker(args);
    assert!(
        o.status.success(),
        "docker {args:?} failed ({:?}): {}\ndockerd log:\n{}",
        o.status,
        text(&o.stderr),
        d.log_tail(20)
    );
    text(&o.stdout)
}

/// `docker run --rm --runtime rootcell EXTRA... IMAGE CMD...`.
pub fn run_rm(d: &DockerDaemon, extra: &[&str], cmd: &[&str]) -> Output {
    let mut args = vec!["run", "--rm", "--runtime", "rootcell"];
    args.extend_from_slice(extra);
    args.push(IMAGE);
    args.extend_from_slice(cmd);
    d.docker(&args)
}

/// Starts a detached container running `script`; returns its id.
pub fn run_detached(d: &DockerDaemon, extra: &[&str], script: &str) -> String {
    let mut args = vec!["run", "-d", "--runtime", "rootcell"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[IMAGE, "sh", "-c", script]);
    ok(d, &args).trim().to_string()
}

/// `docker inspect -f FORMAT ID`, trimmed.
pub fn inspect(d: &DockerDaemon, id: &str, format: &str) -> String {
    ok(d, &["inspect", "-f", format, id]).trim().to_string()
}

/// Polls `f` until it returns true, panicking with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Combined stdout+stderr of `docker logs ID`.
pub fn logs(d: &DockerDaemon, id: &str) -> String {
    let o = d.docker(&["logs", id]);
    assert!(
        o.status.success(),
        "docker logs failed: {}",
        text(&o.stderr)
    );
    text(&o.stdout) + &text(&o.stderr)
}
