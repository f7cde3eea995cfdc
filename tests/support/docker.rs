//! A private dockerd (with its own containerd) for the Docker end-to-end tests.
//!
//! The daemon gets data-root, exec-root, pidfile and socket in a temporary directory, rootcell
//! registered by path under the names `rootcell` and `kata-runtime`, and is stopped when the
//! test process exits (also when a test fails). The busybox image is imported from
//! busybox-static, since no registry can be reached. [`private_daemon`] starts further daemons,
//! each with a daemon.json of its own, stopped when dropped (or at exit).
//!
//! A daemon runs either the host's Docker ([`Engine::Host`], Debian 12's docker.io) or the
//! dockerd, containerd and runc of a Debian root file system ([`Engine::Root`], Debian 13's from
//! `images/build-trixie-root.sh`): chrooted into an overlay of that root in a mount namespace of
//! its own, on the host's kernel, with the host's /proc, /sys, /dev and /tmp (where its private
//! directory is, so the paths it gives rootcell are the host's too), a fresh /run (so it starts
//! its own containerd rather than finding the host's), the directories of rootcell's binary and
//! guest images at their host paths, and a bridge of its own with no iptables rules, so a host
//! dockerd that may be running is not disturbed. Its mounts end with its mount namespace; at
//! shutdown anything still running in that namespace is killed and the bridge removed.

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

/// Which Docker a daemon runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Engine {
    /// The host's docker.io (`/usr/sbin/dockerd`).
    Host,
    /// The dockerd of the Debian root file system at this path, chrooted (see the module docs).
    Root(PathBuf),
}

/// A running private dockerd.
#[derive(Clone)]
pub struct DockerDaemon {
    dir: PathBuf,
    socket: PathBuf,
    /// dockerd flags beyond the private directories and the runtimes.
    extra: &'static [&'static str],
    engine: Engine,
    /// The bridge made for an [`Engine::Root`] daemon (removed at shutdown).
    bridge: Option<String>,
    /// The mount namespace of an [`Engine::Root`] daemon (`mnt:[N]`): whatever still runs in it
    /// at shutdown is killed.
    mnt_ns: Option<MountNamespace>,
    /// The daemon's pid.
    pid: u32,
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
    shared_daemon(Engine::Host, extra)
}

/// The shared daemon of this test process, of `engine`, started on first use with `extra`
/// dockerd flags (one engine and one set of flags per test binary).
pub fn shared_daemon(engine: Engine, extra: &'static [&'static str]) -> &'static DockerDaemon {
    let d = DAEMON.get_or_init(|| DockerDaemon::start(engine.clone(), extra));
    assert_eq!(d.extra, extra, "one test binary, one set of dockerd flags");
    assert_eq!(d.engine, engine, "one test binary, one Docker engine");
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
    if child.is_some() && d.engine != Engine::Host {
        // The bridges of user-defined networks outlive a stopped dockerd.
        let _ = d.docker(&["network", "prune", "-f"]);
    }
    if let Some(mut child) = child {
        stop_child(&mut child);
    }
    if let Some(ns) = &d.mnt_ns {
        kill_namespace(ns);
    }
    if let Some(bridge) = &d.bridge {
        let _ = Command::new("ip")
            .args(["link", "del", bridge])
            .stderr(Stdio::null())
            .status();
        if bridged_frames_see_iptables() {
            let _ = Command::new("iptables")
                .args(bridged_accept_rule("-D", bridge))
                .stderr(Stdio::null())
                .status();
        }
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
    private_daemon_of(Engine::Host, daemon_json)
}

