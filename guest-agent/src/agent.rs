//! The agent's state and request handling: the guest's containers (one per control connection;
//! several when they share the VM), their init and exec processes, streams and terminals.

use crate::alog;
use crate::container::{
    self, spec, ExecRequest, InitRequest, MountEnv, NamespacePlan, Prepared, SetupError, Stdio,
};
use crate::registry::{self, Entry, Registry};
use crate::sink::EventSink;
use crate::streams::StreamTable;
use crate::terminal;
use oci_spec::runtime::{Process, Spec};
use rootcell_protocol::net::NetworkConfig;
use rootcell_protocol::{
    ErrorCode, Request, Response, StdioSpec, Stream, INIT_PROCESS, PROTOCOL_VERSION,
};
use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long `Freeze` waits for the cgroup to report the new state.
const FREEZE_WAIT: Duration = Duration::from_secs(5);
/// How long `Remove` waits for the container's killed processes to leave its cgroup.
const REMOVE_WAIT: Duration = Duration::from_secs(3);

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
    id: String,
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
    containers: Mutex<HashMap<String, Container>>,
    /// Tests of the panic guard: the step named here panics, once.
    #[cfg(test)]
    panic_in: Mutex<Option<&'static str>>,
}

/// One control connection's view: the container it created (requests act on it), and where
/// that container's events go.
#[derive(Default)]
pub struct Session {
    container: Option<String>,
    events: Option<UnixStream>,
}

impl Session {
    /// A session whose container's events go to `conn`.
    pub fn new(conn: UnixStream) -> Self {
        Session {
            container: None,
            events: Some(conn),
        }
    }

