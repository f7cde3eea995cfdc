//! Host cgroups for the sandbox (and the VMM it spawns): `docker stats` and OOM detection read
//! the cgroup of the pid they were given, so the sandbox joins `linux.cgroupsPath` in every
//! mounted hierarchy. No limits are set on the host: the guest enforces the container's limits,
//! and host limits sized for the container would kill the VMM instead.

use std::path::{Path, PathBuf};

/// Where cgroup hierarchies are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

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

/// A cgroupfs-style path (`/docker/<id>`); systemd's `slice:prefix:name` form is not supported.
fn relative(path: &str) -> Option<PathBuf> {
    if path.contains(':') || path.split('/').any(|c| c == "..") {
        return None;
    }
    let rel = path.trim_start_matches('/');
    (!rel.is_empty()).then(|| PathBuf::from(rel))
}

/// Moves `pid` into `path` in every hierarchy, creating the directories; returns what failed.
pub fn join(path: &str, pid: u32) -> Vec<String> {
    join_at(Path::new(CGROUP_ROOT), path, pid)
}

fn join_at(base: &Path, path: &str, pid: u32) -> Vec<String> {
    let Some(rel) = relative(path) else {
        return vec![format!(
            "cgroupsPath {path:?} is not a cgroupfs path; the sandbox stays in its parent's cgroup"
        )];
    };
    let mut errors = Vec::new();
    for h in hierarchies(base) {
        let mut dir = h.clone();
        for comp in rel.components() {
            let parent = dir.clone();
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

/// Removes the leaf directory of `path` in every hierarchy (parents may be shared).
pub fn remove(path: &str) {
    let Some(rel) = relative(path) else { return };
    for h in hierarchies(Path::new(CGROUP_ROOT)) {
        let _ = std::fs::remove_dir(h.join(&rel));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_cgroupfs_paths() {
        assert_eq!(relative("/docker/abc"), Some(PathBuf::from("docker/abc")));
        assert_eq!(relative("system.slice:docker:abc"), None);
        assert_eq!(relative("/a/../b"), None);
        assert_eq!(relative("/"), None);
    }

    #[test]
    fn join_creates_dirs_and_copies_cpuset() {
        let d = tempfile::tempdir().unwrap();
        let cpuset = d.path().join("cpuset");
        std::fs::create_dir(&cpuset).unwrap();
        std::fs::write(cpuset.join("cgroup.procs"), "").unwrap();
        std::fs::write(cpuset.join("cpuset.cpus"), "0-1\n").unwrap();
        std::fs::write(cpuset.join("cpuset.mems"), "0\n").unwrap();
        let errs = join_at(d.path(), "/docker/c1", 42);
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
}
