//! The persisted state of one container (`<root>/<id>/state.json`) and the OCI state view of it.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

/// OCI lifecycle status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// `create` is running.
    Creating,
    /// The VM is up and the init process is ready to run the user program.
    Created,
    /// The user program runs.
    Running,
    /// The VM is frozen (`pause`).
    Paused,
    /// The container has exited (or its sandbox is gone).
    Stopped,
}

impl Status {
    /// Whether `action` is allowed in this status.
    pub fn check(self, action: Action) -> Result<(), StateError> {
        use Status::*;
        let live = matches!(self, Created | Running);
        match action {
            Action::Start => match self {
                Created => Ok(()),
                Running | Paused => Err(StateError::StartRunning),
                Creating | Stopped => Err(StateError::StartStopped),
            },
            // A signal to a paused VM would wait for a guest that cannot answer.
            Action::Signal if live => Ok(()),
            Action::Signal => Err(StateError::NotRunning),
            Action::Exec | Action::Update if live => Ok(()),
            Action::Exec | Action::Update if self == Paused => Err(StateError::Paused),
            Action::Exec | Action::Update => Err(StateError::NotRunning),
            Action::Pause => self.require(Running),
            Action::Resume => self.require(Paused),
        }
    }

    /// The status after `action` succeeded (unchanged for actions that do not move it).
    pub fn after(self, action: Action) -> Status {
        match action {
            Action::Start => Status::Running,
            Action::Pause => Status::Paused,
            Action::Resume => Status::Running,
            _ => self,
        }
    }

    fn require(self, wanted: Status) -> Result<(), StateError> {
        if self == wanted {
            Ok(())
        } else {
            Err(StateError::Wrong {
                status: self,
                wanted,
            })
        }
    }

    /// The lowercase name, as in OCI state.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        }
    }
}

/// What a command asks of a container. [`Status::check`] says whether its status allows it:
/// the lifecycle's rules in one place, for the CLI and the sandbox alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Run the user program (`start`).
    Start,
    /// Run another process (`exec`).
    Exec,
    /// Send a signal (`kill`).
    Signal,
    /// Freeze the VM (`pause`).
    Pause,
    /// Thaw the VM (`resume`).
    Resume,
    /// Change limits (`update`).
    Update,
}

/// A command its container's status does not allow, worded as runc words it where callers match
/// on the text (Docker's shim, the OCI runtime-tools suite).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StateError {
    /// `start` of a stopped container.
    #[error("cannot start a container that has stopped")]
    StartStopped,
    /// `start` of a running (or paused) container.
    #[error("cannot start an already running container")]
    StartRunning,
    /// A signal to a container with no live process.
    #[error("container not running")]
    NotRunning,
    /// Something the frozen VM cannot answer.
    #[error("the container is paused; resume it first")]
    Paused,
    /// Anything else the status does not allow.
    #[error("container is {}, not {}", status.as_str(), wanted.as_str())]
    Wrong {
        /// The status it has.
        status: Status,
        /// The status the command needs.
        wanted: Status,
    },
}

/// Everything rootcell records about a container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerState {
    /// Container id.
    pub id: String,
    /// Absolute bundle path.
    pub bundle: PathBuf,
    /// Absolute host path of the rootfs.
    pub rootfs: PathBuf,
    /// Lifecycle status as last recorded (see [`ContainerState::refreshed`]).
    pub status: Status,
    /// Sandbox process pid (0 before it exists).
    pub pid: i32,
    /// Start time of `pid` (clock ticks since boot), to detect pid reuse.
    pub pid_start: u64,
    /// Hypervisor process pid (0 if none).
    pub vm_pid: i32,
    /// Start time of `vm_pid`.
    pub vm_pid_start: u64,
    /// Creation time, RFC 3339.
    pub created: String,
    /// Annotations from config.json.
    pub annotations: HashMap<String, String>,
    /// The short per-container run dir (sockets, share dir).
    pub run_dir: PathBuf,
    /// Exit status of the container once stopped.
    pub exit_status: Option<i32>,
    /// `linux.cgroupsPath` the sandbox joined (removed by `delete`).
    #[serde(default)]
    pub cgroups_path: Option<String>,
    /// Created under the guest privilege policy (`--guest-privileged`).
    #[serde(default)]
    pub guest_privileged: bool,
    /// Poststart hooks from config.json, run by `start`.
    #[serde(default)]
    pub poststart: Vec<oci_spec::runtime::Hook>,
    /// Poststop hooks from config.json, run by `delete`.
    #[serde(default)]
    pub poststop: Vec<oci_spec::runtime::Hook>,
    /// The container's init pid inside its guest (0 until created there): another container
    /// joining its namespaces joins `/proc/<guest_pid>/ns/...` of that guest.
    #[serde(default)]
    pub guest_pid: i32,
    /// Guest RAM of the VM the container runs in, in MiB (0 until it runs).
    #[serde(default)]
    pub vm_memory_mib: u64,
    /// Set when the container runs in another container's VM rather than in its own.
    #[serde(default)]
    pub shares_vm: Option<SharedVm>,
    /// Set when the container runs in a VM taken from the pool.
    #[serde(default)]
    pub pooled: Option<PooledVmRecord>,
    /// The network namespace config.json gave by path (one that outlives the container), where
    /// `delete` removes what the network mirror of a killed sandbox left.
    #[serde(default)]
    pub netns: Option<PathBuf>,
}

