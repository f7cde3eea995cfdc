//! `update --resources FILE|- ID` (what `docker update` reaches through the shim): CPU limits go
//! on the host cgroup that holds the VM; what a running VM cannot change (its memory size, its
//! vCPU count) is kept, and a memory change is refused with a message saying so.

use super::Global;
use crate::state::Status;
use crate::{cgroup, spec};
use anyhow::{bail, Context, Result};
use oci_spec::runtime::LinuxResources;
use std::io::Read;

/// `update`: applies `resources` (a file, or `-` for stdin) to container `id`.
pub fn update(g: &Global, id: &str, resources: Option<&str>) -> Result<()> {
    let st = g.load(id)?.refreshed();
    if !matches!(
        st.status,
        Status::Created | Status::Running | Status::Paused
    ) {
        bail!("cannot update container {id}: container not running");
    }
    let text = match resources {
        Some("-") | None => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("read resources from stdin")?;
            s
        }
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("read {path}"))?,
    };
    let res: LinuxResources = serde_json::from_str(&text).context("parse resources JSON")?;
    let boot = spec::load(&st.bundle)
        .map(|b| spec::vm_resources(&b.spec).0)
        .context("read the container's config.json")?;
    if let Some(mib) = requested_memory_mib(&res) {
        if mib != boot {
            bail!("cannot change the memory of a running VM ({boot} MiB, asked {mib} MiB): recreate the container with the new --memory");
        }
    }
    let Some(cpu) = res.cpu().as_ref() else {
        return Ok(());
    };
    let Some(path) = st.cgroups_path.as_deref() else {
        tracing::warn!("container {id} has no cgroupsPath: CPU limits not applied on the host");
        return Ok(());
    };
    let errors = cgroup::set_cpu(path, cpu.quota(), cpu.period(), cpu.shares());
    if !errors.is_empty() {
        bail!("update CPU limits of {id}: {}", errors.join("; "));
    }
    Ok(())
}

/// The guest memory (MiB) a memory limit in `res` would give, as `create` sizes the VM.
fn requested_memory_mib(res: &LinuxResources) -> Option<u64> {
    spec::memory_mib_for_limit(res.memory().as_ref()?.limit()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_limit_in_vm_sizes() {
        let r: LinuxResources = serde_json::from_str(r#"{"memory":{"limit":314572800}}"#).unwrap();
        assert_eq!(
            requested_memory_mib(&r),
            Some(300 + spec::GUEST_OVERHEAD_MIB)
        );
        let r: LinuxResources =
            serde_json::from_str(r#"{"memory":{"limit":0},"cpu":{"quota":50000}}"#).unwrap();
        assert_eq!(requested_memory_mib(&r), None);
        let r: LinuxResources = serde_json::from_str(r#"{"cpu":{"shares":512}}"#).unwrap();
        assert_eq!(requested_memory_mib(&r), None);
    }
}
