//! A private containerd for the shim end-to-end tests: its own root, state, socket and config in
//! a temporary directory, `containerd-shim-rootcell-v2` and `rootcell` found on its PATH (the
//! release build beside the `rootcell` under test), a busybox image imported as an OCI archive
//! built from busybox-static, and stopped (with every process that mentions its directory, and
//! the mounts under it) when dropped.
//!
//! Either the host's containerd ([`Engine::Host`], Debian 12's 1.6) or the containerd and `ctr`
//! of a Debian root file system ([`Engine::Root`], Debian 13's 1.7 from
//! `images/build-trixie-root.sh`), chrooted in a mount namespace of its own exactly as
//! [`crate::docker`] runs that root's dockerd: the host's /proc, /sys, /dev, /tmp (where the
//! private directory is, so the paths it hands the shim are the host's too) and /run/rootcell, a
//! fresh /run, rootcell's directories at their host paths, and (for the CRI plugin) the host's
//! CNI plugins at /usr/lib/cni, which the root lacks. Its `ctr` runs in that namespace and root
//! (`nsenter`), and whatever is left in the namespace is killed when it is dropped.

use crate::docker::{kill_namespace, Engine, MountNamespace};
use crate::{
    artifacts, gdb_backtraces, images_dir, output_with_timeout, output_with_timeout_or,
    processes_mentioning, text, thread_dump, COMMAND_TIMEOUT,
};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Debian's containerd.
pub const CONTAINERD: &str = "/usr/bin/containerd";
/// Debian's ctr.
pub const CTR: &str = "/usr/bin/ctr";
/// The image every containerd test runs.
pub const IMAGE: &str = "docker.io/library/rootcell-busybox:test";
/// The containerd namespace the tests use.
pub const NAMESPACE: &str = "rootcell-e2e";
/// The containerd namespace of the CRI plugin.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// The pod sandbox ("pause") image of the CRI tests: busybox-static sleeping (no registry here).
pub const PAUSE_IMAGE: &str = "docker.io/library/rootcell-pause:test";

/// The CNI subnet of this test process's CRI containerds: one /24 per process and containerd, so
/// concurrent tests' bridges do not overlap.
fn cni_subnet() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let n = (std::process::id() * 7 + N.fetch_add(1, Ordering::Relaxed)) % 200;
    format!("10.213.{}.0/24", n + 20)
}

/// What names a private containerd's CNI network and bridge (from its directory's random name).
fn cni_tag(d: &Path) -> String {
    let name = d.file_name().unwrap().to_string_lossy().to_string();
    name.chars().rev().take(6).collect()
}

/// The CRI plugin section of a private containerd's config in `d`, and its CNI config
/// (written to `d/cni`): bridge + host-local, with IPAM state inside `d`.
fn cri_config(d: &Path) -> String {
    let cni = d.join("cni");
    std::fs::create_dir_all(&cni).unwrap();
    let tag = cni_tag(d);
    let conf = serde_json::json!({
        "cniVersion": "0.4.0",
        "name": format!("rc-{tag}"),
        "plugins": [
            {"type": "bridge", "bridge": format!("rc{tag}"), "isGateway": true, "ipMasq": false,
             "ipam": {"type": "host-local", "subnet": cni_subnet(),
                      "dataDir": d.join("cni-ipam").display().to_string()}},
        ]
    });
    std::fs::write(cni.join("10-rc.conflist"), conf.to_string()).unwrap();
    format!(
        r#"[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # The sandbox's oom_score_adj (-998) is below what this host lets the tests' processes set
  # (no CAP_SYS_RESOURCE here): runc's init then fails. Kubernetes-in-a-container setups do the same.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      Root = "{0}/runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.rootcell]
      runtime_type = "io.containerd.rootcell.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{1}"
"#,
        d.display(),
        cni.display()
    )
}

/// A running private containerd.
pub struct Containerd {
    dir: tempfile::TempDir,
    child: Option<Child>,
    engine: Engine,
    /// The containerd process (for an [`Engine::Root`] one: in its namespace and chroot).
    pid: u32,
    /// An [`Engine::Root`] containerd's mount namespace.
    mnt_ns: Option<MountNamespace>,
}