/// The pool VM a container took (see [`crate::pool`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PooledVmRecord {
    /// Its name in the pool's log.
    pub name: String,
    /// The process that runs it (its share is in that process's mount namespace).
    pub holder_pid: i32,
    /// Start time of `holder_pid`.
    pub holder_pid_start: u64,
    /// Its run dir (hybrid vsock socket, share dir, console log).
    pub run_dir: PathBuf,
}

/// The VM a container shares with the container that booted it (its namespaces joined it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedVm {
    /// Id of the container whose sandbox runs the VM.
    pub owner: String,
    /// That container's run dir (its hybrid vsock socket and share dir are there).
    pub owner_run_dir: PathBuf,
}

impl ContainerState {
    /// The run dir of the VM the container runs in: its own, its owner's, or its pool VM's.
    pub fn vm_run_dir(&self) -> &Path {
        match (&self.shares_vm, &self.pooled) {
            (Some(s), _) => &s.owner_run_dir,
            (None, Some(p)) => &p.run_dir,
            (None, None) => &self.run_dir,
        }
    }

    /// The process in whose mount namespace the VM's share is (for a VM the container owns).
    pub fn vm_share_pid(&self) -> i32 {
        self.pooled.as_ref().map_or(self.pid, |p| p.holder_pid)
    }

    /// The hybrid vsock socket of the VM the container runs in (its own, or its owner's).
    pub fn vsock_uds(&self) -> PathBuf {
        self.vm_run_dir().join(crate::paths::VSOCK_UDS)
    }

    /// The sandbox's control socket.
    pub fn control_socket(&self) -> PathBuf {
        self.run_dir.join(crate::paths::CONTROL_SOCKET)
    }

    /// Reads a state file.
    pub fn load(path: &Path) -> io::Result<Self> {
        let data = std::fs::read(path)?;
        serde_json::from_slice(&data).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Writes the state file atomically (temp file + rename), so readers never see half a file.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, path)
    }

    /// This state with the status corrected to `stopped` if the sandbox process is gone.
    pub fn refreshed(mut self) -> Self {
        if self.status != Status::Stopped
            && (self.pid <= 0 || !process_alive(self.pid, self.pid_start))
        {
            // A creating container whose create is still launching has pid 0 and a live
            // creator; it stays "creating" only while its state dir is young enough to matter.
            if !(self.status == Status::Creating && self.pid == 0) {
                self.status = Status::Stopped;
            }
        }
        self
    }

    /// The OCI runtime state JSON (what `state ID` prints and hooks read on stdin).
    pub fn oci_json(&self) -> serde_json::Value {
        serde_json::json!({
            "ociVersion": "1.0.2",
            "id": self.id,
            "pid": if self.status == Status::Stopped { 0 } else { self.pid },
            "status": self.status.as_str(),
            "bundle": self.bundle,
            "rootfs": self.rootfs,
            "created": self.created,
            "owner": "",
            "annotations": self.annotations,
        })
    }
}

/// Start time (field 22 of /proc/PID/stat) and run state letter of `pid`.
pub fn proc_stat(pid: i32) -> Option<(u64, char)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((start, state))
}

