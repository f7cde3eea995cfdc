//! The runtime's guest privilege policy (`rootcell --guest-privileged`): a container gets what
//! `docker run --privileged` gives, but inside its own guest, whose kernel is not the host's.
//! Every capability, no masked or read-only paths, `/sys` (and the cgroup tree) writable, and the
//! guest's devices in the container's `/dev`. Exec'd processes get the capabilities too.

use crate::alog;
use oci_spec::runtime::{
    Capabilities, Capability, LinuxCapabilities, LinuxDevice, LinuxDeviceBuilder, LinuxDeviceType,
    Mount, Process, Spec,
};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Directories of the guest's /dev that are file systems or links of their own, not devices the
/// container should get (the container mounts its own devpts, shm and mqueue).
const SKIPPED: [&str; 5] = ["pts", "shm", "mqueue", "fd", "console"];

/// Every capability the running kernel knows, as OCI names.
pub fn all_capabilities() -> Capabilities {
    caps::runtime::thread_all_supported()
        .into_iter()
        .filter_map(|c| serde_json::from_value::<Capability>(c.to_string().into()).ok())
        .collect()
}

/// Gives `process` every capability in every set but the ambient one (as Docker does).
pub fn privilege_process(process: &mut Process) {
    let all = all_capabilities();
    let mut c: LinuxCapabilities = process.capabilities().clone().unwrap_or_default();
    c.set_bounding(Some(all.clone()))
        .set_effective(Some(all.clone()))
        .set_inheritable(Some(all.clone()))
        .set_permitted(Some(all));
    process.set_capabilities(Some(c));
}

/// Rewrites a container spec for the privileged policy; `guest_dev` is the guest's /dev.
pub fn privilege_spec(spec: &mut Spec, guest_dev: &Path) {
    if let Some(p) = spec.process_mut() {
        privilege_process(p);
    }
    if let Some(mounts) = spec.mounts_mut() {
        for m in mounts.iter_mut() {
            make_writable_if_sysfs(m);
        }
    }
    if let Some(linux) = spec.linux_mut() {
        linux.set_masked_paths(None).set_readonly_paths(None);
        let mut devices = linux.devices().clone().unwrap_or_default();
        for d in guest_devices(guest_dev) {
            if !devices.iter().any(|have| have.path() == d.path()) {
                devices.push(d);
            }
        }
        linux.set_devices(Some(devices));
    }
}

/// `/sys` and the cgroup tree under it are mounted read-only by Docker's default spec; a
/// privileged container gets them writable.
fn make_writable_if_sysfs(m: &mut Mount) {
    let sysfs = matches!(
        m.typ().as_deref(),
        Some("sysfs") | Some("cgroup") | Some("cgroup2")
    );
    if !sysfs {
        return;
    }
    if let Some(opts) = m.options_mut() {
        opts.retain(|o| o != "ro");
        if !opts.iter().any(|o| o == "rw") {
            opts.push("rw".into());
        }
    }
}

/// The character and block devices under `dir` (the guest's devtmpfs), as `linux.devices`
/// entries with container paths under /dev.
pub fn guest_devices(dir: &Path) -> Vec<LinuxDevice> {
    let mut out = Vec::new();
    walk(dir, Path::new("/dev"), &mut out);
    out.sort_by(|a, b| a.path().cmp(b.path()));
    out
}

fn walk(dir: &Path, container_dir: &Path, out: &mut Vec<LinuxDevice>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if container_dir == Path::new("/dev") && SKIPPED.iter().any(|s| name == *s) {
            continue;
        }
        // Not following links: /dev/stdin and friends point into /proc.
        let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
            continue;
        };
        let path: PathBuf = container_dir.join(&name);
        let ft = meta.file_type();
        let typ = if ft.is_char_device() {
            LinuxDeviceType::C
        } else if ft.is_block_device() {
            LinuxDeviceType::B
        } else {
            if ft.is_dir() {
                walk(&e.path(), &path, out);
            }
            continue;
        };
        let rdev = meta.rdev();
        let built = LinuxDeviceBuilder::default()
            .path(path.clone())
            .typ(typ)
            .major(libc::major(rdev) as i64)
            .minor(libc::minor(rdev) as i64)
            .file_mode(meta.mode() & 0o7777)
            .uid(0u32)
            .gid(0u32)
            .build();
        match built {
            Ok(d) => out.push(d),
            Err(err) => alog!("privileged: skipping device {}: {err}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docker_like_spec() -> Spec {
        serde_json::from_str(
            r#"{"ociVersion":"1.0.2","root":{"path":"/r"},
            "process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0},
              "capabilities":{"bounding":["CAP_CHOWN"],"effective":["CAP_CHOWN"],"permitted":["CAP_CHOWN"]}},
            "mounts":[{"destination":"/sys","type":"sysfs","source":"sysfs","options":["nosuid","noexec","nodev","ro"]},
                      {"destination":"/sys/fs/cgroup","type":"cgroup","source":"cgroup","options":["ro","nosuid"]},
                      {"destination":"/data","type":"bind","source":"/x","options":["rbind","ro"]}],
            "linux":{"namespaces":[{"type":"mount"}],"maskedPaths":["/proc/kcore"],"readonlyPaths":["/proc/sys"],
              "devices":[{"path":"/dev/fuse","type":"c","major":10,"minor":229}]}}"#,
        )
        .unwrap()
    }

    #[test]
    fn privileged_spec_has_every_capability_and_no_masks() {
        let mut spec = docker_like_spec();
        let dev = tempfile::tempdir().unwrap();
        privilege_spec(&mut spec, dev.path());
        let caps = spec
            .process()
            .as_ref()
            .unwrap()
            .capabilities()
            .clone()
            .unwrap();
        let all = all_capabilities();
        assert!(all.contains(&Capability::SysAdmin) && all.contains(&Capability::NetAdmin));
        assert_eq!(caps.bounding().as_ref(), Some(&all));
        assert_eq!(caps.effective().as_ref(), Some(&all));
        assert_eq!(caps.permitted().as_ref(), Some(&all));
        let linux = spec.linux().as_ref().unwrap();
        assert!(linux.masked_paths().is_none() && linux.readonly_paths().is_none());
        // The spec's own devices stay.
        assert_eq!(linux.devices().as_ref().unwrap().len(), 1);
    }

    #[test]
    fn sysfs_and_cgroup_become_writable_but_binds_keep_their_options() {
        let mut spec = docker_like_spec();
        let dev = tempfile::tempdir().unwrap();
        privilege_spec(&mut spec, dev.path());
        let mounts = spec.mounts().as_ref().unwrap();
        for m in &mounts[..2] {
            let o = m.options().as_ref().unwrap();
            assert!(
                !o.iter().any(|o| o == "ro") && o.iter().any(|o| o == "rw"),
                "{o:?}"
            );
        }
        assert!(mounts[2]
            .options()
            .as_ref()
            .unwrap()
            .iter()
            .any(|o| o == "ro"));
    }

    #[test]
    fn guest_devices_lists_char_devices_and_skips_pts() {
        // The test host's /dev stands in for the guest's devtmpfs.
        let devs = guest_devices(Path::new("/dev"));
        let null = devs
            .iter()
            .find(|d| d.path() == Path::new("/dev/null"))
            .expect("/dev/null listed");
        assert_eq!((null.major(), null.minor()), (1, 3));
        assert_eq!(null.typ(), LinuxDeviceType::C);
        assert!(devs.iter().all(|d| !d.path().starts_with("/dev/pts")));
        assert!(devs.iter().all(|d| d.path() != Path::new("/dev/console")));
    }
}
