//! The task service containerd talks to: one shim serves every container of a pod.

use crate::console::{self, ConsoleSocket};
use crate::io;
use crate::runtime::Rootcell;
use crate::runtime::Stdio3;
use containerd_shim as shim;
use shim::api::{self, Status};
use shim::monitor::{monitor_subscribe, Subject, Subscription, Topic};
use shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use shim::protos::protobuf::MessageDyn;
use shim::protos::ttrpc::{get_status, Code, Error as TtrpcError};
use shim::publisher::RemotePublisher;
use shim::{Context, ExitSignal, TtrpcContext, TtrpcResult};
use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a process's logging binary has, once the process is deleted, to finish and exit
/// before it is killed (containerd's runc shim waits as long).
const LOGGER_GRACE: Duration = Duration::from_secs(10);

/// How long an exit whose pid is not known yet is kept for the process that will claim it (an
/// exec'd process can exit before its pid file is read).
const UNCLAIMED_TTL: Duration = Duration::from_secs(60);

/// One process: a container's init (the sandbox) or an exec'd one (its relay).
#[derive(Default)]
struct Proc {
    pid: u32,
    status: Option<Status>,
    exit: Option<(u32, Timestamp)>,
    stdin: String,
    stdout: String,
    stderr: String,
    terminal: bool,
    /// An exec's process.json, written at Exec and used at Start.
    process_file: Option<PathBuf>,
    /// The pty master of a process with a terminal.
    console: Option<File>,
    /// The logging binary of a `binary://` stdout, until it exits.
    logger: Option<u32>,
}

struct Container {
    bundle: PathBuf,
    init: Proc,
    execs: HashMap<String, Proc>,
}

#[derive(Default)]
struct State {
    containers: HashMap<String, Container>,
    unclaimed: HashMap<u32, (i32, Instant)>,
}

struct Inner {
    rt: Rootcell,
    publisher: RemotePublisher,
    namespace: String,
    exit: Arc<ExitSignal>,
    state: Mutex<State>,
    changed: Condvar,
}

/// The task service.
#[derive(Clone)]
pub struct Service(Arc<Inner>);

/// What Kill answers for a process that has ended (containerd's ErrNotFound).
fn already_finished() -> TtrpcError {
    reply(Code::NOT_FOUND, "process already finished")
}

/// A failure of the shim or of rootcell (UNKNOWN, logged at error).
fn err(msg: impl Into<String>) -> TtrpcError {
    reply(Code::UNKNOWN, msg)
}

fn not_found(what: &str) -> TtrpcError {
    reply(Code::NOT_FOUND, format!("{what} not found"))
}

/// An error reply with `code`, logged at the level [`level_of`] gives it.
fn reply(code: Code, msg: impl Into<String>) -> TtrpcError {
    let msg = msg.into();
    log::log!(level_of(code), "{msg}");
    TtrpcError::RpcStatus(get_status(code, msg))
}

/// How loudly an error reply with `code` is logged. The answers containerd and its clients get
/// in normal use (a process that has just ended, an id unknown or already taken, a request the
/// container's status does not allow: a kill raced by the exit, a delete of a task already
/// gone) at debug: containerd's runc shim does not log them at all, and at error level they read
/// as the shim's failures. Anything else is the shim's or rootcell's failure: error.
fn level_of(code: Code) -> log::Level {
    match code {
        Code::NOT_FOUND | Code::ALREADY_EXISTS | Code::FAILED_PRECONDITION => log::Level::Debug,
        _ => log::Level::Error,
    }
}

/// The reply to a rootcell command that failed with `msg`, coded as [`rootcell_code`] says.
fn rootcell_failed(msg: String) -> TtrpcError {
    reply(rootcell_code(&msg), msg)
}

/// Whether a failed rootcell `kill` says the container has no live process (runc's words, which
/// both of rootcell's not-running errors end with).
fn says_not_running(msg: &str) -> bool {
    msg.contains("container not running")
}

/// The code of a rootcell error, read from runc's words, which rootcell keeps where callers
/// match on them (runtime/src/error.rs, state.rs), as containerd's runc shim reads runc's: an
/// unknown container is NOT_FOUND, a command its status does not allow FAILED_PRECONDITION,
/// anything else UNKNOWN. The cause is the message's end (rootcell prints its error's chain).
/// The texts are copies; a test feeds the runtime's real error values through this, so a
/// rewording there fails it.
fn rootcell_code(msg: &str) -> Code {
    /// The ends of rootcell's messages for a command the container's status does not allow.
    const WRONG_STATUS: [&str; 4] = [
        "container not running",
        "cannot start a container that has stopped",
        "cannot start an already running container",
        "the container is paused; resume it first",
    ];
    let one_word = |s: &str| !s.is_empty() && !s.contains(char::is_whitespace);
    // `container ID does not exist`
    let unknown = msg
        .strip_suffix(" does not exist")
        .and_then(|m| m.rsplit_once("container "))
        .is_some_and(|(_, id)| one_word(id));
    // `container is STATUS, not WANTED`
    let wrong = msg
        .rsplit_once("container is ")
        .and_then(|(_, rest)| rest.split_once(", not "))
        .is_some_and(|(is, wanted)| one_word(is) && one_word(wanted));
    if unknown {
        Code::NOT_FOUND
    } else if wrong || WRONG_STATUS.iter().any(|w| msg.ends_with(w)) {
        Code::FAILED_PRECONDITION
    } else {
        Code::UNKNOWN
    }
}