fn digest(b: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(b))
}

impl Containerd {
    /// Starts the host's containerd (CRI plugin disabled) and imports the busybox image.
    pub fn start() -> Self {
        Self::start_on(Engine::Host)
    }

    /// [`Containerd::start`] of `engine`.
    pub fn start_on(engine: Engine) -> Self {
        let c = Self::launch(engine, false);
        c.import_image(NAMESPACE, IMAGE, &["sh"]);
        c
    }

    /// Starts containerd with its CRI plugin: runtime handlers `runc` (the default) and
    /// `rootcell`, a bridge + host-local CNI network of its own (Debian's plugins, a subnet
    /// from `cni_subnet`), the CRI socket at `cri_socket()`, and the busybox and pause
    /// ([`PAUSE_IMAGE`]) images in the CRI namespace `k8s.io`.
    pub fn start_cri() -> Self {
        Self::start_cri_on(Engine::Host)
    }

    /// [`Containerd::start_cri`] of `engine`.
    pub fn start_cri_on(engine: Engine) -> Self {
        let c = Self::launch(engine, true);
        c.import_image(CRI_NAMESPACE, IMAGE, &["sh"]);
        c.import_image(CRI_NAMESPACE, PAUSE_IMAGE, &["sleep", "2147483647"]);
        c
    }

