//! Where a container's files live: the state dir under `--root` (any length) and a short run dir
//! for unix sockets and the share dir, so socket paths stay under the 108-byte `sun_path` limit
//! even with Docker's long root and 64-hex ids.

use std::path::{Path, PathBuf};

/// Parent of every per-container run dir.
pub const RUN_BASE: &str = "/run/rootcell/r";
/// Longest unix socket path we create (sun_path is 108 bytes including the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// File names inside a run dir.
pub const CONTROL_SOCKET: &str = "ctl.sock";
/// vhost-user socket of the vsock backend (QEMU connects to it).
pub const VSOCK_VHOST_SOCKET: &str = "vsock.vu";
/// vhost-user socket of the fs backend.
pub const FS_VHOST_SOCKET: &str = "fs.vu";
/// Hybrid vsock unix socket (host side of guest ports).
pub const VSOCK_UDS: &str = "vsock.sock";
/// Empty directory in the run dir on which a jailed VMM mounts its root (in its own mount
/// namespace; on the host it stays empty).
pub const VMM_ROOT_DIR: &str = "vmm-root";

/// File name (in the run dir) of the host end of the guest's DNS relay: the hybrid vsock
/// device connects guest connections to host port P to `<VSOCK_UDS>_<P>`.
pub fn dns_relay_socket() -> String {
    format!("{VSOCK_UDS}_{}", rootcell_protocol::DNS_RELAY_PORT)
}

/// File name (in the run dir) of the host end of the guest's DNS-over-TCP relay.
pub fn dns_tcp_relay_socket() -> String {
    format!("{VSOCK_UDS}_{}", rootcell_protocol::DNS_TCP_RELAY_PORT)
}
/// Directory exported to the guest over virtio-fs.
pub const SHARE_DIR: &str = "share";

/// State dir of container `id` under `root`.
pub fn state_dir(root: &Path, id: &str) -> PathBuf {
    root.join(id)
}

/// The state file of container `id`.
pub fn state_file(root: &Path, id: &str) -> PathBuf {
    state_dir(root, id).join("state.json")
}

/// The run dir of container `id` under `root`: a 16-hex FNV-1a hash of both, so two roots with
/// the same id do not collide.
pub fn run_dir(root: &Path, id: &str) -> PathBuf {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in root
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .chain(b"\0")
        .chain(id.as_bytes())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    Path::new(RUN_BASE).join(format!("{h:016x}"))
}

/// Makes `p` absolute against the current directory, without resolving symlinks.
pub fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|c| c.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths_fit_with_docker_root_and_long_id() {
        let root = Path::new("/run/docker/runtime-runc/moby");
        let id = "0123456789abcdef".repeat(4);
        let dir = run_dir(root, &id);
        for s in [
            CONTROL_SOCKET,
            VSOCK_VHOST_SOCKET,
            FS_VHOST_SOCKET,
            VSOCK_UDS,
        ] {
            let p = dir.join(s);
            assert!(p.as_os_str().len() <= 48, "{}", p.display());
            assert!(p.as_os_str().len() <= MAX_SOCKET_PATH);
        }
        // The state dir may be long; it holds no sockets.
        assert!(state_dir(root, &id).as_os_str().len() > 64);
    }

    #[test]
    fn run_dir_depends_on_root_and_id() {
        let a = run_dir(Path::new("/r1"), "c");
        assert_eq!(a, run_dir(Path::new("/r1"), "c"));
        assert_ne!(a, run_dir(Path::new("/r2"), "c"));
        assert_ne!(a, run_dir(Path::new("/r1"), "d"));
    }
}
