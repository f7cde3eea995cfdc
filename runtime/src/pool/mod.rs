//! A pool of VMs booted ahead of need, so `create` does not wait for a boot.
//!
//! `rootcell pool serve` ([`serve`]) keeps a number of VMs of each configured shape booted to
//! "agent ready". Each runs in a process of its own, a holder ([`holder`]): it owns the VM,
//! its device back ends, a share with nothing in it yet and a tap in a network namespace of its
//! own, and waits to be claimed. A container's sandbox ([`claim`]) asks the server for a VM
//! whose shape fits, then claims it from its holder directly: the holder moves into the
//! container's cgroup, the tap into the container's network namespace, the container's rootfs
//! and bind sources are attached to the share, and the VM is the container's until it ends;
//! a VM never serves a second container. When no pool runs or none fits, `create` boots cold.
//!
//! The server, holders and claimants speak JSON lines over unix sockets in [`dir`], a root-only
//! directory (anything else is refused: a socket there hands out VMs).

pub mod claim;
pub mod holder;
pub mod serve;

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default directory of the pool's sockets and its VMs' run dirs.
pub const DEFAULT_DIR: &str = "/run/rootcell/pool";
/// Environment variable that overrides [`DEFAULT_DIR`] (for the server and for claimants).
pub const DIR_ENV: &str = "ROOTCELL_POOL_DIR";
/// The server's socket in [`dir`].
pub const SERVER_SOCKET: &str = "pool.sock";
/// A holder's claim socket in its run dir.
pub const CLAIM_SOCKET: &str = "claim.sock";
/// Name of a pooled VM's tap, in the holder's namespace and then in the container's.
pub const TAP_NAME: &str = "rctap0";
/// Nice value of an unclaimed pool VM (holder and hypervisor, every thread): a VM booting to
/// refill the pool yields the CPU to running containers, the one just claimed among them, and
/// still boots on a busy host (within [`POOL_BOOT_TIMEOUT`]). A claimed VM runs at nice 0.
pub const POOL_NICE: i32 = 10;
/// The bound on a pool VM's boot unless `ROOTCELL_BOOT_TIMEOUT` says otherwise: at nice 10 on a
/// host with 8 runnable tasks on 2 cores, the ~1.5 CPU-seconds of a TCG boot take about a
/// minute, the bound of a container's own boot.
pub const POOL_BOOT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);
/// MTU of a pooled VM's card: the guest's virtio-net takes it as its largest MTU, so it must
/// cover the container interface's (Docker's default is 1500; jumbo frames fit too).
pub const CARD_MTU: u32 = 9000;

/// The pool's directory: `$ROOTCELL_POOL_DIR`, else [`DEFAULT_DIR`].
pub fn dir() -> PathBuf {
    std::env::var_os(DIR_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR))
}

/// The `"pool"` object of /etc/rootcell/config.json.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// The shapes to keep ready and how many of each.
    #[serde(default)]
    pub vms: Vec<ShapeConfig>,
    /// How many VMs may boot at once (default 1: on a small host, boots in parallel only make
    /// every one of them late).
    #[serde(default)]
    pub parallel_boots: Option<usize>,
}

/// One shape of VM the pool keeps ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapeConfig {
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    #[serde(default = "one")]
    pub vcpus: u32,
    /// How many to keep booted and unclaimed.
    #[serde(default = "one_usize")]
    pub count: usize,
}

fn one() -> u32 {
    1
}

fn one_usize() -> usize {
    1
}

/// A VM's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Shape {
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
}

impl Shape {
    /// Whether a VM of this shape serves a container that needs `need`: as many vCPUs (the
    /// container sees them), and at least as much memory.
    pub fn fits(&self, need: &Shape) -> bool {
        self.vcpus == need.vcpus && self.memory_mib >= need.memory_mib
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} MiB, {} vCPU", self.memory_mib, self.vcpus)
    }
}

/// What else a pooled VM must share with the cold boot it replaces: the backend, the guest
/// images (a rebuilt initramfs makes older VMs stale) and the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootKey {
    /// `qemu` or `builtin`.
    pub backend: String,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: PathBuf,
    /// Size and modification time (ns) of each image.
    pub stamps: Vec<(u64, i128)>,
    /// Kernel command line.
    pub cmdline: String,
}

