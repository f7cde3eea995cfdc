//! The agent's state and request handling: one container per guest, its init and exec
//! processes, their streams and terminals.

use crate::alog;
use crate::container::{
    self, spec, ExecRequest, InitRequest, MountEnv, NamespacePlan, Prepared, SetupError, Stdio,
};
use crate::registry::{Entry, Registry};
use crate::sink::EventSink;
use crate::streams::StreamTable;
use crate::terminal;
use oci_spec::runtime::{Process, Spec};
use rootcell_protocol::net::NetworkConfig;
use rootcell_protocol::{
    ErrorCode, Request, Response, StdioSpec, Stream, INIT_PROCESS, PROTOCOL_VERSION,
};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Agent-wide settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// How long Create/Exec wait for announced streams that have not connected yet.
    pub stream_wait: Duration,
    /// Where per-container cgroup2 directories are made (None: no cgroups).
    pub cgroup_root: Option<PathBuf>,
    /// Mount facts about this system.
    pub mount_env: MountEnv,
    /// Whether `Shutdown` reboots the machine (as PID 1) or just exits the agent.
    pub reboot_on_shutdown: bool,
}

/// What the control loop does after answering a request.
#[derive(Debug)]
pub enum After {
    /// Nothing.
    Nothing,
    /// Power off the guest.
    Shutdown,
}

/// The result of handling a request: the response, a process to release atomically with it
/// (so its exit cannot be reported first), and a follow-up action.
pub struct Reply {
    /// The answer.
    pub response: Response,
    /// Released under the sink lock right before the response is written.
    pub release: Option<Prepared>,
    /// What to do afterwards.
    pub after: After,
}

impl From<Response> for Reply {
    fn from(response: Response) -> Self {
        Reply {
            response,
            release: None,
            after: After::Nothing,
        }
    }
}

/// A terminal being set up: the agent's own pty (kept if the container has no devpts), the
/// host's pty stream, and the socket on which the process hands over a pty of the container's.
struct PendingPty {
    master: std::os::fd::OwnedFd,
    host: Option<UnixStream>,
    offer: std::os::fd::OwnedFd,
}

struct Container {
    plan: NamespacePlan,
    init_pid: i32,
    cgroup: Option<PathBuf>,
    /// The OOM kills of the container's cgroup, checked again before each exit is reported.
    oom: Option<Arc<crate::oom::Watch>>,
    pending_start: Option<Prepared>,
    /// Created under the guest privilege policy: exec'd processes get every capability too.
    privileged: bool,
}

/// The agent: shared by the control, stream and reaper threads.
pub struct Agent {
    /// Writer for responses and events.
    pub sink: Arc<EventSink>,
    /// Streams waiting for their process.
    pub streams: StreamTable,
    /// Live named processes.
    pub registry: Arc<Registry>,
    config: Config,
    container: Mutex<Option<Container>>,
}

fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error {
        code,
        message: message.into(),
    }
}

impl From<SetupError> for Response {
    fn from(e: SetupError) -> Self {
        Response::Error {
            code: e.code,
            message: e.message,
        }
    }
}

impl Agent {
    /// Creates an agent.
    pub fn new(config: Config) -> Self {
        Agent {
            sink: Arc::new(EventSink::new()),
            streams: StreamTable::new(),
            registry: Arc::new(Registry::new()),
            config,
            container: Mutex::new(None),
        }
    }

    /// The agent's settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Called by the reaper when a named process has exited, before its exit is reported.
    pub fn process_exited(&self, name: &str, _status: i32) {
        let oom = self.lock().as_mut().and_then(|c| {
            if name == INIT_PROCESS {
                c.pending_start = None;
            }
            c.oom.clone()
        });
        // Outside the lock: this may send an event.
        if let Some(w) = oom {
            w.check();
        }
    }

