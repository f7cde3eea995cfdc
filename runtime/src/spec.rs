//! Loading and checking a bundle's config.json, and rewriting it for the guest.

use crate::error::RuntimeError;
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use std::path::{Path, PathBuf};

/// Default guest memory when config.json sets no memory limit.
pub const DEFAULT_MEMORY_MIB: u64 = 512;
/// Smallest guest we boot: the kernel and agent need room of their own.
pub const MIN_MEMORY_MIB: u64 = 128;
/// Guest RAM beyond a container's memory limit: what the guest kernel keeps for itself and the
/// agent's reserve, so the container gets all of its limit (the agent caps it there).
pub const GUEST_OVERHEAD_MIB: u64 = 64;

/// Guest RAM (MiB) for a container memory limit in bytes; `None` for no limit (zero or less).
pub fn memory_mib_for_limit(limit: i64) -> Option<u64> {
    (limit > 0).then(|| ((limit as u64).div_ceil(1 << 20) + GUEST_OVERHEAD_MIB).max(MIN_MEMORY_MIB))
}

/// A loaded, checked bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// Absolute bundle directory.
    pub dir: PathBuf,
    /// The parsed config.json.
    pub spec: Spec,
    /// Absolute host path of the root filesystem.
    pub rootfs: PathBuf,
}

/// One bind mount of config.json, shared with the guest as `share/<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    /// Index in `mounts`.
    pub index: usize,
    /// Absolute host source.
    pub source: PathBuf,
    /// Path of its entry in the share dir: the source's host path without the leading `/`
    /// (see [`crate::share::name_entries`]).
    pub name: String,
    /// The mount options ask for read-only.
    pub read_only: bool,
}

/// Reads and checks `<bundle>/config.json`.
pub fn load(bundle: &Path) -> Result<Bundle, RuntimeError> {
    let dir = crate::paths::absolute(bundle);
    let err = |path: &Path, msg: String| RuntimeError::Bundle {
        path: path.to_path_buf(),
        msg,
    };
    if !dir.is_dir() {
        return Err(err(&dir, "bundle directory does not exist; pass --bundle DIR with the directory holding config.json".into()));
    }
    let cfg = dir.join("config.json");
    let data = std::fs::read(&cfg).map_err(|e| {
        err(
            &cfg,
            format!("cannot read config.json: {e}; create one with `rootcell spec`"),
        )
    })?;
    let spec: Spec = serde_json::from_slice(&data)
        .map_err(|e| err(&cfg, format!("invalid config.json: {e}")))?;
    let rootfs = validate(&spec, &dir)?;
    Ok(Bundle { dir, spec, rootfs })
}

fn unsupported(field: &str, msg: &str) -> RuntimeError {
    RuntimeError::Unsupported {
        field: field.into(),
        msg: msg.into(),
    }
}

/// Checks what the host must check and returns the absolute rootfs path.
pub fn validate(spec: &Spec, bundle: &Path) -> Result<PathBuf, RuntimeError> {
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| unsupported("root", "is required (the container's root filesystem)"))?;
    let rootfs = resolve(bundle, root.path());
    if !rootfs.is_dir() {
        return Err(RuntimeError::Bundle {
            path: rootfs,
            msg: "root.path does not exist or is not a directory; fix root.path in config.json"
                .into(),
        });
    }
    if spec.process().is_none() {
        return Err(unsupported(
            "process",
            "is required: rootcell needs a process to run",
        ));
    }
    for (name, present) in [
        ("solaris", spec.solaris().is_some()),
        ("windows", spec.windows().is_some()),
        ("vm", spec.vm().is_some()),
        ("zos", spec.zos().is_some()),
    ] {
        if present {
            return Err(unsupported(name, "is not supported on Linux; remove it"));
        }
    }
    if let Some(hooks) = spec.hooks() {
        for (name, h) in [
            ("createContainer", hooks.create_container()),
            ("startContainer", hooks.start_container()),
        ] {
            if h.as_ref().is_some_and(|v| !v.is_empty()) {
                return Err(unsupported(
                    &format!("hooks.{name}"),
                    "hooks that run inside the container are not supported (the container runs in a VM); use prestart/createRuntime/poststart/poststop",
                ));
            }
        }
    }
    let namespaces = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default();
    for (i, ns) in namespaces.iter().enumerate() {
        // Other namespaces may be joined when they are a rootcell container's (see join.rs).
        if ns.path().is_some()
            && matches!(
                ns.typ(),
                LinuxNamespaceType::Mount | LinuxNamespaceType::User
            )
        {
            return Err(RuntimeError::Unsupported {
                field: format!("linux.namespaces[{i}].path"),
                msg: format!(
                    "joining an existing {} namespace is not supported (a container has its own root file system in its VM); remove the path",
                    ns.typ()
                ),
            });
        }
    }
    for (i, m) in spec.mounts().iter().flatten().enumerate() {
        if is_bind(m) {
            let Some(src) = m.source() else {
                return Err(unsupported(
                    &format!("mounts[{i}].source"),
                    "a bind mount needs a source",
                ));
            };
            let src = resolve(bundle, src);
            if !src.exists() {
                return Err(RuntimeError::Bundle {
                    path: src,
                    msg: format!(
                        "source of mounts[{i}] (destination {}) does not exist",
                        m.destination().display()
                    ),
                });
            }
        }
    }
    Ok(rootfs)
}