fn now() -> Timestamp {
    shim::util::timestamp().unwrap_or_default()
}

impl Service {
    /// The service, with the thread that turns reaped pids into task exits.
    pub fn new(
        rt: Rootcell,
        publisher: RemotePublisher,
        namespace: String,
        exit: Arc<ExitSignal>,
    ) -> Self {
        let s = Service(Arc::new(Inner {
            rt,
            publisher,
            namespace,
            exit,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        }));
        let sub = monitor_subscribe(Topic::Pid).expect("subscribing to exits");
        let me = s.clone();
        std::thread::Builder::new()
            .name("exits".into())
            .spawn(move || forward_exits(sub, |pid, code| me.exited(pid, code)))
            .expect("starting the exit thread");
        s
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, topic: &str, ev: Box<dyn MessageDyn>) {
        if let Err(e) = self
            .0
            .publisher
            .publish(Context::default(), topic, &self.0.namespace, ev)
        {
            log::warn!("publishing {topic}: {e}");
        }
    }

    /// A reaped pid: the exit of a container's init or exec, or one claimed later.
    fn exited(&self, pid: u32, code: i32) {
        let mut st = self.lock();
        st.unclaimed.retain(|_, (_, t)| t.elapsed() < UNCLAIMED_TTL);
        let mut found = None;
        for (cid, c) in st.containers.iter_mut() {
            let logger = std::iter::once(&mut c.init)
                .chain(c.execs.values_mut())
                .find(|p| p.logger == Some(pid));
            if let Some(p) = logger {
                p.logger = None;
                let cid = cid.clone();
                drop(st);
                self.0.changed.notify_all();
                log::info!("{cid}: logging binary (pid {pid}) exited with {code}");
                return;
            }
            if c.init.pid == pid && c.init.exit.is_none() {
                found = Some((cid.clone(), cid.clone(), mark_exit(&mut c.init, code)));
                break;
            }
            if let Some((eid, p)) = c
                .execs
                .iter_mut()
                .find(|(_, p)| p.pid == pid && p.exit.is_none())
            {
                found = Some((cid.clone(), eid.clone(), mark_exit(p, code)));
                break;
            }
        }
        match found {
            Some((cid, id, ts)) => {
                drop(st);
                self.0.changed.notify_all();
                log::info!("{cid} process {id} (pid {pid}) exited with {code}");
                self.publish(
                    "/tasks/exit",
                    Box::new(TaskExit {
                        container_id: cid,
                        id,
                        pid,
                        exit_status: code as u32,
                        exited_at: Some(ts).into(),
                        ..Default::default()
                    }),
                );
            }
            None => {
                st.unclaimed.insert(pid, (code, Instant::now()));
            }
        }
    }

    /// Records the logging binary of a process, unless it already exited.
    fn set_logger(&self, cid: &str, exec: &str, logger: Option<io::Logger>) {
        let Some(io::Logger { pid }) = logger else {
            return;
        };
        let mut st = self.lock();
        if st.unclaimed.remove(&pid).is_some() {
            return;
        }
        if let Some(p) = proc_of(&mut st, cid, exec) {
            p.logger = Some(pid);
        }
    }

