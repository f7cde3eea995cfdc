//! A container's side of the pool: ask the server for a VM that fits, claim it from its
//! holder. Anything that goes wrong means a cold boot, said in the log, never a failed create.

use super::{BootKey, Handover, HolderReply, HolderRequest, ServerReply, ServerRequest, Shape};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

/// Environment variable that turns the pool off for this call (`0`/`off`): always boot.
pub const USE_ENV: &str = "ROOTCELL_POOL";

/// A VM claimed from the pool.
#[derive(Debug)]
pub struct Claimed {
    /// What the holder handed over.
    pub handover: Handover,
    /// The connection to the holder: pause requests go there, and closing it ends the VM.
    pub conn: UnixStream,
    /// Its path, for errors.
    pub socket: PathBuf,
}

/// Claims a ready VM of a shape that fits `need` for the calling process, the sandbox of the
/// container whose state dir is `owner`, or says in the log why a VM will be booted instead.
pub fn take(need: Shape, owner: &std::path::Path) -> Option<Claimed> {
    if std::env::var(USE_ENV).is_ok_and(|v| matches!(v.trim(), "0" | "off" | "false")) {
        tracing::info!("booting a VM: the pool is turned off ({USE_ENV})");
        return None;
    }
    let sock = super::dir().join(super::SERVER_SOCKET);
    if std::fs::symlink_metadata(&sock).is_err() {
        tracing::info!(
            "booting a VM: no VM pool is running ({} is absent)",
            sock.display()
        );
        return None;
    }
    match try_take(need, &sock, owner) {
        Ok(Some(c)) => {
            let waited = super::now_secs().saturating_sub(c.handover.ready_since);
            tracing::info!(
                vm = c.handover.name,
                shape = %c.handover.shape,
                ready_for_s = waited,
                "took VM {} from the pool (no boot)",
                c.handover.name
            );
            Some(c)
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!("booting a VM: cannot take one from the pool: {e:#}");
            None
        }
    }
}

fn try_take(
    need: Shape,
    sock: &std::path::Path,
    owner: &std::path::Path,
) -> anyhow::Result<Option<Claimed>> {
    let (key, _) = BootKey::current()?;
    let mut s = super::connect(sock, crate::timeouts::QUICK)?;
    super::send(&mut s, sock, &ServerRequest::Take { key, need })?;
    let reply: ServerReply = super::recv(&mut s, sock)?
        .ok_or_else(|| anyhow::anyhow!("the pool server closed the connection"))?;
    let (name, socket) = match reply {
        ServerReply::Vm { name, socket } => (name, socket),
        ServerReply::None { reason } => {
            tracing::info!("booting a VM: {reason}");
            return Ok(None);
        }
        ServerReply::Status(_) => anyhow::bail!("the pool server answered with its status"),
    };
    let mut conn = super::connect(&socket, crate::timeouts::QUICK)
        .map_err(|e| anyhow::anyhow!("pool VM {name}: {e}"))?;
    let pid = std::process::id() as i32;
    let owner = Some(owner.to_path_buf());
    super::send(&mut conn, &socket, &HolderRequest::Claim { pid, owner })?;
    match super::recv::<HolderReply>(&mut conn, &socket)? {
        Some(HolderReply::Claimed(handover)) => {
            let _ = conn.set_read_timeout(Some(crate::timeouts::QUICK));
            Ok(Some(Claimed {
                handover,
                conn,
                socket,
            }))
        }
        Some(HolderReply::Error(e)) => anyhow::bail!("pool VM {name} refused the claim: {e}"),
        Some(HolderReply::Ok) | None => {
            anyhow::bail!("pool VM {name} ended before it could be claimed")
        }
    }
}

/// Asks the server for its status.
pub fn status() -> anyhow::Result<super::Status> {
    let sock = super::dir().join(super::SERVER_SOCKET);
    if std::fs::symlink_metadata(&sock).is_err() {
        anyhow::bail!(
            "no VM pool is running: {} does not exist (start one with rootcell pool serve)",
            sock.display()
        );
    }
    let mut s = super::connect(&sock, crate::timeouts::QUICK)?;
    super::send(&mut s, &sock, &ServerRequest::Status)?;
    match super::recv(&mut s, &sock)? {
        Some(ServerReply::Status(st)) => Ok(st),
        other => anyhow::bail!("unexpected answer from the pool server: {other:?}"),
    }
}
