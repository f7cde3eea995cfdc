//! Keeps the guest's wall clock on the host's. The guest has no clock of its own worth reading
//! (it boots at 1970) and an emulated CPU's clock falls behind under load, so the sandbox sets
//! it after the handshake, before start and every exec, after a resume, and every
//! [`SYNC_INTERVAL`] while the container lives.

use crate::agent::AgentClient;
use anyhow::{anyhow, bail, Result};
use rootcell_protocol::{Request, Response};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How often a running container's clock is set again. Far below the 1 s a user would notice
/// (`make`'s clock-skew check, file times on bind mounts), and cheap: one small request.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(2);
/// Bound on one clock request (the agent answers at once unless the guest is gone or paused).
const REQUEST_TIMEOUT: Duration = crate::timeouts::CLOCK;

/// The host's `CLOCK_REALTIME` in nanoseconds since the epoch.
pub fn host_now_nanos() -> Result<u64> {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| anyhow!("the host clock reads before 1970 ({e}); fix the host's time"))?;
    u64::try_from(d.as_nanos()).map_err(|_| anyhow!("the host clock reads beyond the year 2554"))
}

/// Sets the guest's clock to the host's now.
pub fn sync(agent: &AgentClient) -> Result<()> {
    let unix_nanos = host_now_nanos()?;
    match agent.request(Request::SetClock { unix_nanos }, REQUEST_TIMEOUT)? {
        Response::Ok => Ok(()),
        Response::Error { message, .. } => bail!("{message}"),
        other => bail!("unexpected answer to SetClock: {other:?}"),
    }
}