    /// Waits (bounded) for the logging binary of a process that has ended to drain what the
    /// process wrote and exit, so that its log is complete when `delete` returns; kills it
    /// after [`LOGGER_GRACE`].
    fn end_logger(&self, cid: &str, exec: &str) {
        let deadline = Instant::now() + LOGGER_GRACE;
        let mut st = self.lock();
        loop {
            let Some(pid) = proc_of(&mut st, cid, exec).and_then(|p| p.logger) else {
                return;
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::warn!(
                    "{cid}: logging binary (pid {pid}) still runs {} s after its process ended: killed",
                    LOGGER_GRACE.as_secs()
                );
                // Its exit has not been seen yet, so (but for the moment between the reaper's
                // wait and that record) the pid is still the logger's.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                return;
            }
            st = self
                .0
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// A pid just learned from a pid file: takes an exit that came before it.
    fn claim(&self, cid: &str, exec: Option<&str>, pid: u32) {
        let mut st = self.lock();
        let early = st.unclaimed.remove(&pid);
        if let Some(c) = st.containers.get_mut(cid) {
            let p = match exec {
                None => Some(&mut c.init),
                Some(e) => c.execs.get_mut(e),
            };
            if let Some(p) = p {
                p.pid = pid;
                p.status = Some(Status::RUNNING);
            }
        }
        drop(st);
        if let Some((code, _)) = early {
            self.exited(pid, code);
        }
    }

    fn with_proc<T>(
        &self,
        id: &str,
        exec_id: &str,
        f: impl FnOnce(&mut Proc, &PathBuf) -> T,
    ) -> TtrpcResult<T> {
        let mut st = self.lock();
        let c = st
            .containers
            .get_mut(id)
            .ok_or_else(|| not_found(&format!("container {id}")))?;
        let bundle = c.bundle.clone();
        let p = if exec_id.is_empty() {
            &mut c.init
        } else {
            c.execs
                .get_mut(exec_id)
                .ok_or_else(|| not_found(&format!("exec {exec_id} of {id}")))?
        };
        Ok(f(p, &bundle))
    }

    /// The stdio a rootcell command gets: the FIFOs themselves (or the pipes of a logging
    /// binary, also returned), or, with a terminal, nothing (the process's stdio is the pty) and
    /// a console socket for the master.
    fn stdio(
        terminal: bool,
        stdin: &str,
        stdout: &str,
        stderr: &str,
        who: &io::LogFor<'_>,
    ) -> std::io::Result<(Stdio3, Option<ConsoleSocket>, Option<io::Logger>)> {
        if terminal {
            let none = Stdio3 {
                stdin: None,
                stdout: None,
                stderr: None,
            };
            return Ok((none, Some(ConsoleSocket::new()?), None));
        }
        let (stdio, logger) = io::open(stdin, stdout, stderr, who)?;
        Ok((stdio, None, logger))
    }

    /// Takes the pty master rootcell sent and relays it to the FIFOs (or to a logging binary,
    /// returned).
    fn attach(
        c: ConsoleSocket,
        stdin: &str,
        stdout: &str,
        who: &io::LogFor<'_>,
    ) -> std::io::Result<(File, Option<io::Logger>)> {
        let master = c.master()?;
        let (out, logger) = io::open_output(stdout, who)?;
        console::relay(&master, stdin, out)?;
        Ok((master, logger))
    }

    fn rootcell(&self, args: &[&str]) -> TtrpcResult<String> {
        self.0.rt.run(args).map_err(rootcell_failed)
    }
}

/// Hands every pid the reaper collected to `exited`, for as long as the shim lives; if that
/// ends, by a panic in `exited` or by the monitor dropping the subscription, ends the shim
/// ([`crate::guard::end_shim`]): an exit for every process is the shim's promise to containerd,
/// and a panic caught and carried on from would lose the exit it was handling, with the shim's
/// state of that process half updated.
fn forward_exits(sub: Subscription, exited: impl Fn(u32, i32)) -> ! {
    const WHAT: &str = "the thread that forwards exits to containerd";
    const LOST: &str = "exits would no longer reach containerd";
    crate::guard::or_end_shim(WHAT, LOST, || {
        while let Ok(e) = sub.rx.recv() {
            if let Subject::Pid(pid) = e.subject {
                exited(pid as u32, e.exit_code);
            }
        }
    });
    crate::guard::end_shim(WHAT, "the exit monitor dropped its subscription", LOST)
}

/// Process `exec` (empty: the init) of container `cid`.
fn proc_of<'a>(st: &'a mut State, cid: &str, exec: &str) -> Option<&'a mut Proc> {
    let c = st.containers.get_mut(cid)?;
    if exec.is_empty() {
        Some(&mut c.init)
    } else {
        c.execs.get_mut(exec)
    }
}

fn mark_exit(p: &mut Proc, code: i32) -> Timestamp {
    let ts = now();
    p.exit = Some((code as u32, ts.clone()));
    p.status = Some(Status::STOPPED);
    ts
}

