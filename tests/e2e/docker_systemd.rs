//! Docker with its systemd cgroup driver (the default on cgroup v2 hosts): `linux.cgroupsPath`
//! comes as `system.slice:docker:<id>`, and the VM's processes must live in the scope systemd
//! would make for it, so that `docker stats` and OOM detection see them.

use rootcell_e2e::docker::{daemon_with, inspect, ok, run_detached};
use std::path::{Path, PathBuf};

const SYSTEMD_DRIVER: &[&str] = &["--exec-opt", "native.cgroupdriver=systemd"];

/// Removes the `system.slice` directories the test made (these hosts run no systemd).
struct SliceCleanup(Vec<PathBuf>);

impl Drop for SliceCleanup {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

fn hierarchies() -> Vec<PathBuf> {
    std::fs::read_dir("/sys/fs/cgroup")
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("cgroup.procs").exists() && !p.is_symlink())
        .collect()
}

/// The path of `pid`'s cgroup in the hierarchy whose controllers include `controller`; on a
/// cgroup v2 host (one `0::PATH` line, as in the nested lane's L1) the unified one.
fn cgroup_of(pid: &str, controller: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let lines: Vec<(&str, &str, &str)> = text
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            Some((f.next()?, f.next()?, f.next()?))
        })
        .collect();
    let v1 = lines
        .iter()
        .find(|(_, ctrls, _)| ctrls.split(',').any(|c| c == controller));
    let unified_only = match lines.as_slice() {
        [("0", "", path)] => Some(path),
        _ => None,
    };
    v1.map(|(_, _, path)| path)
        .or(unified_only)
        .unwrap_or_else(|| panic!("no {controller} line in {text}"))
        .to_string()
}

#[test]
fn systemd_cgroup_driver_puts_the_vm_in_the_docker_scope() {
    let made: Vec<PathBuf> = hierarchies()
        .into_iter()
        .map(|h| h.join("system.slice"))
        .filter(|d| !d.exists())
        .collect();
    let _cleanup = SliceCleanup(made);
    let d = daemon_with(SYSTEMD_DRIVER);
    assert_eq!(
        ok(d, &["info", "--format", "{{.CgroupDriver}}"]).trim(),
        "systemd"
    );

    let id = run_detached(d, &[], "sleep 600");
    let full = inspect(d, &id, "{{.Id}}");
    let pid = inspect(d, &id, "{{.State.Pid}}");
    let scope = format!("/system.slice/docker-{full}.scope");
    assert_eq!(cgroup_of(&pid, "memory"), scope);
    assert_eq!(cgroup_of(&pid, "cpu"), scope);
    // docker stats reads that cgroup: the VM's memory shows.
    let usage = ok(
        d,
        &["stats", "--no-stream", "--format", "{{.MemUsage}}", &id],
    );
    assert!(
        !usage.starts_with("0B"),
        "docker stats sees no memory: {usage}"
    );

    let oom = run_detached(
        d,
        &["--memory", "128m"],
        "exec dd if=/dev/zero of=/dev/null bs=150M count=1",
    );
    assert_eq!(ok(d, &["wait", &oom]).trim(), "137");
    assert_eq!(inspect(d, &oom, "{{.State.OOMKilled}}"), "true");

    ok(d, &["rm", "-f", &id, &oom]);
    for h in hierarchies() {
        let dir = h.join(format!("system.slice/docker-{full}.scope"));
        assert!(!Path::new(&dir).exists(), "{} left behind", dir.display());
    }
}