/// A path from config.json: absolute, or relative to the bundle.
fn resolve(bundle: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        bundle.join(p)
    }
}

/// True for `type: bind` or options containing `bind`/`rbind`.
fn is_bind(m: &oci_spec::runtime::Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .iter()
            .flatten()
            .any(|o| o == "bind" || o == "rbind")
}

/// The bind mounts of `spec`, with host sources resolved against `bundle`.
pub fn bind_mounts(spec: &Spec, bundle: &Path) -> Vec<BindMount> {
    let mut binds: Vec<BindMount> = spec
        .mounts()
        .iter()
        .flatten()
        .enumerate()
        .filter(|(_, m)| is_bind(m) && m.source().is_some())
        .map(|(index, m)| BindMount {
            index,
            source: resolve(bundle, m.source().as_ref().expect("filtered")),
            name: String::new(),
            read_only: m.options().iter().flatten().any(|o| o == "ro"),
        })
        .collect();
    crate::share::name_entries(&mut binds);
    binds
}

/// How a container's namespaces map into the guest.
#[derive(Debug, Clone, Copy)]
pub enum GuestNamespaces<'a> {
    /// The container has the VM to itself. With `guest_network` (mirrored interfaces) it uses
    /// the guest's own network namespace, where the agent configured them; otherwise it gets a
    /// fresh one, loopback only.
    Own {
        /// The guest's network was configured for the container.
        guest_network: bool,
    },
    /// The container joins namespaces of another container in that one's VM.
    Joined(&'a crate::join::Join),
}

/// The spec the agent gets: rootfs and bind sources point into the guest's share mount
/// (`share`: where this container's entries are in the guest), namespaces as `namespaces`
/// says, and host-only parts (hooks) are dropped.
pub fn rewrite_for_guest(
    spec: &Spec,
    binds: &[BindMount],
    share: &Path,
    namespaces: GuestNamespaces<'_>,
) -> Spec {
    let mut out = spec.clone();
    if let Some(list) = out
        .linux_mut()
        .as_mut()
        .and_then(|l| l.namespaces_mut().as_mut())
    {
        match namespaces {
            // The host's namespace path means nothing in the guest.
            GuestNamespaces::Own {
                guest_network: true,
            } => {
                list.retain(|n| n.typ() != LinuxNamespaceType::Network);
            }
            GuestNamespaces::Own {
                guest_network: false,
            } => {
                for n in list
                    .iter_mut()
                    .filter(|n| n.typ() == LinuxNamespaceType::Network)
                {
                    n.set_path(None);
                }
            }
            GuestNamespaces::Joined(join) => {
                for n in list.iter_mut() {
                    let guest = join.guest_path(n.typ()).map(Path::to_path_buf);
                    n.set_path(guest);
                }
            }
        }
    }
    if let Some(root) = out.root_mut() {
        root.set_path(share.join("rootfs"));
    }
    if let Some(mounts) = out.mounts_mut() {
        for b in binds {
            if let Some(m) = mounts.get_mut(b.index) {
                m.set_source(Some(share.join(&b.name)));
            }
        }
    }
    if let Some(p) = out.process_mut() {
        crate::rlimits::inherit(p);
    }
    out.set_hooks(None);
    out
}

/// Whether the container's process asks for a terminal (`process.terminal`).
pub fn has_terminal(spec: &Spec) -> bool {
    spec.process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false)
}

/// The annotation containerd's CRI plugin puts on a pod's sandbox (pause) container: the memory
/// limit of the whole pod in bytes (kubelet's pod-level resources), which the pause container
/// itself does not get as a limit.
pub const CRI_SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

/// The pod's CPU quota (µs per period) that containerd's CRI plugin puts on a pod's sandbox.
pub const CRI_SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
/// The period (µs) of [`CRI_SANDBOX_CPU_QUOTA`].
pub const CRI_SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";

