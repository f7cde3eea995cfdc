//! Containers that share a VM: which running rootcell container's VM a spec joins, and what
//! its namespace paths mean inside that guest.
//!
//! A spec joins another container's namespace by path: `/proc/<pid>/ns/<type>` of that
//! container's process (`docker run --network container:A`, `--ipc container:A`, Podman's pod
//! members), or, for the network, a namespace file that the container's process lives in
//! (Podman's `/run/netns/...`). A VM has its own kernel, so the only namespaces a container can
//! share are those of containers in the same VM: such a container is created in the VM of the
//! container it joins (the VM's *owner*, the container whose sandbox booted it), with its own
//! rootfs and mount, pid and UTS namespaces unless it joins those too. Joining namespaces of
//! two different VMs, or of a process that is not a rootcell container, is refused.

use crate::error::RuntimeError;
use crate::state::{ContainerState, Status};
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// The VM a container joins and the guest paths of the namespaces it joins there.
#[derive(Debug, Clone)]
pub struct Join {
    /// The container whose sandbox runs the VM.
    pub owner: ContainerState,
    /// Each joined namespace type with its path in the guest (`/proc/<guest pid>/ns/<type>`).
    pub namespaces: Vec<(LinuxNamespaceType, PathBuf)>,
}

use rootcell_protocol::ns_file_name as ns_name;

/// The pid of a `/proc/<pid>/ns/<anything>` path.
fn proc_pid(path: &Path) -> Option<i32> {
    let mut parts = path.components();
    if parts.next() != Some(Component::RootDir)
        || parts.next() != Some(Component::Normal("proc".as_ref()))
    {
        return None;
    }
    let pid = parts.next()?.as_os_str().to_str()?.parse().ok()?;
    (parts.next() == Some(Component::Normal("ns".as_ref()))).then_some(pid)
}

/// Device and inode of a namespace file, which identify the namespace.
fn ns_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The live containers under `root` (created, running or paused, sandbox alive).
fn live_containers(root: &Path) -> Vec<ContainerState> {
    let Ok(dir) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| ContainerState::load(&e.path().join("state.json")).ok())
        .map(ContainerState::refreshed)
        .filter(|s| {
            matches!(s.status, Status::Created | Status::Running | Status::Paused) && s.pid > 0
        })
        .collect()
}

/// Which VM a spec's namespace paths put the container in: `None` when it names no
/// namespace of a running rootcell container (its own VM; the network checks apply).
pub fn resolve(root: &Path, spec: &Spec) -> Result<Option<Join>, RuntimeError> {
    let namespaces = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default();
    let with_path: Vec<(usize, LinuxNamespaceType, PathBuf)> = namespaces
        .iter()
        .enumerate()
        .filter(|(_, n)| {
            !matches!(
                n.typ(),
                LinuxNamespaceType::Mount | LinuxNamespaceType::User
            )
        })
        .filter_map(|(i, n)| Some((i, n.typ(), n.path().clone()?)))
        .collect();
    if with_path.is_empty() {
        return Ok(None);
    }
    let live = live_containers(root);
    let mut found: Vec<(usize, LinuxNamespaceType, Option<&ContainerState>)> = Vec::new();
    for (i, t, path) in &with_path {
        let by_pid = proc_pid(path).and_then(|pid| live.iter().find(|c| c.pid == pid));
        // A network namespace file (Podman's /run/netns/...) belongs to the container whose
        // sandbox lives in it.
        let by_ns = || {
            let id = ns_id(path)?;
            live.iter()
                .find(|c| ns_id(&PathBuf::from(format!("/proc/{}/ns/net", c.pid))) == Some(id))
        };
        let c = by_pid.or_else(|| (*t == LinuxNamespaceType::Network).then(by_ns).flatten());
        found.push((*i, *t, c));
    }
    let field = |i: usize| format!("linux.namespaces[{i}].path");
    let Some(first) = found.iter().find_map(|(_, _, c)| *c) else {
        // No rootcell container: a network path is the network module's to judge; any other
        // path cannot cross into a VM.
        if let Some((i, t, path)) = with_path
            .iter()
            .find(|(_, t, _)| *t != LinuxNamespaceType::Network)
        {
            return Err(RuntimeError::Unsupported {
                field: field(*i),
                msg: format!(
                    "the {} namespace {} is not one of a running rootcell container; a VM has \
                     its own kernel, so a container can join only the namespaces of another \
                     rootcell container (it then runs in that container's VM); remove the path \
                     for a namespace of its own",
                    ns_name(*t),
                    path.display()
                ),
            });
        }
        return Ok(None);
    };
    let owner_of = |c: &ContainerState| {
        c.shares_vm
            .as_ref()
            .map_or_else(|| c.id.clone(), |s| s.owner.clone())
    };
    let owner_id = owner_of(first);
    let mut joined = Vec::new();
    for (i, t, c) in &found {
        let path = &with_path
            .iter()
            .find(|(j, _, _)| j == i)
            .expect("same list")
            .2;
        let Some(c) = c else {
            return Err(RuntimeError::Unsupported {
                field: field(*i),
                msg: format!(
                    "the {} namespace {} is not one of a running rootcell container, while {} \
                     is joined in the VM of container {}; a container's namespaces must all \
                     be in one VM",
                    ns_name(*t),
                    path.display(),
                    ns_name(found[0].1),
                    owner_id
                ),
            });
        };
        if owner_of(c) != owner_id {
            return Err(RuntimeError::Unsupported {
                field: field(*i),
                msg: format!(
                    "joins namespaces of containers in two VMs ({} and {}); a container runs \
                     in one VM",
                    owner_id,
                    owner_of(c)
                ),
            });
        }
        if c.guest_pid <= 0 {
            return Err(RuntimeError::Unsupported {
                field: field(*i),
                msg: format!(
                    "container {} is still being created; join its namespaces once it is",
                    c.id
                ),
            });
        }
        joined.push((
            *t,
            PathBuf::from(format!("/proc/{}/ns/{}", c.guest_pid, ns_name(*t))),
        ));
    }
    if !joined
        .iter()
        .any(|(t, _)| *t == LinuxNamespaceType::Network)
    {
        return Err(RuntimeError::Unsupported {
            field: "linux.namespaces".into(),
            msg: format!(
                "joins namespaces of container {owner_id}, which puts it in that container's \
                 VM, but asks for a network namespace of its own; in one VM it must share \
                 {owner_id}'s network too (docker --network container:{owner_id})"
            ),
        });
    }
    let owner = if first.id == owner_id {
        first.clone()
    } else {
        live.iter()
            .find(|c| c.id == owner_id)
            .cloned()
            .ok_or_else(|| RuntimeError::Unsupported {
                field: "linux.namespaces".into(),
                msg: format!(
                    "the VM of container {owner_id}, which {} runs in, is gone",
                    first.id
                ),
            })?
    };
    if owner.status == Status::Paused {
        return Err(RuntimeError::Unsupported {
            field: "linux.namespaces".into(),
            msg: format!(
                "container {owner_id}, whose VM this container would join, is paused; resume it first"
            ),
        });
    }
    Ok(Some(Join {
        owner,
        namespaces: joined,
    }))
}

