//! The container's limits inside the guest: `linux.resources` memory and pids, on the
//! container's cgroup (v2), at creation and on `update`. CPU limits are the VM's vCPU count and the host cgroup's quota (set
//! by the runtime); device, block I/O and hugepage rules have nothing to act on in the guest.

use crate::alog;
use oci_spec::runtime::LinuxResources;
use std::path::Path;

/// Guest memory kept out of the container's reach, for the kernel and the agent.
pub const AGENT_RESERVE: u64 = 32 << 20;

/// Applies the memory and pids limits of `res` to `cgroup`.
///
/// The memory limit is the one asked for, but never more than the guest's RAM minus
/// [`AGENT_RESERVE`]: a container that exhausts memory meets its own cgroup's OOM killer, and the
/// agent (PID 1, which must not fail an allocation) keeps room to work and report it.
pub fn apply(cgroup: &Path, res: Option<&LinuxResources>) {
    let asked = res
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.limit())
        .filter(|l| *l > 0)
        .map(|l| l as u64);
    if let Some(max) = memory_max(asked, mem_total()) {
        write(cgroup, "memory.max", max);
    }
    let pids = res.and_then(|r| r.pids().as_ref()).map(|p| p.limit());
    if let Some(limit) = pids.filter(|l| *l > 0) {
        write(cgroup, "pids.max", limit as u64);
    }
}

/// Changes the limits of a running container (`update`): `memory` must fit in the VM (its RAM
/// is fixed), a negative `pids` removes the process limit.
pub fn update(cgroup: &Path, memory: Option<u64>, pids: Option<i64>) -> Result<(), String> {
    if let Some(asked) = memory {
        let room = memory_max(None, mem_total()).unwrap_or(u64::MAX);
        if asked > room {
            return Err(format!(
                "cannot raise the memory limit to {} MiB: this VM has room for {} MiB; recreate the container with the new --memory",
                asked >> 20,
                room >> 20
            ));
        }
        set(cgroup, "memory.max", &asked.to_string())?;
    }
    match pids {
        Some(p) if p < 0 => set(cgroup, "pids.max", "max")?,
        Some(p) => set(cgroup, "pids.max", &p.to_string())?,
        None => {}
    }
    Ok(())
}

/// The container's usage and limits, read from its cgroup.
pub fn stats(cgroup: &Path) -> Result<rootcell_protocol::ContainerStats, String> {
    let read = |file: &str| {
        std::fs::read_to_string(cgroup.join(file))
            .map_err(|e| format!("cannot read the container's {file}: {e}"))
    };
    let cpu = read("cpu.stat").unwrap_or_default();
    Ok(stats_of(
        &read("memory.current")?,
        &read("memory.max")?,
        &cpu,
        &read("pids.current").unwrap_or_default(),
        &read("pids.max").unwrap_or_default(),
    ))
}

/// [`stats`] from the files' contents (`max` is no limit; a missing value counts 0).
fn stats_of(
    memory_current: &str,
    memory_max: &str,
    cpu_stat: &str,
    pids_current: &str,
    pids_max: &str,
) -> rootcell_protocol::ContainerStats {
    let num = |s: &str| s.trim().parse::<u64>().ok();
    let cpu = |key: &str| {
        cpu_stat
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0)
    };
    rootcell_protocol::ContainerStats {
        memory_usage: num(memory_current).unwrap_or(0),
        memory_limit: num(memory_max),
        cpu_usage_usec: cpu("usage_usec"),
        cpu_user_usec: cpu("user_usec"),
        cpu_system_usec: cpu("system_usec"),
        pids_current: num(pids_current).unwrap_or(0),
        pids_limit: num(pids_max),
    }
}

fn set(cgroup: &Path, file: &str, value: &str) -> Result<(), String> {
    std::fs::write(cgroup.join(file), value)
        .map_err(|e| format!("cannot set the container's {file} to {value}: {e}"))
}

/// The container's `memory.max`: what was asked, capped to leave the agent its reserve.
fn memory_max(asked: Option<u64>, total: Option<u64>) -> Option<u64> {
    let cap = total.map(|t| t.saturating_sub(AGENT_RESERVE).max(AGENT_RESERVE));
    match (asked, cap) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    }
}

/// The guest's RAM in bytes (`MemTotal`).
fn mem_total() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
    kib.trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()
        .map(|k| k << 10)
}

fn write(cgroup: &Path, file: &str, value: u64) {
    if let Err(e) = set(cgroup, file, &value.to_string()) {
        alog!("{e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_are_read_from_the_cgroup_v2_files() {
        let s = stats_of(
            "1048576\n",
            "67108864\n",
            "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 0\n",
            "2\n",
            "max\n",
        );
        assert_eq!(s.memory_usage, 1 << 20);
        assert_eq!(s.memory_limit, Some(64 << 20));
        assert_eq!(
            (s.cpu_usage_usec, s.cpu_user_usec, s.cpu_system_usec),
            (1500, 1000, 500)
        );
        assert_eq!((s.pids_current, s.pids_limit), (2, None));
        // No cpu or pids controller: zeros, not an error.
        let s = stats_of("5", "max", "", "", "");
        assert_eq!(
            (s.memory_limit, s.cpu_usage_usec, s.pids_current),
            (None, 0, 0)
        );
    }

    #[test]
    fn memory_max_is_the_request_capped_below_the_guest_ram() {
        const MIB: u64 = 1 << 20;
        assert_eq!(
            memory_max(Some(128 * MIB), Some(170 * MIB)),
            Some(128 * MIB)
        );
        assert_eq!(
            memory_max(Some(300 * MIB), Some(170 * MIB)),
            Some(138 * MIB)
        );
        assert_eq!(memory_max(None, Some(480 * MIB)), Some(448 * MIB));
        assert_eq!(memory_max(Some(64 * MIB), None), Some(64 * MIB));
        assert_eq!(memory_max(None, Some(16 * MIB)), Some(32 * MIB));
        assert_eq!(memory_max(None, None), None);
    }
}
