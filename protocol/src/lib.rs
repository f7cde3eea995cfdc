//! Wire protocol between the rootcell host runtime and the in-guest agent.
//!
//! Transport: virtio-vsock. The host reaches the guest through the hybrid vsock unix socket
//! (`CONNECT <port>\n` -> `OK <n>\n`), the agent listens on `AF_VSOCK`.
//!
//! * [`CONTROL_PORT`]: one connection per container carrying length-prefixed JSON frames
//!   ([`write_frame`], [`read_frame`]). The host sends [`HostMessage`]s, the agent answers with
//!   [`AgentMessage`]s: a [`Response`] per request (matched by id) and unsolicited [`Event`]s.
//!   `Create` binds the connection to its container: later requests on it act on that
//!   container, and its processes' events arrive on it. A VM holds several containers when
//!   several connections each create one (containers that share namespaces, a pod).
//! * [`STREAM_PORT`]: one connection per stdio stream. The host first sends one frame with a
//!   [`StreamHello`], then the connection carries raw bytes; EOF is a socket shutdown. Streams are
//!   attached before the request that creates the process, so no byte is lost.
//!
//! This crate does no I/O of its own beyond framing over `Read`/`Write`.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::io::{Read, Write};

pub mod dns;
pub mod frame;
pub mod net;

pub use frame::{read_frame, write_frame, FrameError, MAX_FRAME_LEN};

/// Protocol version; bumped on every incompatible change.
pub const PROTOCOL_VERSION: u32 = 8;
/// Vsock port the agent listens on for the control connection.
pub const CONTROL_PORT: u32 = 1024;
/// Vsock port the agent listens on for stdio stream connections.
pub const STREAM_PORT: u32 = 1025;
/// Process id of a container's init process (exec processes use their own ids).
pub const INIT_PROCESS: &str = "init";
/// Host vsock port the agent relays loopback DNS queries to: one connection per query, which
/// carries the query and then the answer, each prefixed with its length as a big-endian u16
/// (the DNS-over-TCP framing).
pub const DNS_RELAY_PORT: u32 = 1053;
/// Host vsock port of the DNS-over-TCP relay: one connection per guest TCP connection to the
/// loopback resolver, its bytes (already length-prefixed by DNS over TCP) passed through both
/// ways to a TCP connection to the resolver.
pub const DNS_TCP_RELAY_PORT: u32 = 1054;
/// Virtio-fs tag of the share that carries the container rootfs and bind mount sources.
pub const SHARE_TAG: &str = "rootcell";
/// Where the agent mounts the virtio-fs share inside the guest.
pub const GUEST_SHARE_DIR: &str = "/run/rootcell/share";

/// A message from the host to the agent on the control connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostMessage {
    /// Request id, echoed in the matching [`Response`].
    pub id: u64,
    /// What the host asks for.
    pub request: Request,
}