    /// The container this connection created, if any.
    pub fn container(&self) -> Option<&str> {
        self.container.as_deref()
    }
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
            containers: Mutex::default(),
            #[cfg(test)]
            panic_in: Mutex::default(),
        }
    }

    /// Makes step `step` panic, once (tests of the panic guard).
    #[cfg(test)]
    pub(crate) fn ask_to_panic_in(&self, step: &'static str) {
        *self.panic_in.lock().unwrap() = Some(step);
    }

    /// Whether a panic poisoned the containers' lock.
    #[cfg(test)]
    pub(crate) fn containers_poisoned(&self) -> bool {
        self.containers.is_poisoned()
    }

    /// Panics if a test asked step `step` to (see `panic_in`).
    #[cfg(test)]
    pub(crate) fn panic_if_asked(&self, step: &str) {
        let mut asked = self.panic_in.lock().unwrap();
        if asked.is_some_and(|s| s == step) {
            *asked = None;
            drop(asked);
            panic!("asked to panic in {step}");
        }
    }

    /// The agent's settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Called by the reaper when a named process has exited, before its exit is reported.
    pub fn process_exited(&self, name: &str, _status: i32) {
        #[cfg(test)]
        self.panic_if_asked("process_exited");
        let (container, process) = registry::split_key(name);
        let oom = self.lock().get_mut(container).and_then(|c| {
            if process == INIT_PROCESS {
                c.pending_start = None;
            }
            c.oom.clone()
        });
        // Outside the lock: this may send an event.
        if let Some(w) = oom {
            w.check();
        }
    }

    /// Handles one request of the connection whose view is `session`.
    pub fn handle(&self, session: &mut Session, request: Request) -> Reply {
        let Some(id) = session.container.clone() else {
            return self.handle_unbound(session, request);
        };
        match request {
            Request::Create { .. } => error(
                ErrorCode::InvalidState,
                format!("this connection already created container {id}"),
            )
            .into(),
            Request::Start => self.start(&id),
            Request::Exec {
                exec_id,
                mut process,
                stdio,
            } => {
                if self.lock().get(&id).is_some_and(|c| c.privileged) {
                    container::privileged::privilege_process(&mut process);
                }
                self.exec(&id, &exec_id, &process, stdio)
            }
            Request::Signal {
                process,
                signal,
                all,
            } => self.signal(&id, &process, signal, all).into(),
            Request::Resize {
                process,
                rows,
                cols,
            } => self.resize(&id, &process, rows, cols).into(),
            Request::UpdateLimits { memory, pids } => self.update_limits(&id, memory, pids).into(),
            Request::Processes => Response::Processes {
                pids: self.container_pids(&id),
            }
            .into(),
            Request::Stats => self.stats(&id).into(),
            Request::Freeze { frozen } => self.freeze(&id, frozen).into(),
            Request::Remove => {
                self.remove(&id);
                session.container = None;
                Response::Ok.into()
            }
            other => self.handle_unbound(session, other),
        }
    }

    /// Requests that need no container, and those that find none on this connection.
    fn handle_unbound(&self, session: &mut Session, request: Request) -> Reply {
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
                let response = self.create(&container_id, &spec, stdio, privileged);
                if matches!(response, Response::Created { .. }) {
                    if let Some(w) = session.events.as_ref().and_then(|c| c.try_clone().ok()) {
                        self.sink.attach(&container_id, Box::new(w));
                    }
                    session.container = Some(container_id);
                }
                response.into()
            }
            Request::Start
            | Request::UpdateLimits { .. }
            | Request::Freeze { .. }
            | Request::Stats => {
                error(ErrorCode::InvalidState, "no container has been created").into()
            }
            Request::Exec { .. } => error(ErrorCode::InvalidState, "no container").into(),
            Request::Signal { process, .. } | Request::Resize { process, .. } => error(
                ErrorCode::NoSuchProcess,
                format!("process {process} does not exist or has exited"),
            )
            .into(),
            Request::Processes => Response::Processes { pids: Vec::new() }.into(),
            Request::Remove => Response::Ok.into(),
            Request::SetClock { unix_nanos } => crate::clock::set(unix_nanos).into(),
            Request::Shutdown => {
                // Synced before the answer: once the host has it, everything the container
                // wrote (mmap'd pages too) is on the host, and the host may end the VM at once.
                nix::unistd::sync();
                Reply {
                    response: Response::Ok,
                    release: None,
                    after: After::Shutdown,
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Container>> {
        self.containers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends the connection of `session`: a container it created and did not remove goes too
    /// (its host side is gone).
    pub fn end_session(&self, session: &mut Session) {
        if let Some(id) = session.container.take() {
            alog!("the control connection of container {id} closed; removing it");
            self.remove(&id);
        }
    }

    /// Kills `id`'s processes, removes its cgroup, and forgets it and its pending streams.
    fn remove(&self, id: &str) {
        let pids = self.container_pids(id);
        let Some(c) = self.lock().remove(id) else {
            return;
        };
        for pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        self.registry.forget_container(id);
        self.streams.discard_container(id);
        self.sink.detach(id);
        if let Some(cg) = c.cgroup {
            // rmdir succeeds once the killed processes have left (they are reaped by then).
            let deadline = Instant::now() + REMOVE_WAIT;
            while std::fs::remove_dir(&cg).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        alog!("removed container {id}");
    }

    /// Freezes or thaws `id`'s cgroup and waits (bounded) until the kernel says it is done.
    fn freeze(&self, id: &str, frozen: bool) -> Response {
        let Some(cg) = self.lock().get(id).and_then(|c| c.cgroup.clone()) else {
            return error(
                ErrorCode::Unsupported,
                "the container has no cgroup in the guest to freeze",
            );
        };
        let want = if frozen { "1" } else { "0" };
        if let Err(e) = std::fs::write(cg.join("cgroup.freeze"), want) {
            return error(ErrorCode::Other, format!("cannot write cgroup.freeze: {e}"));
        }
        let deadline = Instant::now() + FREEZE_WAIT;
        loop {
            let events = std::fs::read_to_string(cg.join("cgroup.events")).unwrap_or_default();
            if events.lines().any(|l| l == format!("frozen {want}")) {
                return Response::Ok;
            }
            if Instant::now() >= deadline {
                return error(
                    ErrorCode::Other,
                    format!("the container's cgroup did not reach frozen {want} within 5 s"),
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Gives the guest's cards the host interfaces' names, addresses and routes. Only before
    /// the container exists: it is created into this network namespace.
    fn configure_network(
        &self,
        config: &NetworkConfig,
        loopback_dns: Option<std::net::IpAddr>,
    ) -> Response {
        if !self.lock().is_empty() {
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
        let streams = UnlessCreated::new(&self.streams, registry::key(id, INIT_PROCESS));
        let result = self.try_create(id, spec, stdio_spec, privileged);
        match result {
            Ok(pid) => {
                streams.created();
                Response::Created { pid }
            }
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
        if id.is_empty() || id.contains('/') {
            return Err(SetupError::other(format!(
                "invalid container id {id:?} (empty or with a '/')"
            )));
        }
        let mut containers = self.lock();
        #[cfg(test)]
        self.panic_if_asked("create");
        if containers.contains_key(id) {
            return Err(SetupError::new(
                ErrorCode::InvalidState,
                format!("this guest already has a container {id}"),
            ));
        }
        let plan = spec::validate(spec)?;
        let console_size = spec
            .process()
            .as_ref()
            .and_then(|p| p.console_size().as_ref().map(|b| (b.height(), b.width())));
        let init = registry::key(id, INIT_PROCESS);
        let (stdio, pty) = self.take_stdio(&init, stdio_spec)?;
        let cgroup = self.make_cgroup(id, spec);
        let oom = cgroup
            .as_ref()
            .and_then(|cg| crate::oom::watch(id, cg.clone(), self.sink.clone()));
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
        self.registry.add(&init, Entry { pid, pty });
        drop(gate);
        alog!("created container {id}: init pid {pid}");
        let container = Container {
            id: id.to_string(),
            plan,
            init_pid: pid,
            cgroup,
            oom,
            pending_start: Some(prepared),
            privileged,
        };
        containers.insert(container.id.clone(), container);
        Ok(pid)
    }

    fn start(&self, id: &str) -> Reply {
        let mut containers = self.lock();
        match containers.get_mut(id) {
            None => error(ErrorCode::InvalidState, "no container has been created").into(),
            Some(c) => match c.pending_start.take() {
                Some(p) => Reply {
                    response: Response::Ok,
                    release: Some(p),
                    after: After::Nothing,
                },
                None if self
                    .registry
                    .get(&registry::key(id, INIT_PROCESS))
                    .is_some() =>
                {
                    error(ErrorCode::InvalidState, "the container is already started").into()
                }
                None => error(ErrorCode::InvalidState, "the container's init has exited").into(),
            },
        }
    }

    fn exec(&self, id: &str, exec_id: &str, process: &Process, stdio_spec: StdioSpec) -> Reply {
        let streams = UnlessCreated::new(&self.streams, registry::key(id, exec_id));
        let result = self.try_exec(id, exec_id, process, stdio_spec);
        match result {
            Ok(p) => {
                streams.created();
                Reply {
                    response: Response::Created { pid: p.pid },
                    release: Some(p),
                    after: After::Nothing,
                }
            }
            Err(e) => {
                alog!("exec {exec_id} failed: {}", e.message);
                Response::from(e).into()
            }
        }
    }

    fn try_exec(
        &self,
        id: &str,
        exec_id: &str,
        process: &Process,
        stdio_spec: StdioSpec,
    ) -> Result<Prepared, SetupError> {
        let name = registry::key(id, exec_id);
        if exec_id == INIT_PROCESS || exec_id.contains('/') || self.registry.get(&name).is_some() {
            return Err(SetupError::new(
                ErrorCode::InvalidState,
                format!("process id {exec_id} is in use"),
            ));
        }
        let (plan, init_pid, cgroup) = {
            let containers = self.lock();
            let c = containers
                .get(id)
                .ok_or_else(|| SetupError::new(ErrorCode::InvalidState, "no container"))?;
            if self
                .registry
                .get(&registry::key(id, INIT_PROCESS))
                .is_none()
            {
                return Err(SetupError::new(
                    ErrorCode::InvalidState,
                    "the container's init has exited",
                ));
            }
            (c.plan.clone(), c.init_pid, c.cgroup.clone())
        };
        let (stdio, pty) = self.take_stdio(&name, stdio_spec)?;
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
            &name,
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

    /// The cgroup of container `id` in the guest, or the answer saying why there is none.
    fn cgroup_of(&self, id: &str) -> Result<PathBuf, Response> {
        match self.lock().get(id).map(|c| c.cgroup.clone()) {
            None => Err(error(ErrorCode::InvalidState, "no container in this guest")),
            Some(None) => Err(error(
                ErrorCode::Unsupported,
                "the container has no cgroup in the guest (no cgroup2 mounted)",
            )),
            Some(Some(cg)) => Ok(cg),
        }
    }

    fn update_limits(&self, id: &str, memory: Option<u64>, pids: Option<i64>) -> Response {
        let cg = match self.cgroup_of(id) {
            Ok(cg) => cg,
            Err(answer) => return answer,
        };
        match crate::resources::update(&cg, memory, pids) {
            Ok(()) => Response::Ok,
            Err(message) => error(ErrorCode::Other, message),
        }
    }

    fn stats(&self, id: &str) -> Response {
        let cg = match self.cgroup_of(id) {
            Ok(cg) => cg,
            Err(answer) => return answer,
        };
        match crate::resources::stats(&cg) {
            Ok(stats) => Response::Stats { stats },
            Err(message) => error(ErrorCode::Other, message),
        }
    }

    fn signal(&self, id: &str, process: &str, signal: i32, all: bool) -> Response {
        let sig = match nix::sys::signal::Signal::try_from(signal) {
            Ok(s) => s,
            Err(_) => return error(ErrorCode::Other, format!("invalid signal {signal}")),
        };
        let pids = if all {
            self.container_pids(id)
        } else {
            self.registry
                .get(&registry::key(id, process))
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

    fn resize(&self, id: &str, process: &str, rows: u16, cols: u16) -> Response {
        match self.registry.get(&registry::key(id, process)) {
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

    /// Pids of every process of container `id`: its cgroup and those below it if it has one,
    /// else every process in its pid namespace (if it has its own); and the processes the
    /// agent started in it.
    pub fn container_pids(&self, id: &str) -> Vec<i32> {
        let (cgroup, init_pid, has_pidns) = {
            let c = self.lock();
            match c.get(id) {
                None => return Vec::new(),
                Some(c) => (
                    c.cgroup.clone(),
                    c.init_pid,
                    c.plan.creates(oci_spec::runtime::LinuxNamespaceType::Pid),
                ),
            }
        };
        let init = registry::key(id, INIT_PROCESS);
        let mut pids = Vec::new();
        let found = match cgroup {
            Some(cg) => cgroup_pids(&cg, &mut pids),
            None => false,
        };
        if !found && has_pidns && self.registry.get(&init).is_some() {
            if let Ok(ns) = std::fs::read_link(format!("/proc/{init_pid}/ns/pid")) {
                pids = pids_in_namespace(Path::new("/proc"), &ns);
            }
        }
        // The processes the agent started, while they live, wherever they moved themselves
        // (a privileged container may put a process in a cgroup outside its own): the host
        // asks this list whether an exec it waits for still exists.
        for pid in self.registry.pids_of(id) {
            if !pids.contains(&pid) && alive(pid) {
                pids.push(pid);
            }
        }
        pids
    }
}

/// Drops the streams still waiting for a process when its create or exec did not create it:
/// on a refusal, and on the way out of a handler that panicked, so a later request for a
/// process of that name cannot pick up a stream meant for this one.
struct UnlessCreated<'a> {
    streams: &'a StreamTable,
    process: String,
    created: bool,
}

impl<'a> UnlessCreated<'a> {
    fn new(streams: &'a StreamTable, process: String) -> Self {
        UnlessCreated {
            streams,
            process,
            created: false,
        }
    }

    /// The process exists: its streams are its own.
    fn created(mut self) {
        self.created = true;
    }
}

impl Drop for UnlessCreated<'_> {
    fn drop(&mut self) {
        if !self.created {
            self.streams.discard(&self.process);
        }
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
        let mut s = Session::default();
        let mut handle = |r: Request| agent.handle(&mut s, r);
        assert_eq!(code(handle(Request::Start)), ErrorCode::InvalidState);
        let sig = Request::Signal {
            process: "init".into(),
            signal: 15,
            all: false,
        };
        assert_eq!(code(handle(sig)), ErrorCode::NoSuchProcess);
        let resize = Request::Resize {
            process: "x".into(),
            rows: 1,
            cols: 1,
        };
        assert_eq!(code(handle(resize)), ErrorCode::NoSuchProcess);
        let update = Request::UpdateLimits {
            memory: Some(64 << 20),
            pids: None,
        };
        assert_eq!(code(handle(update)), ErrorCode::InvalidState);
        assert!(
            matches!(handle(Request::Processes).response, Response::Processes { pids } if pids.is_empty())
        );
    }
}