impl BootKey {
    /// The key of a VM this process would boot now (its environment and config file).
    pub fn current() -> anyhow::Result<(BootKey, crate::hypervisor::Opened)> {
        let opened = crate::hypervisor::open()?;
        let stamp = |p: &Path| {
            std::fs::metadata(p)
                .map(|m| {
                    let ns = i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec());
                    (m.len(), ns)
                })
                .unwrap_or((0, 0))
        };
        let key = BootKey {
            backend: opened.selection.backend.as_str().to_string(),
            kernel: opened.images.kernel.clone(),
            initrd: opened.images.initrd.clone(),
            stamps: vec![stamp(&opened.images.kernel), stamp(&opened.images.initrd)],
            cmdline: crate::sandbox::kernel_cmdline(),
        };
        Ok((key, opened))
    }
}

/// Requests to the server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerRequest {
    /// A ready VM booted with `key` whose shape fits `need`.
    Take {
        /// How the VM must have been booted.
        key: BootKey,
        /// What the container needs.
        need: Shape,
    },
    /// The pool's counts.
    Status,
}

/// The server's answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerReply {
    /// A VM handed out: claim it at `socket` now (it is no longer offered to anyone else).
    Vm {
        /// The VM's name in the pool's log.
        name: String,
        /// Its holder's claim socket.
        socket: PathBuf,
    },
    /// None to hand out, and why.
    None {
        /// Why (no such shape, none ready yet, booted differently).
        reason: String,
    },
    /// The pool's counts.
    Status(Status),
}

/// What `rootcell pool status` prints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Pid of `rootcell pool serve`.
    pub pid: u32,
    /// The backend its VMs run on.
    pub backend: String,
    /// Per shape.
    pub shapes: Vec<ShapeStatus>,
}

/// Counts of one shape.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShapeStatus {
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// How many the pool keeps ready.
    pub target: usize,
    /// Booted, waiting for a container.
    pub ready: usize,
    /// Booting.
    pub booting: usize,
    /// Handed to a container and still running.
    pub claimed: usize,
    /// Handed out since the server started.
    pub claims_total: u64,
    /// Boots that failed since the server started.
    pub failed_boots: u64,
}

/// A claimant's request to a holder.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HolderRequest {
    /// Hand the VM to the sandbox `pid` (the caller; checked against the socket's peer).
    Claim {
        /// The claimant's pid.
        pid: i32,
        /// The claimant's container, as its state dir (`<root>/<id>`): the holder names it on
        /// its command line once the VM is the container's. Absent from an older claimant.
        #[serde(default)]
        owner: Option<PathBuf>,
    },
    /// Freeze (`true`) or thaw the VM.
    Pause(bool),
}

/// A holder's answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HolderReply {
    /// The VM is the claimant's.
    Claimed(Handover),
    /// Done.
    Ok,
    /// Refused or failed.
    Error(String),
}

/// What a claimant needs to use a VM it claimed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handover {
    /// The VM's name in the pool's log.
    pub name: String,
    /// The holder's pid (the VM lives as long as it does).
    pub holder_pid: i32,
    /// Its start time.
    pub holder_pid_start: u64,
    /// The hypervisor process (the holder itself for the built-in VMM).
    pub vm_pid: i32,
    /// Its start time.
    pub vm_pid_start: u64,
    /// The holder's run dir: the VM's hybrid vsock socket, share dir and logs.
    pub run_dir: PathBuf,
    /// The VM's shape.
    pub shape: Shape,
    /// The VM's card: its tap's name and the MAC the guest sees until it is configured.
    pub card_mac: rootcell_protocol::net::MacAddr,
    /// The holder's network namespace, where the tap is until it is moved.
    pub netns: PathBuf,
    /// When the VM was ready (seconds since the epoch), for the log.
    pub ready_since: u64,
}

/// Errors talking to the pool.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// A socket or its directory is not root's alone.
    #[error("{path} is not safe to trust: {why}; a pool socket hands out VMs, so it must be owned by uid {uid} and not writable by others (remove it, or stop whoever made it)")]
    Untrusted {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        why: String,
        /// Our uid.
        uid: u32,
    },
    /// I/O on a pool socket.
    #[error("{what} {path}: {source}")]
    Io {
        /// The step.
        what: &'static str,
        /// The socket.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A message that does not parse.
    #[error("bad message from {path}: {msg}")]
    Protocol {
        /// The socket.
        path: PathBuf,
        /// The parse error.
        msg: String,
    },
}

