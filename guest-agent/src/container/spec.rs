//! Checks an OCI spec against what the agent implements and derives the namespace plan.
//!
//! Fields that only matter for host-level confinement (seccomp, AppArmor, SELinux, cgroup
//! resources incl. device rules, hooks) are logged and ignored: the VM is the isolation
//! boundary and the host runtime owns hooks. Everything else we cannot honour is refused.

use super::error::SetupError;
use crate::alog;
use nix::sched::CloneFlags;
use oci_spec::runtime::{LinuxNamespaceType, Process, Spec};
use std::path::{Path, PathBuf};

/// The namespaces a container gets, as validated from `linux.namespaces`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespacePlan {
    /// Namespace types the container has apart from the agent's (created or joined), in spec
    /// order: an exec joins the init's namespace of each.
    pub types: Vec<LinuxNamespaceType>,
    /// Those of `types` that are joined rather than created: another container's namespace in
    /// this guest (`/proc/<pid>/ns/<type>` of its init), for containers sharing a VM.
    pub joined: Vec<(LinuxNamespaceType, PathBuf)>,
}

impl NamespacePlan {
    /// The `unshare`/`clone` flags for the namespaces to create.
    pub fn clone_flags(&self) -> CloneFlags {
        self.types
            .iter()
            .filter(|t| !self.joins(**t))
            .fold(CloneFlags::empty(), |f, t| f | ns_flag(*t))
    }

    /// Whether the container has a namespace of this type apart from the agent's.
    pub fn has(&self, t: LinuxNamespaceType) -> bool {
        self.types.contains(&t)
    }

    /// Whether the container's namespace of this type is created for it (not joined).
    pub fn creates(&self, t: LinuxNamespaceType) -> bool {
        self.has(t) && !self.joins(t)
    }

    fn joins(&self, t: LinuxNamespaceType) -> bool {
        self.joined.iter().any(|(j, _)| *j == t)
    }
}

/// Whether `path` names a namespace of a process in this guest (`/proc/<pid>/ns/<name>` with
/// `name` the type's): the only paths the host hands over to be joined.
fn guest_namespace_path(path: &Path, t: LinuxNamespaceType) -> bool {
    let mut parts = path.components().map(|c| c.as_os_str().to_str());
    parts.next() == Some(Some("/"))
        && parts.next() == Some(Some("proc"))
        && parts
            .next()
            .flatten()
            .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
        && parts.next() == Some(Some("ns"))
        && parts.next() == Some(Some(ns_proc_name(t)))
        && parts.next().is_none()
}

/// The clone flag of a namespace type.
pub fn ns_flag(t: LinuxNamespaceType) -> CloneFlags {
    match t {
        LinuxNamespaceType::Mount => CloneFlags::CLONE_NEWNS,
        LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
        LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
        LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
        LinuxNamespaceType::User => CloneFlags::CLONE_NEWUSER,
        LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
        LinuxNamespaceType::Network => CloneFlags::CLONE_NEWNET,
        LinuxNamespaceType::Time => CloneFlags::from_bits_retain(libc::CLONE_NEWTIME),
    }
}

pub use rootcell_protocol::ns_file_name as ns_proc_name;

/// Validates a container spec; returns the namespaces to create.
pub fn validate(spec: &Spec) -> Result<NamespacePlan, SetupError> {
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| SetupError::other("spec has no root"))?;
    if !root.path().is_absolute() {
        return Err(SetupError::other(format!(
            "root path {} is not an absolute guest path",
            root.path().display()
        )));
    }
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| SetupError::other("spec has no process"))?;
    validate_process(process)?;
    let linux = spec
        .linux()
        .as_ref()
        .ok_or_else(|| SetupError::unsupported("spec has no linux section"))?;

    let mut plan = NamespacePlan::default();
    for ns in linux.namespaces().iter().flatten() {
        let t = ns.typ();
        match t {
            LinuxNamespaceType::User | LinuxNamespaceType::Time => {
                return Err(SetupError::unsupported(format!(
                    "{} namespaces are not supported",
                    ns_proc_name(t)
                )));
            }
            _ => {}
        }
        if let Some(path) = ns.path() {
            let joinable = !matches!(t, LinuxNamespaceType::Mount | LinuxNamespaceType::User);
            if joinable && guest_namespace_path(path, t) {
                plan.joined.push((t, path.clone()));
            } else if t == LinuxNamespaceType::Network {
                // Docker hands over the network namespace it prepared on the host; that one cannot
                // cross the VM boundary, so the container gets a fresh one inside the guest.
                alog!(
                    "warning: ignoring network namespace path {}; creating a fresh one",
                    path.display()
                );
            } else {
                return Err(SetupError::unsupported(format!(
                    "joining an existing {} namespace ({}) is not supported",
                    ns_proc_name(t),
                    path.display()
                )));
            }
        }
        if !plan.types.contains(&t) {
            plan.types.push(t);
        }
    }
    if !plan.has(LinuxNamespaceType::Mount) {
        return Err(SetupError::unsupported("a mount namespace is required"));
    }

    if linux.uid_mappings().as_ref().is_some_and(|m| !m.is_empty())
        || linux.gid_mappings().as_ref().is_some_and(|m| !m.is_empty())
    {
        return Err(SetupError::unsupported(
            "user namespace id mappings are not supported",
        ));
    }
    if linux.intel_rdt().is_some() {
        return Err(SetupError::unsupported("linux.intelRdt is not supported"));
    }
    if linux.personality().is_some() {
        return Err(SetupError::unsupported(
            "linux.personality is not supported",
        ));
    }
    if linux.memory_policy().is_some() {
        return Err(SetupError::unsupported(
            "linux.memoryPolicy is not supported",
        ));
    }
    if linux.time_offsets().as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(SetupError::unsupported(
            "linux.timeOffsets is not supported",
        ));
    }
    if linux.net_devices().as_ref().is_some_and(|d| !d.is_empty()) {
        return Err(SetupError::unsupported("linux.netDevices is not supported"));
    }
    if linux.seccomp().is_some() {
        alog!("ignoring linux.seccomp (the VM is the isolation boundary)");
    }
    if linux.mount_label().is_some() {
        alog!("ignoring linux.mountLabel (no SELinux in the guest)");
    }
    if linux.resources().is_some() {
        alog!("linux.resources: memory and pids limits apply in the guest; CPU is the VM's size; the rest is ignored");
    }
    if spec.hooks().is_some() {
        alog!("ignoring hooks (run by the host runtime)");
    }
    Ok(plan)
}

