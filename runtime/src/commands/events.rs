//! `events --stats ID`: one sample of the container's resource usage, in runc's `events`
//! format (what `ctr task metrics` shows through the shim). The numbers are the container's own,
//! from its cgroup in the guest, not the VM's host cgroup.

use crate::commands::Global;
use crate::control::{self, ControlRequest, ControlResponse};
use crate::error::RuntimeError;
use crate::state::Status;
use anyhow::{bail, Result};
use rootcell_protocol::ContainerStats;

/// `events --stats ID`: the JSON line.
pub fn stats(g: &Global, id: &str) -> Result<String> {
    let st = g.load(id)?.refreshed();
    if st.status == Status::Stopped {
        return Err(RuntimeError::NotRunning(id.to_string()).into());
    }
    match control::call(
        &st.control_socket(),
        &ControlRequest::Stats,
        crate::timeouts::CLI_UPDATE,
    )? {
        ControlResponse::Stats { stats } => Ok(to_json(id, &stats).to_string() + "\n"),
        ControlResponse::Error { message } => bail!("cannot read the usage of {id}: {message}"),
        other => bail!("cannot read the usage of {id}: unexpected answer {other:?}"),
    }
}

/// runc's `events --stats` shape: CPU in nanoseconds; an unlimited memory limit is the largest
/// u64 and an unlimited process limit 0, as runc reports them.
fn to_json(id: &str, s: &ContainerStats) -> serde_json::Value {
    serde_json::json!({
        "type": "stats",
        "id": id,
        "data": {
            "cpu": {"usage": {
                "total": s.cpu_usage_usec.saturating_mul(1000),
                "user": s.cpu_user_usec.saturating_mul(1000),
                "kernel": s.cpu_system_usec.saturating_mul(1000),
            }},
            "memory": {"usage": {
                "usage": s.memory_usage,
                "limit": s.memory_limit.unwrap_or(u64::MAX),
            }},
            "pids": {"current": s.pids_current, "limit": s.pids_limit.unwrap_or(0)},
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_are_printed_in_runcs_events_shape() {
        let s = ContainerStats {
            memory_usage: 4096,
            memory_limit: Some(1 << 26),
            cpu_usage_usec: 3,
            cpu_user_usec: 2,
            cpu_system_usec: 1,
            pids_current: 2,
            pids_limit: None,
        };
        let v = to_json("c1", &s);
        assert_eq!(v["type"], "stats");
        assert_eq!(v["id"], "c1");
        assert_eq!(v["data"]["cpu"]["usage"]["total"], 3000);
        assert_eq!(v["data"]["memory"]["usage"]["limit"], 1u64 << 26);
        assert_eq!(v["data"]["pids"]["limit"], 0);
        let unlimited = to_json("c1", &ContainerStats::default());
        assert_eq!(unlimited["data"]["memory"]["usage"]["limit"], u64::MAX);
    }
}