/// Checks that `path` is owned by us and writable by no one else.
pub fn check_trusted(path: &Path) -> Result<(), PoolError> {
    let uid = nix::unistd::geteuid().as_raw();
    let untrusted = |why: String| PoolError::Untrusted {
        path: path.to_path_buf(),
        why,
        uid,
    };
    let m = std::fs::symlink_metadata(path).map_err(|source| PoolError::Io {
        what: "cannot inspect",
        path: path.to_path_buf(),
        source,
    })?;
    if m.uid() != uid {
        return Err(untrusted(format!("it is owned by uid {}", m.uid())));
    }
    if m.file_type().is_symlink() {
        return Err(untrusted("it is a symlink".into()));
    }
    if m.mode() & 0o022 != 0 {
        return Err(untrusted(format!(
            "its mode {:o} lets others write",
            m.mode() & 0o7777
        )));
    }
    Ok(())
}

/// Connects to `path` after checking it and its directory with [`check_trusted`].
pub fn connect(path: &Path, timeout: Duration) -> Result<UnixStream, PoolError> {
    if let Some(parent) = path.parent() {
        check_trusted(parent)?;
    }
    check_trusted(path)?;
    let s = UnixStream::connect(path).map_err(|source| PoolError::Io {
        what: "cannot connect to",
        path: path.to_path_buf(),
        source,
    })?;
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    Ok(s)
}

/// Sends one JSON line.
pub fn send<T: Serialize>(s: &mut UnixStream, path: &Path, msg: &T) -> Result<(), PoolError> {
    let mut line = serde_json::to_vec(msg).map_err(|e| PoolError::Protocol {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    line.push(b'\n');
    s.write_all(&line).map_err(|source| PoolError::Io {
        what: "cannot write to",
        path: path.to_path_buf(),
        source,
    })
}

/// Longest message accepted (a status with many shapes is far below).
const MAX_LINE: u64 = 64 * 1024;

/// Receives one JSON line; `None` at end of stream.
pub fn recv<T: serde::de::DeserializeOwned>(
    r: &mut impl std::io::Read,
    path: &Path,
) -> Result<Option<T>, PoolError> {
    // Byte by byte: a buffer could swallow the start of the next message on the connection.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match r.read(&mut byte) {
            Ok(0) if line.is_empty() => return Ok(None),
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() as u64 >= MAX_LINE => {
                return Err(PoolError::Protocol {
                    path: path.to_path_buf(),
                    msg: format!("a message longer than {MAX_LINE} bytes"),
                })
            }
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(PoolError::Io {
                    what: "cannot read from",
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
    serde_json::from_slice(&line)
        .map(Some)
        .map_err(|e| PoolError::Protocol {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })
}

/// Seconds since the epoch.
fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parses_with_defaults_and_refuses_unknown_fields() {
        let c: PoolConfig = serde_json::from_str(
            r#"{"vms": [{"memory_mib": 512}, {"memory_mib": 256, "vcpus": 2, "count": 3}]}"#,
        )
        .unwrap();
        assert_eq!(
            c.vms,
            [
                ShapeConfig {
                    memory_mib: 512,
                    vcpus: 1,
                    count: 1
                },
                ShapeConfig {
                    memory_mib: 256,
                    vcpus: 2,
                    count: 3
                },
            ]
        );
        assert!(serde_json::from_str::<PoolConfig>(r#"{"vms": [{"memory": 512}]}"#).is_err());
    }

    #[test]
    fn a_shape_fits_with_the_same_cpus_and_enough_memory() {
        let vm = Shape {
            memory_mib: 512,
            vcpus: 1,
        };
        assert!(vm.fits(&Shape {
            memory_mib: 164,
            vcpus: 1
        }));
        assert!(vm.fits(&Shape {
            memory_mib: 512,
            vcpus: 1
        }));
        assert!(!vm.fits(&Shape {
            memory_mib: 576,
            vcpus: 1
        }));
        assert!(!vm.fits(&Shape {
            memory_mib: 164,
            vcpus: 2
        }));
    }

    #[test]
    fn sockets_of_others_are_not_trusted() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        std::fs::write(&p, "").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        check_trusted(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = check_trusted(&p).unwrap_err().to_string();
        assert!(e.contains("lets others write"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        nix::unistd::chown(&p, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        let e = check_trusted(&p).unwrap_err().to_string();
        assert!(e.contains("owned by uid 65534"), "{e}");
    }
}