impl Join {
    /// Refuses a container whose memory limit does not fit in the VM it joins: a microVM's
    /// memory is fixed when it boots.
    pub fn check_fits(&self, id: &str, spec: &Spec) -> Result<(), RuntimeError> {
        let limit = spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref())
            .and_then(|r| r.memory().as_ref())
            .and_then(|m| m.limit())
            .filter(|l| *l > 0);
        let (Some(limit), vm) = (limit, self.owner.vm_memory_mib) else {
            return Ok(());
        };
        let needs = crate::spec::memory_mib_for_limit(limit).unwrap_or(0);
        if vm > 0 && needs > vm {
            return Err(RuntimeError::Unsupported {
                field: "linux.resources.memory.limit".into(),
                msg: format!(
                    "container {id} asks for {} MiB of memory, which with the guest's own {} MiB \
                     does not fit in the VM of container {} it joins: that VM has {vm} MiB \
                     (sized when {} started); give {id} a limit of at most {} MiB, or start {} \
                     with more memory",
                    (limit as u64).div_ceil(1 << 20),
                    crate::spec::GUEST_OVERHEAD_MIB,
                    self.owner.id,
                    self.owner.id,
                    vm.saturating_sub(crate::spec::GUEST_OVERHEAD_MIB),
                    self.owner.id
                ),
            });
        }
        Ok(())
    }

    /// The guest path of the joined namespace of type `t`, if it is joined.
    pub fn guest_path(&self, t: LinuxNamespaceType) -> Option<&Path> {
        self.namespaces
            .iter()
            .find(|(j, _)| *j == t)
            .map(|(_, p)| p.as_path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_paths_name_their_pid() {
        assert_eq!(proc_pid(Path::new("/proc/42/ns/net")), Some(42));
        assert_eq!(proc_pid(Path::new("/proc/self/ns/net")), None);
        assert_eq!(proc_pid(Path::new("/run/netns/x")), None);
        assert_eq!(proc_pid(Path::new("/proc/42/status")), None);
    }

    fn spec(namespaces: &str) -> Spec {
        serde_json::from_str(&format!(
            r#"{{"ociVersion":"1.0.2","root":{{"path":"rootfs"}},"process":{{"args":["sh"],"cwd":"/","user":{{"uid":0,"gid":0}}}},
            "linux":{{"namespaces":[{namespaces}]}}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn no_rootcell_container_means_no_join_or_a_refusal() {
        let root = tempfile::tempdir().unwrap();
        // No paths: a VM of its own.
        let s = spec(r#"{"type":"network"},{"type":"mount"}"#);
        assert!(resolve(root.path(), &s).unwrap().is_none());
        // A network path of no rootcell container: the network module decides.
        let s = spec(r#"{"type":"network","path":"/proc/1/ns/net"},{"type":"mount"}"#);
        assert!(resolve(root.path(), &s).unwrap().is_none());
        // Any other namespace of a process that is not a rootcell container: refused.
        let s = spec(r#"{"type":"network"},{"type":"ipc","path":"/proc/1/ns/ipc"}"#);
        let e = resolve(root.path(), &s).unwrap_err().to_string();
        assert!(
            e.contains("linux.namespaces[1].path")
                && e.contains("not one of a running rootcell container"),
            "{e}"
        );
    }
}