/// Requests the host can make.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// First message on a control connection: version check.
    Hello {
        /// The host's [`PROTOCOL_VERSION`].
        version: u32,
    },
    /// Configure the guest's network (before `Create`): each interface is matched to a virtio-net
    /// card by MAC address. A container created afterwards shares the guest's network namespace;
    /// without this request it gets a fresh one with loopback only.
    ConfigureNetwork {
        /// Interfaces and routes.
        config: net::NetworkConfig,
        /// A resolver on the loopback of the container's host namespace (Docker's embedded DNS
        /// at 127.0.0.11), unreachable from the guest: the agent answers UDP queries to this
        /// address on port 53 by relaying each over a vsock connection to [`DNS_RELAY_PORT`].
        #[serde(default)]
        loopback_dns: Option<std::net::IpAddr>,
    },
    /// Build the container (namespaces, mounts, ...) and its init process, without executing
    /// the user program yet, and bind this connection to it. Paths in `spec` are guest paths
    /// (root and bind sources live under [`GUEST_SHARE_DIR`]); a namespace with a path is
    /// joined (`/proc/<pid>/ns/<type>` of another container's init in this guest).
    Create {
        /// Container id.
        container_id: String,
        /// The OCI runtime spec, rewritten to guest paths by the host.
        spec: Box<oci_spec::runtime::Spec>,
        /// Which stdio streams the host attached for [`INIT_PROCESS`].
        stdio: StdioSpec,
        /// The runtime's guest privilege policy: the container (and every process exec'd into
        /// it) gets what `docker run --privileged` gives, inside the guest: every capability,
        /// no masked or read-only paths, writable `/sys`, the guest's devices.
        #[serde(default)]
        privileged: bool,
    },
    /// Execute the init process's program (after `Create`).
    Start,
    /// Run an additional process in the container.
    Exec {
        /// Host-chosen id of the new process (not [`INIT_PROCESS`]).
        exec_id: String,
        /// The process to run.
        process: Box<oci_spec::runtime::Process>,
        /// Which stdio streams the host attached for it.
        stdio: StdioSpec,
    },
    /// Send a signal to a process (or, with `all`, to every process of the container).
    Signal {
        /// Target process id ([`INIT_PROCESS`] or an exec id).
        process: String,
        /// Signal number.
        signal: i32,
        /// Signal every process in the container, not just `process`.
        all: bool,
    },
    /// Change the window size of a process's terminal.
    Resize {
        /// Target process id.
        process: String,
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// List the pids (guest pid namespace of the agent) of the container's processes.
    Processes,
    /// Change the container's limits in the guest (`update`); each one present replaces the
    /// current one.
    UpdateLimits {
        /// Memory limit in bytes (`memory.max`); at most what the VM has room for.
        #[serde(default)]
        memory: Option<u64>,
        /// Process limit (`pids.max`); `None` leaves it, a negative value removes it.
        #[serde(default)]
        pids: Option<i64>,
    },
    /// The container's resource usage, from its cgroup in the guest (`ctr task metrics`).
    Stats,
    /// Set the guest's wall clock (`CLOCK_REALTIME`) to the host's: a guest has no battery-backed
    /// clock of its own, and an emulated one falls behind. Sent after `Hello`, before `Start`,
    /// `Exec` and after a resume, and periodically while the container lives.
    SetClock {
        /// The host's `CLOCK_REALTIME` when the request was made, in nanoseconds since the epoch.
        unix_nanos: u64,
    },
    /// Freeze (`true`) or thaw (`false`) this connection's container alone, through its cgroup:
    /// pausing one container of a VM that holds several.
    Freeze {
        /// Frozen or not.
        frozen: bool,
    },
    /// End this connection's container without ending the VM: kill its processes, remove its
    /// cgroup and forget it (the other containers of the VM go on). Closing the connection
    /// does the same.
    Remove,
    /// Power the guest off. The agent syncs the guest's file systems before it answers, so
    /// once the answer is in, the host may end the VM without waiting for the power-off
    /// (since version 7).
    Shutdown,
}

impl Request {
    /// The request's name as the protocol spells it (`create`, `exec`, ...): for messages, where
    /// formatting the whole request would print a whole OCI spec.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::ConfigureNetwork { .. } => "configure_network",
            Request::Create { .. } => "create",
            Request::Start => "start",
            Request::Exec { .. } => "exec",
            Request::Signal { .. } => "signal",
            Request::Resize { .. } => "resize",
            Request::Processes => "processes",
            Request::UpdateLimits { .. } => "update_limits",
            Request::Stats => "stats",
            Request::SetClock { .. } => "set_clock",
            Request::Freeze { .. } => "freeze",
            Request::Remove => "remove",
            Request::Shutdown => "shutdown",
        }
    }
}

/// Which stdio streams the host attaches for a process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StdioSpec {
    /// A stdin stream is attached (otherwise stdin is /dev/null).
    pub stdin: bool,
    /// A stdout stream is attached (otherwise /dev/null).
    pub stdout: bool,
    /// A stderr stream is attached (otherwise /dev/null).
    pub stderr: bool,
    /// The process gets a pty; its master is relayed over the [`Stream::Pty`] stream.
    pub terminal: bool,
}

/// A message from the agent on the control connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AgentMessage {
    /// The answer to the host request with the same id.
    Response {
        /// The request id.
        id: u64,
        /// The outcome.
        result: Response,
    },
    /// Something that happened without being asked.
    Event {
        /// The event.
        event: Event,
    },
}

/// Outcome of a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// Answer to `Hello`.
    Hello {
        /// The agent's [`PROTOCOL_VERSION`].
        version: u32,
        /// The guest kernel release (`uname -r`).
        kernel_release: String,
    },
    /// The request succeeded.
    Ok,
    /// A process was created; `pid` is its pid as the agent sees it.
    Created {
        /// Pid in the agent's pid namespace.
        pid: i32,
    },
    /// The container's processes (agent pid namespace).
    Processes {
        /// Pids.
        pids: Vec<i32>,
    },
    /// Answer to `Stats`.
    Stats {
        /// The container's usage and limits.
        stats: ContainerStats,
    },
    /// The request failed.
    Error {
        /// What kind of failure, so the host can map it to exit codes.
        code: ErrorCode,
        /// Human-readable, one line.
        message: String,
    },
}