/// What a process that does not end is doing: each thread's name, scheduler state and kernel
/// wait channel (`vcpu0 R, fuse-io D fuse_wait_answer`), or `gone`.
pub fn proc_state_line(pid: i32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return "gone".into();
    };
    let mut threads: Vec<String> = tasks
        .flatten()
        .map(|t| {
            let read = |f: &str| std::fs::read_to_string(t.path().join(f)).unwrap_or_default();
            let stat = read("stat");
            let state = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next().map(str::to_string))
                .unwrap_or_default();
            let wchan = read("wchan");
            let wchan = if wchan == "0" { "" } else { wchan.trim() };
            format!("{} {state} {wchan}", read("comm").trim())
                .trim_end()
                .to_string()
        })
        .collect();
    threads.sort();
    threads.join(", ")
}

/// True if `pid` is a live (not zombie) process that started at `start` (0 = don't check).
pub fn process_alive(pid: i32, start: u64) -> bool {
    match proc_stat(pid) {
        Some((s, st)) => st != 'Z' && st != 'X' && (start == 0 || s == start),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ContainerState {
        ContainerState {
            guest_pid: 0,
            vm_memory_mib: 0,
            shares_vm: None,
            pooled: None,
            netns: None,
            id: "c1".into(),
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            status: Status::Created,
            pid: std::process::id() as i32,
            pid_start: proc_stat(std::process::id() as i32).unwrap().0,
            vm_pid: 0,
            vm_pid_start: 0,
            created: "2024-01-01T00:00:00.000000000Z".into(),
            annotations: HashMap::from([("a".into(), "b".into())]),
            run_dir: "/run/rootcell/r/0".into(),
            exit_status: None,
            cgroups_path: None,
            guest_privileged: false,
            poststart: vec![],
            poststop: vec![],
        }
    }

    #[test]
    fn lifecycle_rules() {
        use Action::*;
        use Status::*;
        let all = [Creating, Created, Running, Paused, Stopped];
        let allowed =
            |a: Action| -> Vec<Status> { all.into_iter().filter(|s| s.check(a).is_ok()).collect() };
        assert_eq!(allowed(Start), [Created]);
        assert_eq!(allowed(Exec), [Created, Running]);
        assert_eq!(allowed(Signal), [Created, Running]);
        assert_eq!(allowed(Update), [Created, Running]);
        assert_eq!(allowed(Pause), [Running]);
        assert_eq!(allowed(Resume), [Paused]);
        // The words callers match on.
        assert_eq!(
            Stopped.check(Start).unwrap_err().to_string(),
            "cannot start a container that has stopped"
        );
        assert_eq!(
            Running.check(Start).unwrap_err().to_string(),
            "cannot start an already running container"
        );
        assert_eq!(Stopped.check(Signal).unwrap_err(), StateError::NotRunning);
        assert_eq!(Paused.check(Exec).unwrap_err(), StateError::Paused);
        assert_eq!(
            Created.check(Pause).unwrap_err().to_string(),
            "container is created, not running"
        );
        assert_eq!(Created.after(Start), Running);
        assert_eq!(Running.after(Pause), Paused);
        assert_eq!(Paused.after(Resume), Running);
        assert_eq!(Running.after(Exec), Running);
    }

    #[test]
    fn oci_state_shape() {
        let v = sample().oci_json();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(|s| s.as_str()).collect();
        for k in [
            "ociVersion",
            "id",
            "pid",
            "status",
            "bundle",
            "rootfs",
            "created",
            "owner",
            "annotations",
        ] {
            assert!(keys.contains(&k), "{k} missing");
        }
        assert_eq!(v["status"], "created");
        assert_eq!(v["owner"], "");
        assert_eq!(v["annotations"]["a"], "b");
        assert!(v["pid"].as_i64().unwrap() > 0);
    }

    #[test]
    fn dead_or_reused_pid_means_stopped() {
        let live = sample().refreshed();
        assert_eq!(live.status, Status::Created);
        let mut reused = sample();
        reused.pid_start += 1;
        assert_eq!(reused.refreshed().status, Status::Stopped);
        let mut stopped = sample();
        stopped.status = Status::Stopped;
        assert_eq!(stopped.oci_json()["pid"], 0);
    }

    #[test]
    fn save_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        sample().save(&p).unwrap();
        assert_eq!(ContainerState::load(&p).unwrap(), sample());
    }
}