    /// Handles one request.
    pub fn handle(&self, request: Request) -> Reply {
        match request {
            Request::Hello { version } => {
                if version != PROTOCOL_VERSION {
                    alog!("host speaks protocol {version}, agent {PROTOCOL_VERSION}");
                }
                let kernel_release = nix::sys::utsname::uname()
                    .map(|u| u.release().to_string_lossy().into_owned())
                    .unwrap_or_default();
                Response::Hello {
                    version: PROTOCOL_VERSION,
                    kernel_release,
                }
                .into()
            }
            Request::ConfigureNetwork {
                config,
                loopback_dns,
            } => self.configure_network(&config, loopback_dns).into(),
            Request::Create {
                container_id,
                mut spec,
                stdio,
                privileged,
            } => {
                if privileged {
                    container::privileged::privilege_spec(&mut spec, Path::new("/dev"));
                }
                self.create(&container_id, &spec, stdio, privileged).into()
            }
            Request::Start => self.start(),
            Request::Exec {
                exec_id,
                mut process,
                stdio,
            } => {
                if self.lock().as_ref().is_some_and(|c| c.privileged) {
                    container::privileged::privilege_process(&mut process);
                }
                self.exec(&exec_id, &process, stdio)
            }
            Request::Signal {
                process,
                signal,
                all,
            } => self.signal(&process, signal, all).into(),
            Request::Resize {
                process,
                rows,
                cols,
            } => self.resize(&process, rows, cols).into(),
            Request::UpdateLimits { memory, pids } => self.update_limits(memory, pids).into(),
            Request::Processes => Response::Processes {
                pids: self.container_pids(),
            }
            .into(),
            Request::SetClock { unix_nanos } => crate::clock::set(unix_nanos).into(),
            Request::Shutdown => Reply {
                response: Response::Ok,
                release: None,
                after: After::Shutdown,
            },
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Container>> {
        self.container.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives the guest's cards the host interfaces' names, addresses and routes. Only before
    /// the container exists: it is created into this network namespace.
    fn configure_network(
        &self,
        config: &NetworkConfig,
        loopback_dns: Option<std::net::IpAddr>,
    ) -> Response {
        if self.lock().is_some() {
            return Response::Error {
                code: ErrorCode::InvalidState,
                message: "the network is configured before the container is created".into(),
            };
        }
        let applied = rootcell_net::apply(config)
            .map_err(|e| e.to_string())
            .and_then(|()| match loopback_dns {
                // 127.0.0.0/8 is all local on lo, so the resolver's address can be bound as is.
                Some(addr) => crate::dns::start(addr)
                    .map_err(|e| format!("cannot relay DNS at {addr}:53: {e}")),
                None => Ok(()),
            });
        match applied {
            Ok(()) => {
                for i in &config.interfaces {
                    alog!(
                        "network: {} ({}) mtu {} {:?}",
                        i.name,
                        i.mac,
                        i.mtu,
                        i.addresses
                            .iter()
                            .map(|a| a.to_string())
                            .collect::<Vec<_>>()
                    );
                }
                Response::Ok
            }
            Err(message) => Response::Error {
                code: ErrorCode::Other,
                message,
            },
        }
    }

    fn create(&self, id: &str, spec: &Spec, stdio_spec: StdioSpec, privileged: bool) -> Response {
        let result = self.try_create(id, spec, stdio_spec, privileged);
        if result.is_err() {
            self.streams.discard(INIT_PROCESS);
        }
        match result {
            Ok(pid) => Response::Created { pid },
            Err(e) => {
                alog!("create {id} failed: {}", e.message);
                e.into()
            }
        }
    }

    fn try_create(
        &self,
        id: &str,
        spec: &Spec,
        stdio_spec: StdioSpec,
        privileged: bool,
    ) -> Result<i32, SetupError> {
        let mut container = self.lock();
        if container.is_some() {
            return Err(SetupError::new(
                ErrorCode::InvalidState,
                "this guest already has a container",
            ));
        }
        let plan = spec::validate(spec)?;
        let console_size = spec
            .process()
            .as_ref()
            .and_then(|p| p.console_size().as_ref().map(|b| (b.height(), b.width())));
        let (stdio, pty) = self.take_stdio(INIT_PROCESS, stdio_spec)?;
        let cgroup = self.make_cgroup(id, spec);
        let oom = cgroup
            .as_ref()
            .and_then(|cg| crate::oom::watch(cg.clone(), self.sink.clone()));
        let req = InitRequest {
            spec,
            plan: &plan,
            cgroup: cgroup.as_deref(),
            env: self.config.mount_env,
        };
        // From the fork to the registration the reaper must not reap (see registry.rs).
        let gate = self.registry.spawning();
        let prepared = container::create_init(req, stdio);
        self.registry.note_fork();
        let prepared = prepared?;
        let pid = prepared.pid;
        let pty = self.start_relay(pty, console_size)?;
        self.registry.add(INIT_PROCESS, Entry { pid, pty });
        drop(gate);
        alog!("created container {id}: init pid {pid}");
        *container = Some(Container {
            plan,
            init_pid: pid,
            cgroup,
            oom,
            pending_start: Some(prepared),
            privileged,
        });
        Ok(pid)
    }

    fn start(&self) -> Reply {
        let mut container = self.lock();
        match container.as_mut() {
            None => error(ErrorCode::InvalidState, "no container has been created").into(),
            Some(c) => match c.pending_start.take() {
                Some(p) => Reply {
                    response: Response::Ok,
                    release: Some(p),
                    after: After::Nothing,
                },
                None if self.registry.get(INIT_PROCESS).is_some() => {
                    error(ErrorCode::InvalidState, "the container is already started").into()
                }
                None => error(ErrorCode::InvalidState, "the container's init has exited").into(),
            },
        }
    }

    fn exec(&self, exec_id: &str, process: &Process, stdio_spec: StdioSpec) -> Reply {
        let result = self.try_exec(exec_id, process, stdio_spec);
        if result.is_err() {
            self.streams.discard(exec_id);
        }
        match result {
            Ok(p) => Reply {
                response: Response::Created { pid: p.pid },
                release: Some(p),
                after: After::Nothing,
            },
            Err(e) => {
                alog!("exec {exec_id} failed: {}", e.message);
                Response::from(e).into()
            }
        }
    }

    fn try_exec(
        &self,
        exec_id: &str,
        process: &Process,
        stdio_spec: StdioSpec,
    ) -> Result<Prepared, SetupError> {
        if exec_id == INIT_PROCESS || self.registry.get(exec_id).is_some() {
            return Err(SetupError::new(
                ErrorCode::InvalidState,
                format!("process id {exec_id} is in use"),
            ));
        }
        let (plan, init_pid, cgroup) = {
            let container = self.lock();
            let c = container
                .as_ref()
                .ok_or_else(|| SetupError::new(ErrorCode::InvalidState, "no container"))?;
            if self.registry.get(INIT_PROCESS).is_none() {
                return Err(SetupError::new(
                    ErrorCode::InvalidState,
                    "the container's init has exited",
                ));
            }
            (c.plan.clone(), c.init_pid, c.cgroup.clone())
        };
        let (stdio, pty) = self.take_stdio(exec_id, stdio_spec)?;
        let console_size = process.console_size().map(|b| (b.height(), b.width()));
        let req = ExecRequest {
            init_pid,
            plan: &plan,
            cgroup: cgroup.as_deref(),
        };
        // From the fork to the registration the reaper must not reap (see registry.rs).
        let gate = self.registry.spawning();
        let prepared = container::create_exec(req, process, stdio);
        self.registry.note_fork();
        let prepared = prepared?;
        let pty = self.start_relay(pty, console_size)?;
        self.registry.add(
            exec_id,
            Entry {
                pid: prepared.pid,
                pty,
            },
        );
        drop(gate);
        alog!("exec {exec_id}: pid {}", prepared.pid);
        Ok(prepared)
    }

    /// Collects the announced streams of `process`; with a terminal, opens a pty (used if the
    /// container has no devpts of its own) and returns its master, the host's pty stream and
    /// the socket on which the process may hand over a pty from the container's devpts.
    fn take_stdio(
        &self,
        process: &str,
        spec: StdioSpec,
    ) -> Result<(Stdio, Option<PendingPty>), SetupError> {
        let wait = self.config.stream_wait;
        let take =
            |wanted: bool, stream: Stream| -> Result<Option<std::os::fd::OwnedFd>, SetupError> {
                if !wanted {
                    return Ok(None);
                }
                match self.streams.take(process, stream, wait) {
                    Some(fd) => Ok(Some(fd)),
                    None => Err(SetupError::other(format!(
                        "the {stream:?} stream of {process} did not connect in time"
                    ))),
                }
            };
        if spec.terminal {
            let host = take(true, Stream::Pty)?.map(UnixStream::from);
            let pty =
                terminal::open_pty().map_err(|e| SetupError::other(format!("openpty: {e}")))?;
            let (offer, offer_child) = nix::sys::socket::socketpair(
                nix::sys::socket::AddressFamily::Unix,
                nix::sys::socket::SockType::SeqPacket,
                None,
                nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            )
            .map_err(|e| SetupError::other(format!("socketpair for the pty: {e}")))?;
            let stdio = Stdio {
                terminal: Some(pty.slave),
                console_path: Some(pty.slave_path),
                pty_offer: Some(offer_child),
                ..Default::default()
            };
            let pending = PendingPty {
                master: pty.master,
                host,
                offer,
            };
            return Ok((stdio, Some(pending)));
        }
        let stdio = Stdio {
            stdin: take(spec.stdin, Stream::Stdin)?,
            stdout: take(spec.stdout, Stream::Stdout)?,
            stderr: take(spec.stderr, Stream::Stderr)?,
            ..Default::default()
        };
        Ok((stdio, None))
    }

    /// Once the process is set up: takes the master of the pty it opened in the container
    /// (else keeps the agent's), sets the initial size and relays it to the host's stream.
    fn start_relay(
        &self,
        pty: Option<PendingPty>,
        size: Option<(u64, u64)>,
    ) -> Result<Option<Arc<std::os::fd::OwnedFd>>, SetupError> {
        let Some(PendingPty {
            master,
            host,
            offer,
        }) = pty
        else {
            return Ok(None);
        };
        // The process sent it before reporting ready, so it is there or never comes.
        let master = match terminal::try_recv_fd(&offer) {
            Ok(Some(m)) => m,
            Ok(None) => master,
            Err(e) => {
                return Err(SetupError::other(format!(
                    "receive the container's pty: {e}"
                )))
            }
        };
        if let Some((h, w)) = size {
            let _ = terminal::resize(&master, h as u16, w as u16);
        }
        let master = Arc::new(master);
        if let Some(host) = host {
            terminal::relay(master.clone(), host)
                .map_err(|e| SetupError::other(format!("pty relay: {e}")))?;
        }
        Ok(Some(master))
    }

    fn make_cgroup(&self, id: &str, spec: &Spec) -> Option<PathBuf> {
        let root = self.config.cgroup_root.as_ref()?;
        let name: String = id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let dir = root.join(format!("rootcell-{name}"));
        match std::fs::create_dir_all(&dir) {
            Ok(()) => {
                let res = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
                crate::resources::apply(&dir, res);
                Some(dir)
            }
            Err(e) => {
                alog!("no cgroup for the container ({}): {e}", dir.display());
                None
            }
        }
    }

    fn update_limits(&self, memory: Option<u64>, pids: Option<i64>) -> Response {
        let cgroup = self.lock().as_ref().map(|c| c.cgroup.clone());
        match cgroup {
            None => error(ErrorCode::InvalidState, "no container in this guest"),
            Some(None) => error(
                ErrorCode::Unsupported,
                "the container has no cgroup in the guest (no cgroup2 mounted)",
            ),
            Some(Some(cg)) => match crate::resources::update(&cg, memory, pids) {
                Ok(()) => Response::Ok,
                Err(message) => error(ErrorCode::Other, message),
            },
        }
    }

    fn signal(&self, process: &str, signal: i32, all: bool) -> Response {
        let sig = match nix::sys::signal::Signal::try_from(signal) {
            Ok(s) => s,
            Err(_) => return error(ErrorCode::Other, format!("invalid signal {signal}")),
        };
        let pids = if all {
            self.container_pids()
        } else {
            self.registry
                .get(process)
                .map(|e| vec![e.pid])
                .unwrap_or_default()
        };
        if pids.is_empty() {
            return error(
                ErrorCode::NoSuchProcess,
                format!("process {process} does not exist or has exited"),
            );
        }
        let mut sent = false;
        for pid in pids {
            sent |= nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).is_ok();
        }
        if sent {
            Response::Ok
        } else {
            error(
                ErrorCode::NoSuchProcess,
                format!("process {process} has exited"),
            )
        }
    }

    fn resize(&self, process: &str, rows: u16, cols: u16) -> Response {
        match self.registry.get(process) {
            None => error(
                ErrorCode::NoSuchProcess,
                format!("process {process} does not exist or has exited"),
            ),
            Some(Entry { pty: None, .. }) => error(
                ErrorCode::InvalidState,
                format!("process {process} has no terminal"),
            ),
            Some(Entry {
                pty: Some(master), ..
            }) => match terminal::resize(&master, rows, cols) {
                Ok(()) => Response::Ok,
                Err(e) => error(ErrorCode::Other, format!("resize: {e}")),
            },
        }
    }

    /// Pids of every process of the container: its cgroup and those below it if it has one,
    /// else every process in its pid namespace; and the processes the agent started.
    pub fn container_pids(&self) -> Vec<i32> {
        let (cgroup, init_pid, has_pidns) = {
            let c = self.lock();
            match c.as_ref() {
                None => return Vec::new(),
                Some(c) => (
                    c.cgroup.clone(),
                    c.init_pid,
                    c.plan.has(oci_spec::runtime::LinuxNamespaceType::Pid),
                ),
            }
        };
        let mut pids = Vec::new();
        let found = match cgroup {
            Some(cg) => cgroup_pids(&cg, &mut pids),
            None => false,
        };
        if !found && has_pidns && self.registry.get(INIT_PROCESS).is_some() {
            if let Ok(ns) = std::fs::read_link(format!("/proc/{init_pid}/ns/pid")) {
                pids = pids_in_namespace(Path::new("/proc"), &ns);
            }
        }
        // The processes the agent started, while they live, wherever they moved themselves
        // (a privileged container may put a process in a cgroup outside its own): the host
        // asks this list whether an exec it waits for still exists.
        for pid in self.registry.pids() {
            if !pids.contains(&pid) && alive(pid) {
                pids.push(pid);
            }
        }
        pids
    }
}

/// Adds the pids of `dir` and of every cgroup below it; false if `dir` cannot be read.
fn cgroup_pids(dir: &Path, pids: &mut Vec<i32>) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) else {
        return false;
    };
    pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            cgroup_pids(&e.path(), pids);
        }
    }
    true
}