/// A container's resource usage and limits, from its cgroup (v2) in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerStats {
    /// Memory in use, bytes (`memory.current`).
    pub memory_usage: u64,
    /// Memory limit, bytes (`memory.max`); `None` when unlimited.
    pub memory_limit: Option<u64>,
    /// CPU time, microseconds (`cpu.stat` `usage_usec`).
    pub cpu_usage_usec: u64,
    /// CPU time in user mode, microseconds.
    pub cpu_user_usec: u64,
    /// CPU time in kernel mode, microseconds.
    pub cpu_system_usec: u64,
    /// Processes (`pids.current`).
    pub pids_current: u64,
    /// Process limit (`pids.max`); `None` when unlimited.
    pub pids_limit: Option<u64>,
}

/// Classes of failures the host maps to runtime behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The executable was not found (exit 127 convention).
    NotFound,
    /// The executable exists but cannot be executed (exit 126 convention).
    PermissionDenied,
    /// The spec asks for something the agent does not support.
    Unsupported,
    /// The named process does not exist or has exited.
    NoSuchProcess,
    /// The request is not valid in the current state.
    InvalidState,
    /// The agent failed, not the request: its handler panicked (the message is the panic's).
    /// The agent goes on serving; the host reports it as the agent's internal error (since
    /// version 8).
    Internal,
    /// Anything else.
    Other,
}

/// Unsolicited notifications from the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A process exited. `status` is its exit code, or 128+N for a death by signal N.
    Exit {
        /// Process id ([`INIT_PROCESS`] or an exec id).
        process: String,
        /// Exit status in shell convention.
        status: i32,
    },
    /// The container's memory cgroup hit its limit and the OOM killer ran.
    Oom,
}

/// First frame on a [`STREAM_PORT`] connection: which process and stream it carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamHello {
    /// The container the process belongs to.
    #[serde(default)]
    pub container: String,
    /// Process id ([`INIT_PROCESS`] or an exec id).
    pub process: String,
    /// Which stream.
    pub stream: Stream,
}

/// Kinds of stdio stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    /// Host -> process stdin.
    Stdin,
    /// Process stdout -> host.
    Stdout,
    /// Process stderr -> host.
    Stderr,
    /// Both ways: the pty master of a terminal process.
    Pty,
}

/// Writes one message as a frame.
pub fn send<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    write_frame(w, msg)
}

/// Reads one message; `Ok(None)` on a clean EOF between frames.
pub fn recv<R: Read, T: DeserializeOwned>(r: &mut R) -> Result<Option<T>, FrameError> {
    read_frame(r)
}

/// The `/proc/<pid>/ns/` file name of a namespace type (the host and the agent name a
/// namespace to join by it).
pub fn ns_file_name(t: oci_spec::runtime::LinuxNamespaceType) -> &'static str {
    use oci_spec::runtime::LinuxNamespaceType as T;
    match t {
        T::Mount => "mnt",
        T::Cgroup => "cgroup",
        T::Uts => "uts",
        T::Ipc => "ipc",
        T::User => "user",
        T::Pid => "pid",
        T::Network => "net",
        T::Time => "time",
    }
}

/// Shell-convention exit status from a raw `waitpid` status.
pub fn exit_status_from_wait(raw: i32) -> i32 {
    if raw & 0x7f == 0 {
        (raw >> 8) & 0xff
    } else {
        128 + (raw & 0x7f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_message_round_trips() {
        let msg = HostMessage {
            id: 7,
            request: Request::Signal {
                process: INIT_PROCESS.into(),
                signal: 15,
                all: false,
            },
        };
        let mut buf = Vec::new();
        send(&mut buf, &msg).unwrap();
        let back: HostMessage = recv(&mut buf.as_slice()).unwrap().unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn agent_event_json_is_tagged() {
        let m = AgentMessage::Event {
            event: Event::Exit {
                process: "init".into(),
                status: 137,
            },
        };
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"event","event":{"type":"exit","process":"init","status":137}}"#
        );
    }

    #[test]
    fn request_names_are_the_wire_tags() {
        let requests = [
            Request::Hello { version: 1 },
            Request::Create {
                container_id: "c".into(),
                spec: Box::default(),
                stdio: StdioSpec::default(),
                privileged: false,
            },
            Request::UpdateLimits {
                memory: None,
                pids: None,
            },
            Request::SetClock { unix_nanos: 1 },
            Request::Shutdown,
        ];
        for r in requests {
            let json = serde_json::to_value(&r).unwrap();
            assert_eq!(json["type"], r.name(), "{json}");
        }
    }

    #[test]
    fn wait_status_conversion() {
        assert_eq!(exit_status_from_wait(0), 0);
        assert_eq!(exit_status_from_wait(7 << 8), 7);
        assert_eq!(exit_status_from_wait(9), 137);
        assert_eq!(exit_status_from_wait(15), 143);
    }
}