    fn launch(engine: Engine, cri: bool) -> Self {
        let a = artifacts();
        let bin_dir = a.bin.parent().unwrap().to_path_buf();
        assert!(
            bin_dir.join("containerd-shim-rootcell-v2").exists(),
            "{} has no containerd-shim-rootcell-v2: run scripts/build.sh",
            bin_dir.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("rc-ctrd-")
            .tempdir_in("/tmp")
            .unwrap();
        let d = dir.path();
        let mut config = format!(
            "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n[grpc]\n  address = \"{0}/c.sock\"\n[ttrpc]\n  address = \"{0}/c.sock.ttrpc\"\n[debug]\n  level = \"debug\"\n",
            d.display()
        );
        if cri {
            config.push_str(&cri_config(d));
        } else {
            config = config.replacen(
                "[grpc]",
                "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]",
                1,
            );
        }
        std::fs::write(d.join("config.toml"), config).unwrap();
        let log = std::fs::File::create(d.join("containerd.log")).unwrap();
        let mut cmd = match &engine {
            Engine::Host => {
                let mut c = Command::new(CONTAINERD);
                c.env(
                    "PATH",
                    format!(
                        "{}:{}",
                        bin_dir.display(),
                        std::env::var("PATH").unwrap_or_default()
                    ),
                );
                c
            }
            Engine::Root(root) => {
                assert!(
                    root.join("usr/bin/containerd").exists(),
                    "{} has no usr/bin/containerd",
                    root.display()
                );
                let mut c = crate::docker::chroot_command(root, d);
                if cri {
                    // The root has no CNI plugins (Debian's containernetworking-plugins is not
                    // in it): the host's, which need nothing but libc.
                    c.arg("/usr/lib/cni");
                }
                c.args(["--", "containerd"]).env(
                    "PATH",
                    format!(
                        "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                        bin_dir.display()
                    ),
                );
                c
            }
        };
        crate::no_host_pool(&mut cmd);
        let child = cmd
            .arg("--config")
            .arg(d.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting containerd");
        let mut c = Containerd {
            dir,
            pid: child.id(),
            child: Some(child),
            engine,
            mnt_ns: None,
        };
        if c.engine != Engine::Host {
            // Once unshare has made the namespace (our own one means not yet); ctr runs in it.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                c.mnt_ns = MountNamespace::of_if_not_ours(c.pid);
                if c.mnt_ns.is_some() {
                    break;
                }
                let exited = c.child.as_mut().and_then(|ch| ch.try_wait().ok().flatten());
                assert!(
                    Instant::now() < deadline && exited.is_none(),
                    "the chrooted containerd never got its mount namespace ({exited:?}): {}",
                    c.log_tail(30)
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !c.ctr(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start: {}",
                c.log_tail(30)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        c
    }

    /// containerd's CRI socket (the same gRPC socket as ctr's).
    pub fn cri_socket(&self) -> PathBuf {
        self.dir().join("c.sock")
    }

    /// The private directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Which containerd this is.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The mount table containerd, its shims and rootcell see (an [`Engine::Root`] one's is its
    /// own namespace's), for leak checks.
    pub fn mountinfo(&self) -> String {
        let path = match self.engine {
            Engine::Host => "/proc/self/mountinfo".to_string(),
            Engine::Root(_) => format!("/proc/{}/mountinfo", self.pid),
        };
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// Where the host sees `path` as containerd and its shims see it (an [`Engine::Root`]
    /// one's fresh /run, for example, is only visible through its root).
    pub fn host_path(&self, path: &str) -> PathBuf {
        match self.engine {
            Engine::Host => PathBuf::from(path),
            Engine::Root(_) => {
                // Debian's /var/run is a symlink to /run, which the host would resolve to its
                // own /run: follow it here.
                let path = path.strip_prefix("/var/run/").map_or_else(
                    || path.trim_start_matches('/').to_string(),
                    |rest| format!("run/{rest}"),
                );
                PathBuf::from(format!("/proc/{}/root", self.pid)).join(path)
            }
        }
    }

    /// Where the shim keeps rootcell's state for the test namespace.
    pub fn rootcell_root(&self) -> PathBuf {
        self.rootcell_root_in(NAMESPACE)
    }

    /// Where the shim keeps rootcell's state for containerd namespace `ns`.
    pub fn rootcell_root_in(&self, ns: &str) -> PathBuf {
        self.dir().join("state/rootcell").join(ns)
    }

    /// `ctr ARGS` against this containerd, in the test namespace, bounded; a `ctr` that overruns
    /// is reported with [`Containerd::hang_report`].
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.bounded(self.ctr_command(args))
    }

    /// Runs a `ctr` command bounded by [`COMMAND_TIMEOUT`], with [`Containerd::hang_report`]
    /// if it overruns.
    fn bounded(&self, c: Command) -> Output {
        output_with_timeout_or(c, None, COMMAND_TIMEOUT, |pid| self.hang_report(pid))
    }

    /// Where a stuck `ctr` (pid `ctr`) and what it waits on are: containerd's goroutines that
    /// are in its task service, runtime v2 or ttrpc (SIGUSR1 makes containerd write them all to
    /// /tmp/containerd.PID.stacks.log), the threads of every process of this containerd's
    /// directory but containerd itself (shims, rootcell, their children) with the shims'
    /// backtraces, the end of containerd's log; and SIGQUIT to `ctr`, a Go program, which then
    /// prints its goroutines on its stderr and exits (the caller shows that stderr) unless it
    /// forwards signals to a running task.
    pub fn hang_report(&self, ctr: i32) -> String {
        let mut r = String::from("=== what the ctr call waits on ===\n");
        let needle = self.dir().display().to_string();
        let procs: Vec<i32> = processes_mentioning(&needle)
            .iter()
            .filter_map(|p| p.split(':').next().and_then(|s| s.parse().ok()))
            .collect();
        let comm = |pid: i32| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        if let Some(&cd) = procs.iter().find(|&&p| comm(p) == "containerd") {
            r.push_str(&self.containerd_goroutines(cd));
        }
        r.push_str("--- threads (ctr and every process of the private directory) ---\n");
        let mut shims = Vec::new();
        for &p in std::iter::once(&ctr).chain(procs.iter().filter(|&&p| p != ctr)) {
            if comm(p) == "containerd" {
                continue;
            }
            if comm(p).starts_with("containerd-shim") {
                shims.push(p);
            }
            r.push_str(&thread_dump(p));
        }
        for p in shims {
            r.push_str(&format!("--- backtraces of shim {p} ---\n"));
            r.push_str(&gdb_backtraces(p));
            r.push('\n');
        }
        r.push_str("--- containerd's log (last 60 lines) ---\n");
        r.push_str(&self.log_tail(60));
        // SAFETY: kill(2) of the ctr process the caller started and has not reaped.
        unsafe { libc::kill(ctr, libc::SIGQUIT) };
        // Go prints its goroutines and exits: give it a moment before the caller kills it.
        // (Not once `ctr run` forwards signals to its task, after the task started: then the
        // container gets it, and containerd's goroutines above show the call ctr is in.)
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && std::path::Path::new(&format!("/proc/{ctr}")).exists() {
            let zombie = std::fs::read_to_string(format!("/proc/{ctr}/stat")).is_ok_and(|s| {
                s.rsplit_once(") ")
                    .is_some_and(|(_, st)| st.starts_with('Z'))
            });
            if zombie {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        r.push_str(
            "\n--- ctr's goroutines: on its stderr below (SIGQUIT), unless it forwards signals ---",
        );
        r
    }

    /// containerd `pid`'s goroutines that are in the task service, runtime v2, ttrpc or the
    /// shim's events (SIGUSR1's dump, which containerd also logs as one long line: that line
    /// is left out of [`Containerd::log_tail`]'s use here by its length).
    fn containerd_goroutines(&self, pid: i32) -> String {
        let file = self.host_path(&format!("/tmp/containerd.{pid}.stacks.log"));
        let _ = std::fs::remove_file(&file);
        // SAFETY: kill(2) of this test's private containerd; SIGUSR1 only makes it dump stacks.
        unsafe { libc::kill(pid, libc::SIGUSR1) };
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut dump = String::new();
        // Written in one go after it is created: wait until it stops growing.
        let mut last = usize::MAX;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(300));
            dump = std::fs::read_to_string(&file).unwrap_or_default();
            if !dump.is_empty() && dump.len() == last {
                break;
            }
            last = dump.len();
        }
        let _ = std::fs::remove_file(&file);
        let all = dump.split("\n\n").count();
        let keep: Vec<&str> = dump
            .split("\n\n")
            .filter(|g| {
                [
                    "runtime/v2",
                    "services/tasks",
                    "ttrpc",
                    "cio",
                    "events/exchange",
                ]
                .iter()
                .any(|k| g.contains(k))
            })
            .collect();
        format!(
            "--- containerd {pid}: {} of its {all} goroutines (those in tasks, runtime v2, ttrpc, events) ---\n{}\n",
            keep.len(),
            keep.join("\n\n")
        )
    }

    /// The `ctr ARGS` command (to run it in the background).
    pub fn ctr_command(&self, args: &[&str]) -> Command {
        self.ctr_command_in(NAMESPACE, args)
    }

    /// The `ctr ARGS` command in containerd namespace `ns`.
    pub fn ctr_command_in(&self, ns: &str, args: &[&str]) -> Command {
        let mut c = match self.engine {
            Engine::Host => Command::new(CTR),
            Engine::Root(_) => {
                // The root's own ctr, in containerd's namespace and chroot (its FIFOs in the
                // same /run as the shim's view of them).
                let mut c = Command::new("nsenter");
                c.arg("--target")
                    .arg(self.pid.to_string())
                    .args(["--mount", "--root", "--wd=/", "--", "ctr"]);
                c
            }
        };
        c.arg("--address")
            .arg(self.dir().join("c.sock"))
            .args(["--namespace", ns])
            .args(args);
        c
    }

    /// The last lines of containerd's log (but those over 4000 characters: a stack dump).
    pub fn log_tail(&self, lines: usize) -> String {
        let l = std::fs::read_to_string(self.dir().join("containerd.log")).unwrap_or_default();
        let v: Vec<&str> = l.lines().filter(|l| l.len() <= 4000).collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }

    /// Builds an OCI image archive of busybox-static named `name` with command `cmd` and
    /// imports it into containerd namespace `ns`.
    fn import_image(&self, ns: &str, name: &str, cmd: &[&str]) {
        let d = self.dir().join("image").join(name.replace(['/', ':'], "_"));
        let rootfs = d.join("rootfs");
        let o = Command::new(images_dir().join("make-rootfs.sh"))
            .arg(&rootfs)
            .output()
            .unwrap();
        assert!(o.status.success(), "make-rootfs: {}", text(&o.stderr));
        let layer = Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .args(["-c", "."])
            .output()
            .unwrap();
        assert!(layer.status.success());
        let layer = layer.stdout;
        let layout = d.join("layout");
        let blobs = layout.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let put = |b: &[u8]| {
            let dg = digest(b);
            std::fs::write(blobs.join(dg.trim_start_matches("sha256:")), b).unwrap();
            (dg, b.len())
        };
        let (ldg, lsize) = put(&layer);
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Cmd": cmd, "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [ldg]}
        })
        .to_string();
        let (cdg, csize) = put(config.as_bytes());
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdg, "size": csize},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ldg, "size": lsize}]
        })
        .to_string();
        let (mdg, msize) = put(manifest.as_bytes());
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdg, "size": msize,
                "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": "test"}}]
        });
        std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
        std::fs::write(
            layout.join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        let tar = d.join("image.tar");
        let o = Command::new("tar")
            .arg("-C")
            .arg(&layout)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .output()
            .unwrap();
        assert!(o.status.success());
        let o = self
            .bounded(self.ctr_command_in(ns, &["images", "import", &tar.display().to_string()]));
        assert!(
            o.status.success(),
            "ctr images import: {}{}",
            text(&o.stdout),
            text(&o.stderr)
        );
        let _ = std::fs::remove_dir_all(&rootfs);
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // Shims, sandboxes and VMs all mention the private directory.
        let needle = self.dir().display().to_string();
        for p in processes_mentioning(&needle) {
            if let Some(pid) = p.split(':').next().and_then(|s| s.parse::<i32>().ok()) {
                // SAFETY: kill(2) on a process of this test's private containerd.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if let Some(ns) = self.mnt_ns.take() {
            // Its mounts end with the namespace's last process (and `ns`, dropped here).
            kill_namespace(&ns);
        }
        // Containers a failed test left to a dead shim: rootcell removes their run dirs (under
        // /run/rootcell/r, outside the private directory) and host cgroups.
        let bin = artifacts().bin;
        for ns in std::fs::read_dir(self.dir().join("state/rootcell"))
            .into_iter()
            .flatten()
            .flatten()
        {
            for c in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
                let mut cmd = Command::new(&bin);
                cmd.arg("--root")
                    .arg(ns.path())
                    .args(["delete", "--force"])
                    .arg(c.file_name())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                let _ = output_with_timeout(cmd, None, COMMAND_TIMEOUT);
            }
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&needle))
            .collect();
        points.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in points {
            let _ = Command::new("umount").args(["-l", m]).status();
        }
        // The CNI network namespaces of pods this CRI containerd had no time to remove (a failed
        // test): those whose eth0 is in its subnet.
        let conf =
            std::fs::read_to_string(self.dir().join("cni/10-rc.conflist")).unwrap_or_default();
        let subnet = serde_json::from_str::<serde_json::Value>(&conf)
            .ok()
            .and_then(|v| {
                v["plugins"][0]["ipam"]["subnet"]
                    .as_str()
                    .and_then(|s| s.strip_suffix("0/24"))
                    .map(str::to_string)
            });
        if let (Some(prefix), Ok(dir)) = (subnet, std::fs::read_dir("/var/run/netns")) {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !name.starts_with("cni-") {
                    continue;
                }
                let o = Command::new("nsenter")
                    .arg(format!("--net={}", e.path().display()))
                    .args(["ip", "-4", "-o", "addr", "show", "eth0"])
                    .stderr(Stdio::null())
                    .output();
                if o.is_ok_and(|o| text(&o.stdout).contains(&format!(" {prefix}"))) {
                    let _ = Command::new("ip").args(["netns", "del", &name]).status();
                }
            }
        }
        // The CNI bridge of a CRI containerd (absent otherwise: the command then just fails).
        let _ = Command::new("ip")
            .args(["link", "del", &format!("rc{}", cni_tag(self.dir()))])
            .stderr(Stdio::null())
            .status();
    }
}