/// [`private_daemon`] of `engine`.
pub fn private_daemon_of(engine: Engine, daemon_json: &serde_json::Value) -> PrivateDaemon {
    let (daemon, child) = DockerDaemon::spawn(engine, &[], Some(daemon_json));
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

/// The mount namespace of `pid`, as its /proc link reads (`mnt:[N]`).
fn mount_namespace(pid: u32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// A chrooted daemon's mount namespace, held open: its number (`mnt:[N]`) names it only while
/// it exists, and the kernel gives a freed number to the next new namespace at once, so
/// [`kill_namespace`] of a namespace that had already ended could kill the processes of another
/// test's daemon started in the meantime (seen: a concurrent test's containerd and QEMU killed).
/// Holding it keeps the number taken until the holder is dropped.
#[derive(Clone, Debug)]
pub(crate) struct MountNamespace {
    /// `mnt:[N]`.
    name: String,
    _held: std::sync::Arc<std::fs::File>,
}

impl MountNamespace {
    /// The mount namespace `pid` is in, if it is not ours (not made yet by `unshare`).
    pub(crate) fn of_if_not_ours(pid: u32) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let f = std::fs::File::open(format!("/proc/{pid}/ns/mnt")).ok()?;
        // From the open file itself: the process may move to another namespace meanwhile.
        let name = format!("mnt:[{}]", f.metadata().ok()?.ino());
        if Some(&name) == mount_namespace(std::process::id()).as_ref() {
            return None;
        }
        Some(MountNamespace {
            name,
            _held: std::sync::Arc::new(f),
        })
    }
}

/// SIGKILLs every process in mount namespace `ns` until none is left (bounded): what a chrooted
/// daemon's containerd, shims or rootcell sandboxes left behind. The namespace, and every mount
/// in it, ends once its last process is gone and `ns` is dropped.
pub(crate) fn kill_namespace(ns: &MountNamespace) {
    let ns = ns.name.as_str();
    if mount_namespace(std::process::id()).as_deref() == Some(ns) {
        return; // never the test's own namespace
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids: Vec<i32> = std::fs::read_dir("/proc")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                    .filter(|&pid| mount_namespace(pid).as_deref() == Some(ns))
                    .map(|pid| pid as i32)
                    .collect()
            })
            .unwrap_or_default();
        if pids.is_empty() || Instant::now() > deadline {
            return;
        }
        for pid in pids {
            // SAFETY: kill(2) of a process in the mount namespace of a daemon this process
            // started (checked above not to be our own namespace).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `unshare ... sh -c CHROOT_SCRIPT` for a daemon chrooted in `root` with its overlay's
/// directories under `dir` and the runtime's directories bound in; the caller adds further
/// bind sources, then `--` and the daemon's command line.
pub(crate) fn chroot_command(root: &Path, dir: &Path) -> Command {
    let mut c = Command::new("unshare");
    c.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(CHROOT_SCRIPT)
        .arg("sh")
        .arg(root)
        .arg(dir.join("root"))
        .arg(dir.join("root-upper"))
        .arg(dir.join("root-work"))
        .args(runtime_binds());
    c
}

/// The host directories a chrooted daemon needs at their host paths: rootcell's (and its shim's)
/// and the guest images' (build/env names them).
pub(crate) fn runtime_binds() -> Vec<PathBuf> {
    let mut binds: Vec<PathBuf> = Vec::new();
    let images = ["ROOTCELL_KERNEL", "ROOTCELL_INITRD", "ROOTCELL_VMLINUX"]
        .iter()
        .filter_map(|k| std::env::var_os(k).map(PathBuf::from));
    for p in std::iter::once(artifacts().bin).chain(images) {
        let parent = p.parent().unwrap().to_path_buf();
        // Never the host's / over the root (a file there is simply not seen).
        if parent != Path::new("/") && !binds.contains(&parent) {
            binds.push(parent);
        }
    }
    binds
}

/// Makes the bridge an [`Engine::Root`] daemon uses as its default network (`--bridge`), with
/// an address of its own, so it shares nothing with a host dockerd's docker0.
fn make_bridge() -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let pid = std::process::id();
    let name = format!("rcd{}-{n}", pid % 1_000_000);
    let subnet = (pid as usize * 7 + n as usize) % 200 + 20;
    let addr = format!("10.226.{subnet}.1/24");
    let ip = |args: &[&str]| {
        let o = Command::new("ip").args(args).output().expect("run ip");
        assert!(
            o.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    ip(&["link", "add", &name, "type", "bridge"]);
    ip(&["addr", "add", &addr, "dev", &name]);
    ip(&["link", "set", &name, "up"]);
    // With --iptables=false the daemon adds no rule of its own; where the host's kernel sends
    // bridged frames through iptables (br_netfilter, built into some hosts' kernels, with
    // bridge-nf-call-iptables 1) the host's FORWARD policy (DROP under a host dockerd) would
    // drop container-to-container traffic on this bridge and on the daemon's user-defined
    // networks. A real Docker with iptables on accepts that traffic itself; this rule does it
    // for the test daemon, and goes at shutdown.
    if bridged_frames_see_iptables() {
        let o = Command::new("iptables")
            .args(bridged_accept_rule("-I", &name))
            .output()
            .expect("run iptables");
        assert!(
            o.status.success(),
            "iptables: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    name
}

/// Whether the host's bridges pass frames to iptables (br_netfilter).
fn bridged_frames_see_iptables() -> bool {
    std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables")
        .is_ok_and(|v| v.trim() == "1")
}

/// The iptables arguments that add (`-I`) or delete (`-D`) the FORWARD rule accepting bridged
/// frames for the test daemon whose bridge is `bridge` (named in the rule's comment).
fn bridged_accept_rule(op: &'static str, bridge: &str) -> Vec<String> {
    [
        op,
        "FORWARD",
        "-m",
        "physdev",
        "--physdev-is-bridged",
        "-m",
        "comment",
        "--comment",
    ]
    .into_iter()
    .map(String::from)
    .chain([
        format!("rootcell-e2e {bridge}"),
        "-j".into(),
        "ACCEPT".into(),
    ])
    .collect()
}

/// Mounts the chroot of an [`Engine::Root`] daemon in the mount namespace `unshare` made, then
/// runs the daemon there. Arguments: root, merged dir, upper dir, overlay work dir, host paths
/// to bind at the same place, `--`, the daemon's command line.
pub(crate) const CHROOT_SCRIPT: &str = r#"set -e
root=$1 m=$2 up=$3 wk=$4; shift 4
mkdir -p "$m" "$up" "$wk"
# An overlay, so the cached root is never written to.
mount -t overlay overlay -o "lowerdir=$root,upperdir=$up,workdir=$wk" "$m"
mount --rbind /proc "$m/proc"
mount --rbind /sys "$m/sys"
mount --rbind /dev "$m/dev"
mount --bind /tmp "$m/tmp"
mount -t tmpfs -o mode=755 tmpfs "$m/run"
# rootcell's run directories are the host's, as they would be on a Debian 13 host.
mkdir -p /run/rootcell "$m/run/rootcell"
mount --rbind /run/rootcell "$m/run/rootcell"
while [ "$1" != -- ]; do mkdir -p "$m$1"; mount --rbind "$1" "$m$1"; shift; done
shift
exec chroot "$m" "$@"
"#;

impl DockerDaemon {
    fn start(engine: Engine, extra: &'static [&'static str]) -> DockerDaemon {
        let (d, child) = Self::spawn(engine, extra, None);
        *CHILD.lock().unwrap() = Some(child);
        d
    }

    /// Starts a dockerd with rootcell registered by `--add-runtime`, or with `config` as its
    /// daemon.json instead; returns once it answers and has the busybox image.
    fn spawn(
        engine: Engine,
        extra: &'static [&'static str],
        config: Option<&serde_json::Value>,
    ) -> (DockerDaemon, Child) {
        let art = artifacts();
        let dir = tempfile::Builder::new()
            .prefix("rc-docker-")
            .tempdir_in("/tmp")
            .unwrap()
            .keep();
        let socket = dir.join("docker.sock");
        let log = std::fs::File::create(dir.join("dockerd.log")).unwrap();
        let mut bridge = None;
        let mut cmd = match &engine {
            Engine::Host => {
                assert!(
                    Path::new(DOCKERD).exists(),
                    "dockerd missing: scripts/install-deps.sh installs docker.io"
                );
                Command::new(DOCKERD)
            }
            Engine::Root(root) => {
                assert!(
                    root.join("usr/sbin/dockerd").exists(),
                    "{} has no usr/sbin/dockerd",
                    root.display()
                );
                let mut c = chroot_command(root, &dir);
                c.arg("--").arg("dockerd");
                let b = make_bridge();
                // No iptables rules (the host's dockerd may own the nat and filter chains):
                // the default network is this bridge, published ports go through docker-proxy.
                c.arg("--bridge")
                    .arg(&b)
                    .args(["--iptables=false", "--ip6tables=false"]);
                bridge = Some(b);
                c
            }
        };
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
        crate::no_host_pool(&mut cmd);
        cmd.args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let mut child = cmd.spawn().expect("start dockerd");
        // SAFETY: registering a plain extern "C" function to run at process exit, once.
        ATEXIT.call_once(|| unsafe {
            libc::atexit(stop_daemon_at_exit);
        });
        let mut d = DockerDaemon {
            dir,
            socket,
            extra,
            engine,
            bridge,
            mnt_ns: None,
            pid: child.id(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if d.engine != Engine::Host && d.mnt_ns.is_none() {
                // Once unshare has made the namespace: our own one means not yet.
                d.mnt_ns = MountNamespace::of_if_not_ours(child.id());
            }
            let o = d.docker(&["version", "--format", "{{.Server.Version}}"]);
            if o.status.success() && (d.engine == Engine::Host || d.mnt_ns.is_some()) {
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

    /// The daemon's pid (dockerd's: an [`Engine::Root`] daemon's `unshare` and `chroot` exec it
    /// in place). `/proc/PID/root` is the daemon's root file system as it sees it.
    pub fn pid(&self) -> u32 {
        self.pid
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

    /// The mount table the daemon and its containers' processes see (an [`Engine::Root`]
    /// daemon's is its own namespace's), for leak checks.
    pub fn mountinfo(&self) -> String {
        let path = match self.engine {
            Engine::Host => "/proc/self/mountinfo".to_string(),
            Engine::Root(_) => format!("/proc/{}/mountinfo", self.pid),
        };
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
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
