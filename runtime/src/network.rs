//! The container's network namespace on the host: which one the spec asks for, refusing what a
//! VM cannot have (the host's stack, or one shared with a process that is not a rootcell
//! container: joining one that is is [`crate::join`]'s), and mirroring its
//! interfaces into the VM (tap devices + tc redirect, see `rootcell-net`).

use crate::error::RuntimeError;
use anyhow::{Context, Result};
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The network namespace a container's VM devices live in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Namespace {
    /// A fresh namespace made for the container (Docker fills it from its prestart hook).
    Fresh,
    /// An existing namespace prepared by the caller (CNI, `ip netns`).
    Path(PathBuf),
}

/// What config.json asks for, checked before anything is built: a network namespace is
/// required (a VM cannot share the host's network stack), and a given path must exist and be
/// neither the host's namespace nor one another process already lives in.
pub fn check(spec: &Spec) -> Result<Namespace, RuntimeError> {
    let namespaces = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default();
    let Some((i, ns)) = namespaces
        .iter()
        .enumerate()
        .find(|(_, n)| n.typ() == LinuxNamespaceType::Network)
    else {
        return Err(RuntimeError::Unsupported {
            field: "linux.namespaces".into(),
            msg: "has no network namespace, which means sharing the host's network stack; a \
                  VM has its own kernel and cannot share it (docker --network host is not \
                  supported either); add {\"type\": \"network\"}"
                .into(),
        });
    };
    let Some(path) = ns.path() else {
        return Ok(Namespace::Fresh);
    };
    let field = format!("linux.namespaces[{i}].path");
    let unsupported = |msg: String| RuntimeError::Unsupported {
        field: field.clone(),
        msg,
    };
    let target = std::fs::metadata(path).map_err(|e| {
        unsupported(format!(
            "network namespace {} cannot be opened ({e}); create it first (ip netns add) or remove the path for a fresh one",
            path.display()
        ))
    })?;
    let id = (target.dev(), target.ino());
    // The caller's namespace, init's, and the kernel threads' (kthreadd is pid 2) all count
    // as the host's: on some hosts init itself runs in a namespace of its own.
    let host = ["/proc/self/ns/net", "/proc/1/ns/net", "/proc/2/ns/net"];
    if host.iter().any(|p| ns_id(Path::new(p)) == Some(id)) {
        return Err(unsupported(format!(
            "{} is the host's network namespace (docker --network host); a VM has its own \
             kernel and cannot share the host's network stack; use a bridge network or -p",
            path.display()
        )));
    }
    if let Some((pid, comm)) = other_user(id) {
        return Err(unsupported(format!(
            "network namespace {} is already used by process {pid} ({comm}), which is not a \
             rootcell container (a runc container, say); a VM has its own kernel and can share \
             a network stack only with another rootcell container, in whose VM it then runs; \
             give it a network of its own",
            path.display()
        )));
    }
    Ok(Namespace::Path(path.clone()))
}

/// Device and inode of a namespace file, which identify the namespace.
fn ns_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// A process other than us living in the namespace `id`, with its command name.
fn other_user(id: (u64, u64)) -> Option<(i32, String)> {
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        if pid == me || ns_id(&e.path().join("ns/net")) != Some(id) {
            return None;
        }
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        Some((pid, comm.trim().to_string()))
    })
}

/// Moves the calling (still single-threaded) process into the container's namespace.
pub fn enter(ns: &Namespace) -> Result<()> {
    match ns {
        Namespace::Path(p) => {
            let f = std::fs::File::open(p)
                .with_context(|| format!("cannot open network namespace {}", p.display()))?;
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("cannot join network namespace {}", p.display()))
        }
        Namespace::Fresh => nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .context("cannot create a network namespace"),
    }
}

/// The interfaces of the current namespace mirrored to taps for the VM, with the description
/// the agent rebuilds them from; `None` when there is nothing but loopback (`--network none`).
pub fn mirror() -> Result<Option<(rootcell_net::Mirror, rootcell_protocol::net::NetworkConfig)>> {
    mirror_onto(&[])
}

/// [`mirror`] onto taps that already exist in the namespace (a pooled VM's, see
/// [`rootcell_net::mirror_onto`]), one per interface; more interfaces than taps is an error.
pub fn mirror_onto(
    spares: &[String],
) -> Result<Option<(rootcell_net::Mirror, rootcell_protocol::net::NetworkConfig)>> {
    let config = rootcell_net::scan().context("cannot read the container's network")?;
    if !spares.is_empty() && config.interfaces.len() > spares.len() {
        anyhow::bail!(
            "the container has {} network interfaces and the VM {} cards",
            config.interfaces.len(),
            spares.len()
        );
    }
    if config.interfaces.is_empty() {
        return Ok(None);
    }
    for i in &config.interfaces {
        tracing::info!(interface = %i.name, mac = %i.mac, mtu = i.mtu, addresses = ?i.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(), "mirroring into the VM");
    }
    let mirror = rootcell_net::mirror_onto(&config, spares)
        .context("cannot mirror the container's network into the VM")?;
    Ok(Some((mirror, config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(namespaces: serde_json::Value) -> Spec {
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": { "namespaces": namespaces }
        }))
        .unwrap()
    }

    #[test]
    fn a_fresh_namespace_is_fine_and_none_is_refused() {
        assert_eq!(
            check(&spec(serde_json::json!([{"type": "network"}]))).unwrap(),
            Namespace::Fresh
        );
        let e = check(&spec(serde_json::json!([{"type": "pid"}])))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("linux.namespaces") && e.contains("host's network"),
            "{e}"
        );
    }

    #[test]
    fn host_missing_and_shared_namespaces_are_refused() {
        let e = check(&spec(
            serde_json::json!([{"type": "network", "path": "/proc/2/ns/net"}]),
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("linux.namespaces[0].path") && e.contains("host's network namespace"),
            "{e}"
        );
        let e = check(&spec(
            serde_json::json!([{"type": "network", "path": "/run/netns/rootcell-nope"}]),
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("cannot be opened"), "{e}");
        // A child of ours in a namespace of its own stands for another container.
        let mut child = std::process::Command::new("unshare")
            .args(["--net", "sleep", "30"])
            .spawn()
            .unwrap();
        let path = format!("/proc/{}/ns/net", child.id());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut e = String::new();
        while std::time::Instant::now() < deadline {
            match check(&spec(
                serde_json::json!([{"type": "network", "path": path}]),
            )) {
                Err(err) if err.to_string().contains("already used by process") => {
                    e = err.to_string();
                    break;
                }
                _ => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(e.contains("not a rootcell container"), "{e}");
    }
}