/// Whether `pid` exists and has not exited (a zombie has).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

/// Pids under `proc` whose pid namespace link equals `ns`.
fn pids_in_namespace(proc: &Path, ns: &Path) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir(proc) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_link(proc.join(pid.to_string()).join("ns/pid")).is_ok_and(|l| l == ns)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_namespace_walk_finds_this_process() {
        let ns = std::fs::read_link("/proc/self/ns/pid").unwrap();
        let pids = pids_in_namespace(Path::new("/proc"), &ns);
        assert!(pids.contains(&(std::process::id() as i32)));
        assert!(pids_in_namespace(Path::new("/proc"), Path::new("pid:[0]")).is_empty());
    }

    #[test]
    fn requests_before_create_are_refused() {
        let agent = Agent::new(Config {
            stream_wait: Duration::from_millis(10),
            cgroup_root: None,
            mount_env: MountEnv::default(),
            reboot_on_shutdown: false,
        });
        let code = |r: Reply| match r.response {
            Response::Error { code, .. } => code,
            other => panic!("{other:?}"),
        };
        assert_eq!(code(agent.handle(Request::Start)), ErrorCode::InvalidState);
        let sig = Request::Signal {
            process: "init".into(),
            signal: 15,
            all: false,
        };
        assert_eq!(code(agent.handle(sig)), ErrorCode::NoSuchProcess);
        let resize = Request::Resize {
            process: "x".into(),
            rows: 1,
            cols: 1,
        };
        assert_eq!(code(agent.handle(resize)), ErrorCode::NoSuchProcess);
        let update = Request::UpdateLimits {
            memory: Some(64 << 20),
            pids: None,
        };
        assert_eq!(code(agent.handle(update)), ErrorCode::InvalidState);
        assert!(
            matches!(agent.handle(Request::Processes).response, Response::Processes { pids } if pids.is_empty())
        );
    }
}
