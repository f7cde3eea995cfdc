//! Host cgroups for the sandbox (and the VMM it spawns): `docker stats` and OOM detection read
//! the cgroup of the pid they were given, so the sandbox joins `linux.cgroupsPath` in every
//! mounted hierarchy. No memory limit is set on the host: the guest enforces the container's
//! limit, and a host limit sized for the container would kill the VMM instead. CPU bandwidth
//! from `update` is set on the host: it only slows the VMM down.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where cgroup hierarchies are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The hierarchies to use: every v1 controller dir under /sys/fs/cgroup, or the v2 root.
fn hierarchies(base: &Path) -> Vec<PathBuf> {
    if base.join("cgroup.procs").exists() {
        return vec![base.to_path_buf()];
    }
    let mut out: Vec<PathBuf> = std::fs::read_dir(base)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.join("cgroup.procs").exists() && !is_link(p))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn is_link(p: &Path) -> bool {
    std::fs::symlink_metadata(p)
        .map(|m| m.file_type().is_symlink())
        .unwrap_or(false)
}

/// The cgroup directory of `path` relative to a hierarchy's root: a cgroupfs path
/// (`/docker/<id>`), or systemd's `slice:prefix:name` (Docker's systemd cgroup driver), which
/// names the scope `prefix-name.scope` in that slice. The directory is made without asking
/// systemd for a transient unit: systemd leaves cgroups it did not make alone.
pub fn relative(path: &str) -> Option<PathBuf> {
    if path.contains(':') {
        return systemd_relative(path);
    }
    if path.split('/').any(|c| c == "..") {
        return None;
    }
    let rel = path.trim_start_matches('/');
    (!rel.is_empty()).then(|| PathBuf::from(rel))
}

/// `slice:prefix:name` as systemd lays it out: `a-b.slice` lives in `a.slice/a-b.slice`.
fn systemd_relative(path: &str) -> Option<PathBuf> {
    let parts: Vec<&str> = path.split(':').collect();
    let [slice, prefix, name] = parts[..] else {
        return None;
    };
    let plain = |s: &str| !s.contains('/') && s != "." && s != "..";
    if name.is_empty() || ![slice, prefix, name].into_iter().all(plain) {
        return None;
    }
    let mut dir = expand_slice(if slice.is_empty() {
        "system.slice"
    } else {
        slice
    })?;
    dir.push(match (name.ends_with(".slice"), prefix.is_empty()) {
        (true, _) => name.to_string(),
        (false, true) => format!("{name}.scope"),
        (false, false) => format!("{prefix}-{name}.scope"),
    });
    Some(dir)
}

fn expand_slice(slice: &str) -> Option<PathBuf> {
    let base = slice.strip_suffix(".slice")?;
    if base == "-" {
        return Some(PathBuf::new());
    }
    if base.is_empty() || base.split('-').any(str::is_empty) {
        return None;
    }
    let mut dir = PathBuf::new();
    let mut unit = String::new();
    for part in base.split('-') {
        if !unit.is_empty() {
            unit.push('-');
        }
        unit.push_str(part);
        dir.push(format!("{unit}.slice"));
    }
    Some(dir)
}

/// Which hierarchies a join covers. CPU time is joined only once the container is created, so
/// the CPU spent booting its VM is not charged to it (INGInious enforces CPU-time limits from
/// this cgroup); everything else at once, so the VM's memory is charged from the start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Every v1 hierarchy but the ones with the cpu or cpuacct controller (nothing on v2).
    AllButCpu,
    /// The v1 hierarchies with cpu or cpuacct, or the v2 unified one (which holds all).
    Cpu,
}

impl Part {
    /// Whether hierarchy `h` (a v1 controller directory, or the v2 root `base`) is in this part.
    fn covers(self, base: &Path, h: &Path) -> bool {
        let cpu = h == base
            || h.file_name().is_some_and(|n| {
                n.to_string_lossy()
                    .split(',')
                    .any(|c| c == "cpu" || c == "cpuacct")
            });
        cpu == (self == Part::Cpu)
    }
}