/// Validates the parts of a process the agent cannot honour (used for init and exec).
pub fn validate_process(process: &Process) -> Result<(), SetupError> {
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(SetupError::other("process.args must not be empty"));
    }
    if process.apparmor_profile().is_some() {
        alog!("ignoring process.apparmorProfile (no AppArmor in the guest)");
    }
    if process.selinux_label().is_some() {
        alog!("ignoring process.selinuxLabel (no SELinux in the guest)");
    }
    if process.io_priority().is_some() {
        return Err(SetupError::unsupported(
            "process.ioPriority is not supported",
        ));
    }
    if process.scheduler().is_some() {
        return Err(SetupError::unsupported(
            "process.scheduler is not supported",
        ));
    }
    if process.exec_cpu_affinity().is_some() {
        return Err(SetupError::unsupported(
            "process.execCPUAffinity is not supported",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rootcell_protocol::ErrorCode;

    fn spec_with(namespaces: &str, extra_linux: &str) -> Spec {
        let json = format!(
            r#"{{"ociVersion":"1.0.2","root":{{"path":"/run/rootcell/share/rootfs"}},
            "process":{{"args":["sh"],"cwd":"/","user":{{"uid":0,"gid":0}}}},
            "linux":{{"namespaces":[{namespaces}]{extra_linux}}}}}"#
        );
        serde_json::from_str(&json).unwrap()
    }

    #[test]
    fn docker_like_namespaces_are_accepted() {
        let spec = spec_with(
            r#"{"type":"mount"},{"type":"network","path":"/var/run/docker/netns/x"},{"type":"uts"},{"type":"pid"},{"type":"ipc"}"#,
            r#","seccomp":{"defaultAction":"SCMP_ACT_ERRNO"},"resources":{"devices":[{"allow":false,"access":"rwm"}]}"#,
        );
        let plan = validate(&spec).unwrap();
        assert!(plan.has(LinuxNamespaceType::Network));
        assert!(plan.clone_flags().contains(
            CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWNET
        ));
        assert!(!plan.has(LinuxNamespaceType::Cgroup));
    }

    #[test]
    fn refused_features() {
        let cases = [
            spec_with(r#"{"type":"mount"},{"type":"user"}"#, ""),
            spec_with(
                r#"{"type":"mount"},{"type":"ipc","path":"/run/netns/x"}"#,
                "",
            ),
            spec_with(r#"{"type":"mount","path":"/proc/1/ns/mnt"}"#, ""),
            spec_with(
                r#"{"type":"mount"},{"type":"ipc","path":"/proc/1/ns/net"}"#,
                "",
            ),
            spec_with(r#"{"type":"pid"}"#, ""),
            spec_with(
                r#"{"type":"mount"}"#,
                r#","uidMappings":[{"containerID":0,"hostID":1000,"size":1}]"#,
            ),
        ];
        for spec in cases {
            assert_eq!(validate(&spec).unwrap_err().code, ErrorCode::Unsupported);
        }
    }

    #[test]
    fn another_containers_namespaces_are_joined() {
        let spec = spec_with(
            r#"{"type":"mount"},{"type":"network","path":"/proc/12/ns/net"},{"type":"ipc","path":"/proc/12/ns/ipc"},{"type":"pid"}"#,
            "",
        );
        let plan = validate(&spec).unwrap();
        assert!(
            plan.has(LinuxNamespaceType::Network) && !plan.creates(LinuxNamespaceType::Network)
        );
        assert!(plan.creates(LinuxNamespaceType::Pid));
        assert_eq!(
            plan.clone_flags(),
            CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID
        );
        assert_eq!(plan.joined.len(), 2);
    }

    #[test]
    fn empty_args_are_an_error() {
        let mut spec = spec_with(r#"{"type":"mount"}"#, "");
        let mut p = spec.process().clone().unwrap();
        p.set_args(Some(vec![]));
        spec.set_process(Some(p));
        assert_eq!(validate(&spec).unwrap_err().code, ErrorCode::Other);
    }
}
