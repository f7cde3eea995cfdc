//! `update --resources FILE|- ID` (what `docker update` reaches through the shim): CPU limits go
//! on the host cgroup that holds the VM; memory and pids limits on the container's cgroup in the
//! guest, the memory limit only within the VM's fixed RAM (beyond it: an error saying so). The
//! vCPU count stays.

use super::Global;
use crate::cgroup;
use crate::control::{self, ControlRequest, ControlResponse};
use anyhow::{bail, Context, Result};
use oci_spec::runtime::LinuxResources;
use std::io::Read;

/// `update`: applies `resources` (a file, or `-` for stdin) to container `id`.
pub fn update(g: &Global, id: &str, resources: Option<&str>) -> Result<()> {
    let st = g.load(id)?.refreshed();
    // Memory and pids limits are set by the agent, which a paused VM cannot run.
    st.status
        .check(crate::state::Action::Update)
        .with_context(|| format!("cannot update container {id}"))?;
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
    // Memory and pids limits live in the guest (the container's cgroup there); the VM's own RAM
    // is fixed, so the memory limit can move only within it.
    let (memory, pids) = guest_limits(&res);
    if memory.is_some() || pids.is_some() {
        let req = ControlRequest::Update { memory, pids };
        match control::call(&st.control_socket(), &req, crate::timeouts::CLI_UPDATE)? {
            ControlResponse::Error { message } => bail!("cannot update container {id}: {message}"),
            ControlResponse::Refused { error } => {
                return Err(error).with_context(|| format!("cannot update container {id}"))
            }
            _ => {}
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

/// The memory limit (bytes) and process limit of `res` that change something: a zero or absent
/// value leaves the current one (Docker sends the whole set on every update).
fn guest_limits(res: &LinuxResources) -> (Option<u64>, Option<i64>) {
    let memory = res
        .memory()
        .as_ref()
        .and_then(|m| m.limit())
        .filter(|l| *l > 0)
        .map(|l| l as u64);
    let pids = res.pids().as_ref().map(|p| p.limit()).filter(|l| *l != 0);
    (memory, pids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_limits_that_change_something_reach_the_guest() {
        let r: LinuxResources =
            serde_json::from_str(r#"{"memory":{"limit":314572800},"pids":{"limit":20}}"#).unwrap();
        assert_eq!(guest_limits(&r), (Some(314572800), Some(20)));
        let r: LinuxResources = serde_json::from_str(
            r#"{"memory":{"limit":0},"cpu":{"quota":50000},"pids":{"limit":0}}"#,
        )
        .unwrap();
        assert_eq!(guest_limits(&r), (None, None));
        let r: LinuxResources = serde_json::from_str(r#"{"pids":{"limit":-1}}"#).unwrap();
        assert_eq!(guest_limits(&r), (None, Some(-1)));
    }
}