/// Moves `pid` into `path` in the hierarchies of `part`, creating the directories; returns what
/// failed.
pub fn join(path: &str, pid: u32, part: Part) -> Vec<String> {
    join_at(Path::new(CGROUP_ROOT), path, pid, part)
}

fn join_at(base: &Path, path: &str, pid: u32, part: Part) -> Vec<String> {
    let Some(rel) = relative(path) else {
        return vec![format!(
            "cgroupsPath {path:?} is neither a cgroupfs nor a systemd path; the sandbox stays in its parent's cgroup"
        )];
    };
    let mut errors = Vec::new();
    for h in hierarchies(base)
        .into_iter()
        .filter(|h| part.covers(base, h))
    {
        let unified = h == base;
        let mut dir = h.clone();
        for comp in rel.components() {
            let parent = dir.clone();
            if unified {
                enable_controllers(&parent);
            }
            dir.push(comp);
            if !dir.exists() {
                if let Err(e) = std::fs::create_dir(&dir) {
                    errors.push(format!("create {}: {e}", dir.display()));
                    break;
                }
                // A new v1 cpuset group starts empty and refuses tasks until it has cpus/mems.
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    if let Ok(v) = std::fs::read_to_string(parent.join(f)) {
                        let _ = std::fs::write(dir.join(f), v.trim());
                    }
                }
            }
        }
        if let Err(e) = std::fs::write(dir.join("cgroup.procs"), pid.to_string()) {
            errors.push(format!("join {}: {e}", dir.display()));
        }
    }
    errors
}

/// On cgroup v2 a cgroup has the controllers its parent lists in `cgroup.subtree_control`, and
/// nothing else: without this, the container's cgroup under a parent rootcell made (Docker's
/// `/docker`) has no `memory.*`, `cpu.*` or `pids.*` files, so `docker stats` reads nothing and
/// an OOM kill cannot be relayed. Enables in `parent` every controller it has, as runc does on
/// the way down to a container's cgroup. Each is tried alone: one the kernel refuses here (a
/// parent with processes of its own takes no domain controllers) does not stop the others, and
/// is no error for the join (the cgroup still counts what it can).
fn enable_controllers(parent: &Path) {
    let Ok(available) = std::fs::read_to_string(parent.join("cgroup.controllers")) else {
        return;
    };
    let enabled =
        std::fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap_or_default();
    for c in available.split_whitespace() {
        if enabled.split_whitespace().any(|e| e == c) {
            continue;
        }
        if let Err(e) = std::fs::write(parent.join("cgroup.subtree_control"), format!("+{c}")) {
            tracing::debug!(cgroup = %parent.display(), controller = c, "cannot enable: {e}");
        }
    }
}

/// Sets CPU bandwidth and weight of `path` wherever a hierarchy has the cpu controller (v1
/// `cpu.cfs_*`/`cpu.shares`, v2 `cpu.max`); returns what failed.
pub fn set_cpu(
    path: &str,
    quota: Option<i64>,
    period: Option<u64>,
    shares: Option<u64>,
) -> Vec<String> {
    set_cpu_at(Path::new(CGROUP_ROOT), path, quota, period, shares)
}

fn set_cpu_at(
    base: &Path,
    path: &str,
    quota: Option<i64>,
    period: Option<u64>,
    shares: Option<u64>,
) -> Vec<String> {
    let Some(rel) = relative(path) else {
        return vec![format!(
            "cgroupsPath {path:?} is neither a cgroupfs nor a systemd path"
        )];
    };
    let mut errors = Vec::new();
    let mut write = |file: PathBuf, value: String| {
        if let Err(e) = std::fs::write(&file, &value) {
            errors.push(format!("write {value} to {}: {e}", file.display()));
        }
    };
    for h in hierarchies(base) {
        let dir = h.join(&rel);
        if dir.join("cpu.cfs_quota_us").exists() {
            // The period first: a quota is checked against the current period.
            if let Some(p) = period.filter(|p| *p > 0) {
                write(dir.join("cpu.cfs_period_us"), p.to_string());
            }
            if let Some(q) = quota.filter(|q| *q != 0) {
                write(dir.join("cpu.cfs_quota_us"), q.to_string());
            }
            if let Some(s) = shares.filter(|s| *s > 0) {
                write(dir.join("cpu.shares"), s.to_string());
            }
        } else if dir.join("cpu.max").exists() && (quota.is_some() || period.is_some()) {
            let q = quota
                .filter(|q| *q > 0)
                .map_or("max".to_string(), |q| q.to_string());
            write(
                dir.join("cpu.max"),
                format!("{q} {}", period.filter(|p| *p > 0).unwrap_or(100_000)),
            );
        }
    }
    errors
}