/// containerd's cgroup v1 metrics (what `ctr task metrics` and CRI's ContainerStats read) from
/// one line of `rootcell events --stats`.
fn metrics_from_events(line: &str) -> Result<shim::protos::cgroups::metrics::Metrics, String> {
    use shim::protos::cgroups::metrics::{CPUStat, CPUUsage, MemoryEntry, MemoryStat, PidsStat};
    let v: serde_json::Value =
        serde_json::from_str(line.trim()).map_err(|e| format!("bad stats from rootcell: {e}"))?;
    let d = &v["data"];
    let n = |x: &serde_json::Value| x.as_u64().unwrap_or(0);
    let mut m = shim::protos::cgroups::metrics::Metrics::new();
    m.memory = Some(MemoryStat {
        usage: Some(MemoryEntry {
            usage: n(&d["memory"]["usage"]["usage"]),
            limit: n(&d["memory"]["usage"]["limit"]),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    })
    .into();
    m.cpu = Some(CPUStat {
        usage: Some(CPUUsage {
            total: n(&d["cpu"]["usage"]["total"]),
            user: n(&d["cpu"]["usage"]["user"]),
            kernel: n(&d["cpu"]["usage"]["kernel"]),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    })
    .into();
    m.pids = Some(PidsStat {
        current: n(&d["pids"]["current"]),
        limit: n(&d["pids"]["limit"]),
        ..Default::default()
    })
    .into();
    Ok(m)
}

fn read_pid(path: &std::path::Path) -> Result<u32, String> {
    std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read pid file {}: {e}", path.display()))?
        .trim()
        .parse()
        .map_err(|e| format!("bad pid file {}: {e}", path.display()))
}

impl shim::Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let id = req.id.clone();
        let bundle = PathBuf::from(&req.bundle);
        if !req.checkpoint.is_empty() {
            return Err(err("checkpoint/restore is not supported by rootcell"));
        }
        let rootfs = bundle.join("rootfs");
        if !req.rootfs.is_empty() {
            let _ = std::fs::create_dir_all(&rootfs);
            for m in &req.rootfs {
                shim::mount::mount_rootfs(
                    Some(m.type_.as_str()),
                    Some(m.source.as_str()),
                    &m.options,
                    &rootfs,
                )
                .map_err(|e| {
                    io::unmount_rootfs(&rootfs);
                    err(format!("cannot mount the rootfs of {id}: {e}"))
                })?;
            }
        }
        self.lock().containers.insert(
            id.clone(),
            Container {
                bundle: bundle.clone(),
                init: Proc {
                    status: Some(Status::CREATED),
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                },
                execs: HashMap::new(),
            },
        );
        let fail = |msg: String| {
            self.lock().containers.remove(&id);
            io::unmount_rootfs(&rootfs);
            err(msg)
        };
        let who = io::LogFor {
            id: &id,
            namespace: &self.0.namespace,
        };
        let (stdio, console, logger) =
            Self::stdio(req.terminal, &req.stdin, &req.stdout, &req.stderr, &who)
                .map_err(|e| fail(format!("stdio of {id}: {e}")))?;
        self.set_logger(&id, "", logger);
        let pid_file = bundle.join("init.pid");
        let mut args = vec![
            "create".to_string(),
            "--bundle".into(),
            bundle.display().to_string(),
            "--pid-file".into(),
            pid_file.display().to_string(),
        ];
        if let Some(c) = &console {
            args.extend(["--console-socket".into(), c.path().display().to_string()]);
        }
        args.push(id.clone());
        self.0
            .rt
            .run_with_stdio(&args, stdio, &bundle.join("log.json"))
            .map_err(|e| fail(format!("create {id}: {e}")))?;
        let pid = read_pid(&pid_file).map_err(fail)?;
        if let Some(c) = console {
            let (master, logger) = Self::attach(c, &req.stdin, &req.stdout, &who)
                .map_err(|e| fail(format!("terminal of {id}: {e}")))?;
            self.with_proc(&id, "", |p, _| p.console = Some(master))?;
            self.set_logger(&id, "", logger);
        }
        self.claim(&id, None, pid);
        let me = self.clone();
        let cid = id.clone();
        if !crate::oom::watch(pid, move || {
            log::info!("{cid}: OOM kill");
            me.publish(
                "/tasks/oom",
                Box::new(TaskOOM {
                    container_id: cid.clone(),
                    ..Default::default()
                }),
            );
        }) {
            log::info!("{id}: no v1 memory cgroup to watch for OOM kills");
        }
        self.with_proc(&id, "", |p, _| {
            if p.exit.is_none() {
                p.status = Some(Status::CREATED);
            }
        })?;
        self.publish(
            "/tasks/create",
            Box::new(TaskCreate {
                container_id: id.clone(),
                bundle: req.bundle.clone(),
                pid,
                ..Default::default()
            }),
        );
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let id = req.id.as_str();
        if req.exec_id.is_empty() {
            self.rootcell(&["start", id])?;
            let pid = self.with_proc(id, "", |p, _| {
                if p.exit.is_none() {
                    p.status = Some(Status::RUNNING);
                }
                p.pid
            })?;
            self.publish(
                "/tasks/start",
                Box::new(TaskStart {
                    container_id: id.to_string(),
                    pid,
                    ..Default::default()
                }),
            );
            return Ok(api::StartResponse {
                pid,
                ..Default::default()
            });
        }
        let eid = req.exec_id.as_str();
        let (file, stdin, stdout, stderr, terminal, bundle) = self.with_proc(id, eid, |p, b| {
            (
                p.process_file.clone(),
                p.stdin.clone(),
                p.stdout.clone(),
                p.stderr.clone(),
                p.terminal,
                b.clone(),
            )
        })?;
        let file = file.ok_or_else(|| err(format!("exec {eid} of {id} has no process")))?;
        let who = io::LogFor {
            id: eid,
            namespace: &self.0.namespace,
        };
        let (stdio, console, logger) = Self::stdio(terminal, &stdin, &stdout, &stderr, &who)
            .map_err(|e| err(format!("stdio of exec {eid}: {e}")))?;
        self.set_logger(id, eid, logger);
        let pid_file = bundle.join(format!("exec-{eid}.pid"));
        let mut args = vec![
            "exec".to_string(),
            "--detach".into(),
            "--process".into(),
            file.display().to_string(),
            "--pid-file".into(),
            pid_file.display().to_string(),
        ];
        if let Some(c) = &console {
            args.extend(["--console-socket".into(), c.path().display().to_string()]);
        }
        args.push(id.to_string());
        self.0
            .rt
            .run_with_stdio(&args, stdio, &bundle.join(format!("exec-{eid}.log.json")))
            .map_err(|e| err(format!("exec {eid} in {id}: {e}")))?;
        let pid = read_pid(&pid_file).map_err(err)?;
        if let Some(c) = console {
            let (master, logger) = Self::attach(c, &stdin, &stdout, &who)
                .map_err(|e| err(format!("terminal of exec {eid}: {e}")))?;
            self.with_proc(id, eid, |p, _| p.console = Some(master))?;
            self.set_logger(id, eid, logger);
        }
        self.claim(id, Some(eid), pid);
        self.publish(
            "/tasks/exec-started",
            Box::new(TaskExecStarted {
                container_id: id.to_string(),
                exec_id: eid.to_string(),
                pid,
                ..Default::default()
            }),
        );
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        self.with_proc(&req.id, &req.exec_id, |p, b| {
            let mut r = api::StateResponse {
                id: if req.exec_id.is_empty() {
                    req.id.clone()
                } else {
                    req.exec_id.clone()
                },
                exec_id: req.exec_id.clone(),
                bundle: b.display().to_string(),
                pid: p.pid,
                stdin: p.stdin.clone(),
                stdout: p.stdout.clone(),
                stderr: p.stderr.clone(),
                terminal: p.terminal,
                ..Default::default()
            };
            r.set_status(p.status.unwrap_or(Status::UNKNOWN));
            if let Some((code, ts)) = &p.exit {
                r.exit_status = *code;
                r.exited_at = Some(ts.clone()).into();
            }
            r
        })
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let (pid, done) =
            self.with_proc(&req.id, &req.exec_id, |p, _| (p.pid, p.exit.is_some()))?;
        if done {
            return Err(already_finished());
        }
        if req.exec_id.is_empty() {
            let sig = req.signal.to_string();
            let args: &[&str] = if req.all {
                &["kill", "--all", &req.id, &sig]
            } else {
                &["kill", &req.id, &sig]
            };
            // rootcell says runc's "container not running" when the guest is gone before the
            // sandbox's exit reached us: NOT_FOUND, as containerd's runc shim answers it.
            self.0.rt.run(args).map_err(|m| {
                if says_not_running(&m) {
                    already_finished()
                } else {
                    rootcell_failed(m)
                }
            })?;
        } else if pid > 0 {
            // The exec relay forwards the signals it gets to its process in the guest.
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::try_from(req.signal as i32)
                    .map_err(|e| err(e.to_string()))?,
            )
            .map_err(|e| match e {
                // Gone before its exit reached us: as containerd's runc shim (checkKillError).
                nix::errno::Errno::ESRCH => already_finished(),
                e => err(format!("kill exec {}: {e}", req.exec_id)),
            })?;
        }
        Ok(api::Empty::new())
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let id = req.id.as_str();
        if !req.exec_id.is_empty() {
            self.end_logger(id, &req.exec_id);
            let p = {
                let mut st = self.lock();
                let c = st.containers.get_mut(id).ok_or_else(|| not_found(id))?;
                c.execs
                    .remove(&req.exec_id)
                    .ok_or_else(|| not_found(&req.exec_id))?
            };
            if let Some(f) = &p.process_file {
                let _ = std::fs::remove_file(f);
            }
            let (code, ts) = p.exit.clone().unwrap_or((0, now()));
            return Ok(api::DeleteResponse {
                pid: p.pid,
                exit_status: code,
                exited_at: Some(ts).into(),
                ..Default::default()
            });
        }
        let bundle = self.with_proc(id, "", |_, b| b.clone())?;
        self.rootcell(&["delete", "--force", id])?;
        self.end_logger(id, "");
        io::unmount_rootfs(&bundle.join("rootfs"));
        let c = self
            .lock()
            .containers
            .remove(id)
            .ok_or_else(|| not_found(id))?;
        let (code, ts) = c
            .init
            .exit
            .clone()
            .unwrap_or((128 + libc::SIGKILL as u32, now()));
        self.publish(
            "/tasks/delete",
            Box::new(TaskDelete {
                container_id: id.to_string(),
                pid: c.init.pid,
                exit_status: code,
                exited_at: Some(ts.clone()).into(),
                ..Default::default()
            }),
        );
        Ok(api::DeleteResponse {
            pid: c.init.pid,
            exit_status: code,
            exited_at: Some(ts).into(),
            ..Default::default()
        })
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let bundle = self.with_proc(&req.id, "", |_, b| b.clone())?;
        let file = bundle.join(format!("exec-{}.process.json", req.exec_id));
        std::fs::write(&file, &req.spec.value)
            .map_err(|e| err(format!("exec {}: {e}", req.exec_id)))?;
        {
            let mut st = self.lock();
            let c = st
                .containers
                .get_mut(&req.id)
                .ok_or_else(|| not_found(&req.id))?;
            if c.execs.contains_key(&req.exec_id) {
                return Err(reply(
                    Code::ALREADY_EXISTS,
                    format!("exec {} already exists", req.exec_id),
                ));
            }
            c.execs.insert(
                req.exec_id.clone(),
                Proc {
                    status: Some(Status::CREATED),
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    process_file: Some(file),
                    ..Default::default()
                },
            );
        }
        self.publish(
            "/tasks/exec-added",
            Box::new(TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        );
        Ok(api::Empty::new())
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let r = self.with_proc(&req.id, &req.exec_id, |p, _| {
            p.console
                .as_ref()
                .map(|m| console::resize(m, req.width, req.height))
        })?;
        match r {
            Some(Err(e)) => Err(err(format!("resize {}: {e}", req.id))),
            // A process without a terminal has nothing to resize.
            _ => Ok(api::Empty::new()),
        }
    }

    fn close_io(&self, _ctx: &TtrpcContext, _req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        // The stdin copier closes the container's stdin when containerd's writer closes the
        // FIFO, which is what follows a CloseIO.
        Ok(api::Empty::new())
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.rootcell(&["pause", &req.id])?;
        self.with_proc(&req.id, "", |p, _| p.status = Some(Status::PAUSED))?;
        self.publish(
            "/tasks/paused",
            Box::new(TaskPaused {
                container_id: req.id.clone(),
                ..Default::default()
            }),
        );
        Ok(api::Empty::new())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        self.rootcell(&["resume", &req.id])?;
        self.with_proc(&req.id, "", |p, _| p.status = Some(Status::RUNNING))?;
        self.publish(
            "/tasks/resumed",
            Box::new(TaskResumed {
                container_id: req.id.clone(),
                ..Default::default()
            }),
        );
        Ok(api::Empty::new())
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        let bundle = self.with_proc(&req.id, "", |_, b| b.clone())?;
        let file = bundle.join("update-resources.json");
        std::fs::write(&file, &req.resources.value).map_err(|e| err(e.to_string()))?;
        let r = self.rootcell(&[
            "update",
            "--resources",
            &file.display().to_string(),
            &req.id,
        ]);
        let _ = std::fs::remove_file(&file);
        r.map(|_| api::Empty::new())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let mut st = self.lock();
        loop {
            let c = st
                .containers
                .get(&req.id)
                .ok_or_else(|| not_found(&req.id))?;
            let p = if req.exec_id.is_empty() {
                Some(&c.init)
            } else {
                c.execs.get(&req.exec_id)
            };
            let p = p.ok_or_else(|| not_found(&req.exec_id))?;
            if let Some((code, ts)) = &p.exit {
                return Ok(api::WaitResponse {
                    exit_status: *code,
                    exited_at: Some(ts.clone()).into(),
                    ..Default::default()
                });
            }
            st = self.0.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let out = self.rootcell(&["ps", "--format", "json", &req.id])?;
        let pids: Vec<u32> = serde_json::from_str(&out).unwrap_or_default();
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| shim::protos::types::task::ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        self.with_proc(&req.id, "", |_, _| ())?;
        // The container's own usage, from its cgroup in the guest (runc's `events --stats`
        // shape), not the VM's host cgroup, which holds the whole VM.
        let out = self.rootcell(&["events", "--stats", &req.id])?;
        let m = metrics_from_events(&out).map_err(|e| err(format!("stats of {}: {e}", req.id)))?;
        let any = shim::util::convert_to_any(Box::new(m)).map_err(|e| err(e.to_string()))?;
        Ok(api::StatsResponse {
            stats: Some(any).into(),
            ..Default::default()
        })
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self.with_proc(&req.id, "", |p, _| p.pid).unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        // One shim serves a whole pod: it ends with the last container.
        if self.lock().containers.is_empty() {
            self.0.exit.signal();
        }
        Ok(api::Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_come_from_rootcells_events_stats_line() {
        let line = r#"{"type":"stats","id":"c","data":{"cpu":{"usage":{"total":3000,"user":2000,"kernel":1000}},"memory":{"usage":{"usage":4096,"limit":67108864}},"pids":{"current":2,"limit":0}}}"#;
        let m = metrics_from_events(line).unwrap();
        assert_eq!(m.memory.usage.usage, 4096);
        assert_eq!(m.memory.usage.limit, 64 << 20);
        assert_eq!(m.cpu.usage.total, 3000);
        assert_eq!(m.cpu.usage.kernel, 1000);
        assert_eq!((m.pids.current, m.pids.limit), (2, 0));
        assert!(metrics_from_events("not json").is_err());
    }

    /// rootcell's messages (their texts as runtime/src/error.rs and state.rs print them, after
    /// the context rootcell puts before them) get the codes containerd's runc shim gives runc's.
    #[test]
    fn rootcell_errors_are_coded_as_runc_errors_are() {
        for (msg, code) in [
            ("container c1 does not exist", Code::NOT_FOUND),
            ("pause c1: container c1 does not exist", Code::NOT_FOUND),
            (
                "cannot signal container c1: container not running",
                Code::FAILED_PRECONDITION,
            ),
            (
                "cannot start a container that has stopped",
                Code::FAILED_PRECONDITION,
            ),
            (
                "cannot start an already running container",
                Code::FAILED_PRECONDITION,
            ),
            (
                "the container is paused; resume it first",
                Code::FAILED_PRECONDITION,
            ),
            (
                "pause c1: container is stopped, not running",
                Code::FAILED_PRECONDITION,
            ),
            // Real failures, even those that share a word with the above.
            (
                "bundle /b: source of mounts[0] (destination /x) does not exist",
                Code::UNKNOWN,
            ),
            (
                "the image of container c1 was removed: its root does not exist",
                Code::UNKNOWN,
            ),
            ("the container is gone, not running anymore", Code::UNKNOWN),
            ("agent connection closed", Code::UNKNOWN),
            ("rootcell ps exited with 1", Code::UNKNOWN),
        ] {
            assert_eq!(rootcell_code(msg), code, "{msg}");
        }
    }

    /// The runtime's own error values, printed as rootcell prints them (after its context), get
    /// the intended codes: this fails when a rewording in runtime/src (error.rs, state.rs) would
    /// turn an expected answer back into UNKNOWN logged at error. The matches are exhaustive, so
    /// a new variant of either error does not compile here until its code is chosen.
    #[test]
    fn the_runtimes_real_error_texts_get_their_codes() {
        use rootcell_runtime::error::RuntimeError;
        use rootcell_runtime::state::{Action, StateError, Status};
        fn intended_state(e: &StateError) -> Code {
            match e {
                StateError::StartStopped
                | StateError::StartRunning
                | StateError::NotRunning
                | StateError::Paused
                | StateError::Wrong { .. } => Code::FAILED_PRECONDITION,
            }
        }
        fn intended_runtime(e: &RuntimeError) -> Code {
            match e {
                RuntimeError::NotExist(_) => Code::NOT_FOUND,
                RuntimeError::NotRunning(_)
                | RuntimeError::StartStopped
                | RuntimeError::StartRunning => Code::FAILED_PRECONDITION,
                // runc's create of a taken id, a delete of a live container (without --force):
                // containerd's runc shim passes these on as UNKNOWN too.
                RuntimeError::Exists(_)
                | RuntimeError::NotStopped(..)
                | RuntimeError::InvalidId(_)
                | RuntimeError::InvalidSignal(_)
                | RuntimeError::Process { .. }
                | RuntimeError::Interrupted { .. }
                | RuntimeError::Bundle { .. }
                | RuntimeError::Unsupported { .. } => Code::UNKNOWN,
            }
        }
        // Every status error the lifecycle's rules give (each status, each action).
        use Status::*;
        let statuses = [Creating, Created, Running, Paused, Stopped];
        let actions = [
            Action::Start,
            Action::Exec,
            Action::Signal,
            Action::Pause,
            Action::Resume,
            Action::Update,
        ];
        let mut state_errors: Vec<StateError> = statuses
            .iter()
            .flat_map(|s| actions.iter().filter_map(|a| s.check(*a).err()))
            .collect();
        state_errors.dedup();
        for kind in [
            StateError::StartStopped,
            StateError::StartRunning,
            StateError::NotRunning,
            StateError::Paused,
        ] {
            assert!(state_errors.contains(&kind), "{kind:?} not produced");
        }
        for e in &state_errors {
            for msg in [e.to_string(), format!("pause c1: {e}")] {
                assert_eq!(rootcell_code(&msg), intended_state(e), "{msg}");
            }
        }
        let runtime_errors = [
            RuntimeError::NotExist("c1".into()),
            RuntimeError::NotRunning("c1".into()),
            RuntimeError::StartStopped,
            RuntimeError::StartRunning,
            RuntimeError::Exists("c1".into()),
            RuntimeError::NotStopped("c1".into(), "it is running".into()),
            RuntimeError::InvalidId("c/1".into()),
            RuntimeError::InvalidSignal("SIGFOO".into()),
            RuntimeError::Process {
                msg: "exec: \"nope\": executable file not found in $PATH".into(),
                status: 127,
            },
            RuntimeError::Interrupted {
                signal: libc::SIGTERM,
                id: "c1".into(),
                secs: 1.0,
            },
            RuntimeError::Bundle {
                path: "/b".into(),
                msg: "source of mounts[0] (destination /x) does not exist".into(),
            },
            RuntimeError::Unsupported {
                field: "linux.intelRdt".into(),
                msg: "not supported".into(),
            },
        ];
        for e in &runtime_errors {
            for msg in [e.to_string(), format!("start c1: {e}")] {
                assert_eq!(rootcell_code(&msg), intended_runtime(e), "{msg}");
            }
        }
        // A kill of a container whose process has ended is 'process already finished'.
        assert!(says_not_running(
            &RuntimeError::NotRunning("c1".into()).to_string()
        ));
        assert!(says_not_running(&StateError::NotRunning.to_string()));
    }

    /// Records the log lines of this test binary (the shim's logger is containerd-shim's, set
    /// up in main only).
    struct Capture(Mutex<Vec<(log::Level, String)>>);

    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }
        fn log(&self, r: &log::Record) {
            let line = (r.level(), r.args().to_string());
            self.0.lock().unwrap().push(line);
        }
        fn flush(&self) {}
    }

    /// Expected answers to a client (a kill after the exit, an unknown id, an exec id taken, a
    /// status that does not allow the request) are logged at debug, real failures at error.
    #[test]
    fn expected_client_errors_are_logged_quietly_and_failures_loudly() {
        static CAPTURE: Capture = Capture(Mutex::new(Vec::new()));
        log::set_logger(&CAPTURE).unwrap();
        log::set_max_level(log::LevelFilter::Trace);
        let replies = [
            already_finished(),
            not_found("container t-gone"),
            reply(Code::ALREADY_EXISTS, "exec t-e1 already exists"),
            rootcell_failed("t-pause: container is stopped, not running".into()),
            err("t-cannot mount the rootfs"),
            rootcell_failed("t-agent connection closed".into()),
        ];
        let codes: Vec<Code> = replies
            .iter()
            .map(|e| match e {
                TtrpcError::RpcStatus(s) => s.code(),
                other => panic!("not a status: {other:?}"),
            })
            .collect();
        use Code::*;
        assert_eq!(
            codes,
            [
                NOT_FOUND,
                NOT_FOUND,
                ALREADY_EXISTS,
                FAILED_PRECONDITION,
                UNKNOWN,
                UNKNOWN
            ]
        );
        // Only this test's lines: the other tests run at the same time, and some log.
        let lines: Vec<_> = CAPTURE
            .0
            .lock()
            .unwrap()
            .clone()
            .into_iter()
            .filter(|(_, m)| {
                m.starts_with("t-") || m.contains(" t-") || m == "process already finished"
            })
            .collect();
        use log::Level::{Debug, Error};
        assert_eq!(
            lines,
            [
                (Debug, "process already finished".to_string()),
                (Debug, "container t-gone not found".into()),
                (Debug, "exec t-e1 already exists".into()),
                (Debug, "t-pause: container is stopped, not running".into()),
                (Error, "t-cannot mount the rootfs".into()),
                (Error, "t-agent connection closed".into()),
            ]
        );
    }

    /// The exit thread's loop over containerd-shim's real exit monitor: exits are forwarded
    /// until one's handling panics; then the shim aborts, after that panic, rather than living
    /// on without an exit thread. Run in a process of its own, which it ends.
    #[test]
    fn a_panic_in_the_exit_thread_ends_the_shim() {
        use shim::monitor::monitor_notify_by_pid;
        use std::os::unix::process::ExitStatusExt;
        const CHILD: &str = "RC_SHIM_EXIT_THREAD_TEST";
        if std::env::var_os(CHILD).is_some() {
            let (tx, rx) = std::sync::mpsc::channel();
            let sub = monitor_subscribe(Topic::Pid).unwrap();
            std::thread::spawn(move || {
                forward_exits(sub, |pid, code| {
                    assert_ne!(pid, 2, "no container has pid 2");
                    tx.send((pid, code)).unwrap();
                })
            });
            monitor_notify_by_pid(1, 3).unwrap();
            let first = rx.recv_timeout(Duration::from_secs(10));
            println!("forwarded {first:?}");
            monitor_notify_by_pid(2, 0).unwrap();
            std::thread::sleep(Duration::from_secs(10));
            println!("still alive 10 s after the exit thread's panic");
            return;
        }
        let name = "service::tests::a_panic_in_the_exit_thread_ends_the_shim";
        let o = rootcell_test_support::rerun_test_alone(name, CHILD, "1");
        let out = String::from_utf8_lossy(&o.stdout);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(out.contains("forwarded Ok((1, 3))"), "{out}\n{err}");
        assert!(err.contains("no container has pid 2"), "{out}\n{err}");
        assert_eq!(o.status.signal(), Some(libc::SIGABRT), "{out}\n{err}");
    }
}