/// Guest memory (MiB) and vCPU count from `linux.resources`; for a Kubernetes pod's sandbox
/// container, whose VM every container of the pod joins, at least the pod's memory
/// ([`CRI_SANDBOX_MEMORY`]) and CPUs ([`CRI_SANDBOX_CPU_QUOTA`] / [`CRI_SANDBOX_CPU_PERIOD`]) so
/// that they fit.
pub fn vm_resources(spec: &Spec) -> (u64, u32) {
    let res = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
    let own = res
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.limit())
        .and_then(memory_mib_for_limit);
    let annotation = |k: &str| {
        spec.annotations()
            .as_ref()
            .and_then(|a| a.get(k))
            .map(|v| v.trim().to_string())
    };
    let pod = annotation(CRI_SANDBOX_MEMORY)
        .and_then(|v| v.parse::<i64>().ok())
        .and_then(memory_mib_for_limit);
    let mem = own.max(pod).unwrap_or(DEFAULT_MEMORY_MIB);
    // Online CPUs, not available_parallelism(): that one honours the cgroup CPU quota, which the
    // sandbox sets on itself from this same spec before it sizes the VM.
    // SAFETY: sysconf only reads a system value.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let host_cpus = u32::try_from(online).unwrap_or(1);
    let quota_cpus = |q: Option<i64>, p: Option<u64>| match (q, p) {
        (Some(q), Some(p)) if q > 0 && p > 0 => Some((q as u64).div_ceil(p) as u32),
        _ => None,
    };
    let own_cpus = res
        .and_then(|r| r.cpu().as_ref())
        .and_then(|c| quota_cpus(c.quota(), c.period()));
    let pod_cpus = quota_cpus(
        annotation(CRI_SANDBOX_CPU_QUOTA).and_then(|v| v.parse().ok()),
        annotation(CRI_SANDBOX_CPU_PERIOD).and_then(|v| v.parse().ok()),
    );
    let cpus = own_cpus
        .max(pod_cpus)
        .unwrap_or(1)
        .clamp(1, host_cpus.max(1));
    (mem, cpus)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rootcell_protocol::GUEST_SHARE_DIR;

    fn bundle_with(config: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rootfs")).unwrap();
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        dir
    }

    const MIN: &str = r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"user":{"uid":0,"gid":0},"args":["sh"],"cwd":"/"}}"#;

    #[test]
    fn minimal_bundle_loads() {
        let b = bundle_with(MIN);
        let loaded = load(b.path()).unwrap();
        assert_eq!(loaded.rootfs, b.path().join("rootfs"));
    }

    #[test]
    fn errors_name_the_file_or_field() {
        let missing = load(Path::new("/nonexistent/bundle"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("/nonexistent/bundle"), "{missing}");

        let empty = tempfile::tempdir().unwrap();
        let e = load(empty.path()).unwrap_err().to_string();
        assert!(e.contains("config.json"), "{e}");

        let bad = bundle_with("{not json");
        let e = load(bad.path()).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("invalid"), "{e}");

        let noroot = bundle_with(
            r#"{"ociVersion":"1.0.2","root":{"path":"nope"},"process":{"user":{"uid":0,"gid":0},"args":["sh"],"cwd":"/"}}"#,
        );
        let e = load(noroot.path()).unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("root.path"), "{e}");

        let ns = bundle_with(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"user":{"uid":0,"gid":0},"args":["sh"],"cwd":"/"},
            "linux":{"namespaces":[{"type":"mount","path":"/proc/1/ns/mnt"}]}}"#,
        );
        let e = load(ns.path()).unwrap_err().to_string();
        assert!(
            e.contains("linux.namespaces[0].path") && e.contains("mnt namespace"),
            "{e}"
        );

        let win = bundle_with(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"user":{"uid":0,"gid":0},"args":["sh"],"cwd":"/"},"windows":{"layerFolders":[]}}"#,
        );
        assert!(load(win.path())
            .unwrap_err()
            .to_string()
            .contains("windows"));

        let noproc = bundle_with(r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"}}"#);
        assert!(load(noproc.path())
            .unwrap_err()
            .to_string()
            .contains("process"));
    }

    #[test]
    fn rewrite_points_into_guest_share() {
        let b = bundle_with(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs","readonly":true},"process":{"user":{"uid":0,"gid":0},"args":["sh"],"cwd":"/"},
            "hooks":{"prestart":[{"path":"/bin/true"}]},
            "mounts":[{"destination":"/proc","type":"proc","source":"proc"},
                      {"destination":"/data","type":"bind","source":"rootfs","options":["rbind","ro"]},
                      {"destination":"/etc/hosts","source":"config.json","options":["bind"]}]}"#,
        );
        let loaded = load(b.path()).unwrap();
        let binds = bind_mounts(&loaded.spec, &loaded.dir);
        assert_eq!(binds.len(), 2);
        let real = std::fs::canonicalize(b.path()).unwrap();
        let entry = |f: &str| {
            real.join(f)
                .strip_prefix("/")
                .unwrap()
                .display()
                .to_string()
        };
        assert_eq!(
            binds[0],
            BindMount {
                index: 1,
                source: b.path().join("rootfs"),
                name: entry("rootfs"),
                read_only: true
            }
        );
        assert!(!binds[1].read_only);
        let g = rewrite_for_guest(
            &loaded.spec,
            &binds,
            Path::new(GUEST_SHARE_DIR),
            GuestNamespaces::Own {
                guest_network: false,
            },
        );
        assert_eq!(
            g.root().as_ref().unwrap().path(),
            Path::new("/run/rootcell/share/rootfs")
        );
        assert_eq!(g.root().as_ref().unwrap().readonly(), Some(true));
        let m = g.mounts().as_ref().unwrap();
        assert_eq!(m[0].source().as_deref(), Some(Path::new("proc")));
        let share = Path::new("/run/rootcell/share");
        assert_eq!(
            m[1].source().as_deref(),
            Some(&*share.join(entry("rootfs")))
        );
        assert_eq!(
            m[2].source().as_deref(),
            Some(&*share.join(entry("config.json")))
        );
        assert!(g.hooks().is_none());
    }

    #[test]
    fn resources_map_to_vm_size() {
        let b = bundle_with(MIN);
        assert_eq!(
            vm_resources(&load(b.path()).unwrap().spec),
            (DEFAULT_MEMORY_MIB, 1)
        );
        let b = bundle_with(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"user":{"uid":0,"gid":0},"args":["sh"],"cwd":"/"},
            "linux":{"resources":{"memory":{"limit":1073741824},"cpu":{"quota":150000,"period":100000}}}}"#,
        );
        let (mem, cpus) = vm_resources(&load(b.path()).unwrap().spec);
        assert_eq!(mem, 1024 + GUEST_OVERHEAD_MIB);
        let host = std::thread::available_parallelism().unwrap().get() as u32;
        assert_eq!(cpus, 2.min(host));
        let b = bundle_with(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"user":{"uid":0,"gid":0},"args":["sh"],"cwd":"/"},
            "linux":{"resources":{"memory":{"limit":6291456}}}}"#,
        );
        assert_eq!(
            vm_resources(&load(b.path()).unwrap().spec).0,
            MIN_MEMORY_MIB
        );
    }

    #[test]
    fn a_pod_sandbox_vm_holds_the_pods_memory() {
        let with = |ann: &str, limit: &str| {
            bundle_with(&format!(
                r#"{{"ociVersion":"1.0.2","root":{{"path":"rootfs"}},"process":{{"user":{{"uid":0,"gid":0}},"args":["sh"],"cwd":"/"}},
                "annotations":{{"{CRI_SANDBOX_MEMORY}":"{ann}"}},"linux":{{"resources":{{"memory":{{"limit":{limit}}}}}}}}}"#
            ))
        };
        let mem = |b: &tempfile::TempDir| vm_resources(&load(b.path()).unwrap().spec).0;
        // The pod's 1 GiB, not the default, when the pause container has no limit.
        assert_eq!(mem(&with("1073741824", "0")), 1024 + GUEST_OVERHEAD_MIB);
        // The larger of the pod's and the container's own.
        assert_eq!(mem(&with("1048576", "268435456")), 256 + GUEST_OVERHEAD_MIB);
        // Zero or garbage: as without the annotation.
        assert_eq!(mem(&with("0", "0")), DEFAULT_MEMORY_MIB);
        assert_eq!(mem(&with("lots", "0")), DEFAULT_MEMORY_MIB);
    }

    #[test]
    fn a_pod_sandbox_vm_has_the_pods_cpus() {
        let b = bundle_with(&format!(
            r#"{{"ociVersion":"1.0.2","root":{{"path":"rootfs"}},"process":{{"user":{{"uid":0,"gid":0}},"args":["sh"],"cwd":"/"}},
            "annotations":{{"{CRI_SANDBOX_CPU_QUOTA}":"150000","{CRI_SANDBOX_CPU_PERIOD}":"100000"}}}}"#
        ));
        let host = std::thread::available_parallelism().unwrap().get() as u32;
        assert_eq!(vm_resources(&load(b.path()).unwrap().spec).1, 2.min(host));
        let b = bundle_with(&format!(
            r#"{{"ociVersion":"1.0.2","root":{{"path":"rootfs"}},"process":{{"user":{{"uid":0,"gid":0}},"args":["sh"],"cwd":"/"}},
            "annotations":{{"{CRI_SANDBOX_CPU_QUOTA}":"-1","{CRI_SANDBOX_CPU_PERIOD}":"100000"}}}}"#
        ));
        assert_eq!(vm_resources(&load(b.path()).unwrap().spec).1, 1);
    }
}