/// How long [`remove`] waits for a cgroup to empty.
pub const REMOVE_WAIT: Duration = Duration::from_secs(10);

/// Removes the leaf directory of `path` in every hierarchy (parents may be shared), and the
/// OOM relay's holding cgroup beside it if a killed sandbox left one. Returns what could not
/// be removed.
///
/// A cgroup refuses removal (EBUSY) while a task is in it. After SIGKILL the sandbox and the
/// VMM show as dead (zombie leaders) while their other threads are still exiting and still in
/// the cgroup, so a busy directory is retried until it empties, for up to `REMOVE_WAIT`.
pub fn remove(path: &str) -> Vec<String> {
    remove_at(Path::new(CGROUP_ROOT), path, REMOVE_WAIT)
}

fn remove_at(base: &Path, path: &str, wait: Duration) -> Vec<String> {
    let Some(rel) = relative(path) else {
        return Vec::new();
    };
    let mut holding = rel.clone().into_os_string();
    holding.push(crate::oom::HOLDING_SUFFIX);
    let deadline = Instant::now() + wait;
    let mut errors = Vec::new();
    for h in hierarchies(base) {
        for dir in [h.join(&rel), h.join(&holding)] {
            if let Err(e) = remove_when_empty(&dir, deadline) {
                let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                errors.push(format!(
                    "cannot remove cgroup {}: {e} (processes still in it: {})",
                    dir.display(),
                    procs.split_whitespace().collect::<Vec<_>>().join(" ")
                ));
            }
        }
    }
    errors
}

/// rmdir, retried while the cgroup is busy until `deadline`; a missing directory is fine.
fn remove_when_empty(dir: &Path, deadline: Instant) -> std::io::Result<()> {
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroupfs_and_systemd_paths() {
        assert_eq!(relative("/docker/abc"), Some(PathBuf::from("docker/abc")));
        assert_eq!(relative("/a/../b"), None);
        assert_eq!(relative("/"), None);
        let systemd = [
            ("system.slice:docker:abc", "system.slice/docker-abc.scope"),
            (":docker:abc", "system.slice/docker-abc.scope"),
            (
                "user-1000.slice:podman:x",
                "user.slice/user-1000.slice/podman-x.scope",
            ),
            ("-.slice::abc", "abc.scope"),
            (
                "machine.slice::kube-pod.slice",
                "machine.slice/kube-pod.slice",
            ),
        ];
        for (path, want) in systemd {
            assert_eq!(relative(path), Some(PathBuf::from(want)), "{path}");
        }
        for bad in [
            "a:b",
            "a:b:c:d",
            "system.slice:docker:",
            "system:docker:x",
            "a--b.slice:d:x",
            "system.slice:d:../x",
            "system.slice:d:..",
        ] {
            assert_eq!(relative(bad), None, "{bad}");
        }
    }

    #[test]
    fn set_cpu_writes_v1_bandwidth_files() {
        let d = tempfile::tempdir().unwrap();
        let cpu = d.path().join("cpu,cpuacct");
        std::fs::create_dir_all(cpu.join("docker/c1")).unwrap();
        std::fs::write(cpu.join("cgroup.procs"), "").unwrap();
        for f in ["cpu.cfs_quota_us", "cpu.cfs_period_us", "cpu.shares"] {
            std::fs::write(cpu.join("docker/c1").join(f), "").unwrap();
        }
        let errs = set_cpu_at(
            d.path(),
            "/docker/c1",
            Some(50_000),
            Some(100_000),
            Some(512),
        );
        assert!(errs.is_empty(), "{errs:?}");
        let read = |f: &str| std::fs::read_to_string(cpu.join("docker/c1").join(f)).unwrap();
        assert_eq!(read("cpu.cfs_quota_us"), "50000");
        assert_eq!(read("cpu.cfs_period_us"), "100000");
        assert_eq!(read("cpu.shares"), "512");
    }

    #[test]
    fn join_creates_dirs_and_copies_cpuset() {
        let d = tempfile::tempdir().unwrap();
        let cpuset = d.path().join("cpuset");
        std::fs::create_dir(&cpuset).unwrap();
        std::fs::write(cpuset.join("cgroup.procs"), "").unwrap();
        std::fs::write(cpuset.join("cpuset.cpus"), "0-1\n").unwrap();
        std::fs::write(cpuset.join("cpuset.mems"), "0\n").unwrap();
        let errs = join_at(d.path(), "/docker/c1", 42, Part::AllButCpu);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(
            std::fs::read_to_string(cpuset.join("docker/c1/cgroup.procs")).unwrap(),
            "42"
        );
        assert_eq!(
            std::fs::read_to_string(cpuset.join("docker/cpuset.cpus")).unwrap(),
            "0-1"
        );
    }

    #[test]
    fn cpu_hierarchies_are_joined_apart_from_the_others() {
        let d = tempfile::tempdir().unwrap();
        for h in ["cpu,cpuacct", "memory", "pids"] {
            std::fs::create_dir(d.path().join(h)).unwrap();
            std::fs::write(d.path().join(h).join("cgroup.procs"), "").unwrap();
        }
        let procs =
            |h: &str| std::fs::read_to_string(d.path().join(h).join("c1/cgroup.procs")).ok();
        assert!(join_at(d.path(), "/c1", 42, Part::AllButCpu).is_empty());
        assert_eq!(procs("memory").as_deref(), Some("42"));
        assert_eq!(procs("pids").as_deref(), Some("42"));
        assert_eq!(
            procs("cpu,cpuacct"),
            None,
            "CPU joined before the guest is up"
        );
        assert!(join_at(d.path(), "/c1", 42, Part::Cpu).is_empty());
        assert_eq!(procs("cpu,cpuacct").as_deref(), Some("42"));

        // cgroup v2: one hierarchy, joined with the CPU part.
        let v2 = tempfile::tempdir().unwrap();
        std::fs::write(v2.path().join("cgroup.procs"), "").unwrap();
        assert!(join_at(v2.path(), "/c1", 7, Part::AllButCpu).is_empty());
        assert!(!v2.path().join("c1").exists());
        assert!(join_at(v2.path(), "/c1", 7, Part::Cpu).is_empty());
        assert_eq!(
            std::fs::read_to_string(v2.path().join("c1/cgroup.procs")).unwrap(),
            "7"
        );
    }

    #[test]
    fn v2_join_enables_the_parents_controllers_on_the_way_down() {
        let v2 = tempfile::tempdir().unwrap();
        let root = v2.path();
        std::fs::write(root.join("cgroup.procs"), "").unwrap();
        std::fs::write(root.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        std::fs::write(root.join("cgroup.subtree_control"), "").unwrap();
        // `/docker` exists already with controllers of its own (the kernel would fill these in).
        std::fs::create_dir(root.join("docker")).unwrap();
        std::fs::write(root.join("docker/cgroup.controllers"), "memory pids\n").unwrap();
        std::fs::write(root.join("docker/cgroup.subtree_control"), "pids\n").unwrap();
        assert!(join_at(root, "/docker/c1", 7, Part::Cpu).is_empty());
        // A plain file keeps only the last write: the last controller not yet enabled.
        assert_eq!(
            std::fs::read_to_string(root.join("cgroup.subtree_control")).unwrap(),
            "+pids"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("docker/cgroup.subtree_control")).unwrap(),
            "+memory"
        );
        // Not in the leaf: the sandbox lives there, and a cgroup with processes takes none.
        assert!(!root.join("docker/c1/cgroup.subtree_control").exists());
    }
}
