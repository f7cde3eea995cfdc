//! Runs the real agent binary on this host (`--unix DIR`, as root) and drives it with the wire
//! protocol exactly as the host runtime does over vsock: streams first, then Create/Start/Exec,
//! stdio bytes on the stream sockets, Exit events on the control connection.

use rootcell_protocol::{
    recv, send, AgentMessage, ErrorCode, Event, HostMessage, Request, Response, StdioSpec, Stream,
    StreamHello,
};
use serde_json::json;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

struct AgentProc {
    child: Child,
    dir: tempfile::TempDir,
    rootfs: PathBuf,
    ctl: Control,
}

/// One control connection: requests, and the events that arrived on it.
struct Control {
    control: UnixStream,
    next_id: u64,
    events: Vec<Event>,
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rootfs(dir: &Path) -> PathBuf {
    let rootfs = dir.join("rootfs");
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    for a in [
        "sh", "echo", "cat", "sleep", "stty", "tty", "hostname", "wc", "head", "ls", "grep", "kill",
    ] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(a)).unwrap();
    }
    rootfs
}

impl AgentProc {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = rootfs(dir.path());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rootcell-agent"));
        cmd.arg("--unix").arg(dir.path());
        // SAFETY: prctl only; the agent must not outlive a test that dies early.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let child = cmd.spawn().unwrap();
        let ctl = Control::connect(dir.path());
        let mut a = AgentProc {
            child,
            dir,
            rootfs,
            ctl,
        };
        match a.request(Request::Hello {
            version: rootcell_protocol::PROTOCOL_VERSION,
        }) {
            Response::Hello {
                version,
                kernel_release,
            } => {
                assert_eq!(version, rootcell_protocol::PROTOCOL_VERSION);
                assert!(!kernel_release.is_empty());
            }
            other => panic!("bad hello answer {other:?}"),
        }
        a
    }

    /// Another control connection, as the host side of a second container in the VM opens.
    fn connect(&self) -> Control {
        Control::connect(self.dir.path())
    }

    fn request(&mut self, request: Request) -> Response {
        self.ctl.request(request)
    }

    fn wait_exit(&mut self, process: &str) -> i32 {
        self.ctl.wait_exit(process)
    }
}

impl Control {
    fn connect(dir: &Path) -> Self {
        let sock = dir.join("control.sock");
        let deadline = Instant::now() + Duration::from_secs(10);
        let control = loop {
            if let Ok(s) = UnixStream::connect(&sock) {
                break s;
            }
            assert!(Instant::now() < deadline, "agent did not listen");
            std::thread::sleep(Duration::from_millis(20));
        };
        control
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Control {
            control,
            next_id: 1,
            events: Vec::new(),
        }
    }

    fn request(&mut self, request: Request) -> Response {
        let id = self.next_id;
        self.next_id += 1;
        send(&mut self.control, &HostMessage { id, request }).unwrap();
        loop {
            match recv::<_, AgentMessage>(&mut self.control)
                .unwrap()
                .expect("agent closed control")
            {
                AgentMessage::Response { id: got, result } => {
                    assert_eq!(got, id);
                    return result;
                }
                AgentMessage::Event { event } => self.events.push(event),
            }
        }
    }

    fn wait_exit(&mut self, process: &str) -> i32 {
        loop {
            if let Some(i) = self
                .events
                .iter()
                .position(|e| matches!(e, Event::Exit { process: p, .. } if p == process))
            {
                let Event::Exit { status, .. } = self.events.remove(i) else {
                    unreachable!()
                };
                return status;
            }
            match recv::<_, AgentMessage>(&mut self.control)
                .unwrap()
                .expect("agent closed control")
            {
                AgentMessage::Event { event } => self.events.push(event),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

impl AgentProc {
    /// A stream for `process` of container `container`.
    fn stream(&self, container: &str, process: &str, stream: Stream) -> UnixStream {
        let mut s = UnixStream::connect(self.dir.path().join("stream.sock")).unwrap();
        send(
            &mut s,
            &StreamHello {
                container: container.into(),
                process: process.into(),
                stream,
            },
        )
        .unwrap();
        s
    }

    fn spec(&self, args: &[&str], terminal: bool) -> Box<oci_spec::runtime::Spec> {
        Box::new(
            serde_json::from_value(json!({
                "ociVersion": "1.0.2",
                "root": {"path": self.rootfs},
                "hostname": "proto",
                "process": {"args": args, "cwd": "/", "terminal": terminal, "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}},
                "mounts": [
                    {"destination": "/proc", "type": "proc", "source": "proc"},
                    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["mode=755"]},
                    {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["newinstance", "ptmxmode=0666"]},
                ],
                "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}, {"type": "ipc"}, {"type": "network"}]}
            }))
            .unwrap(),
        )
    }
}

fn read_all(mut s: UnixStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn run_stdio_exec_signal_and_shutdown() {
    let mut a = AgentProc::start();
    // Streams first, as the host does; stdin is piped through `cat`.
    let mut stdin = a.stream("c1", "init", Stream::Stdin);
    let stdout = a.stream("c1", "init", Stream::Stdout);
    let stderr = a.stream("c1", "init", Stream::Stderr);
    let spec = a.spec(
        &["sh", "-c", "hostname; cat; echo err >&2; sleep 30"],
        false,
    );
    let stdio = StdioSpec {
        stdin: true,
        stdout: true,
        stderr: true,
        terminal: false,
    };
    let pid = match a.request(Request::Create {
        container_id: "c1".into(),
        spec,
        stdio,
        privileged: false,
    }) {
        Response::Created { pid } => pid,
        other => panic!("create failed: {other:?}"),
    };
    assert!(pid > 1);
    assert_eq!(a.request(Request::Start), Response::Ok);
    let payload = vec![b'x'; 1 << 20];
    let writer = std::thread::spawn(move || {
        stdin.write_all(&vec![b'x'; 1 << 20]).unwrap();
        // The host half-closes: the process sees EOF on stdin.
        stdin.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut stdout = stdout;
    stdout
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut first = vec![0u8; 6 + payload.len()];
    stdout.read_exact(&mut first).unwrap();
    assert_eq!(&first[..6], b"proto\n");
    assert!(first[6..].iter().all(|&b| b == b'x'));
    writer.join().unwrap();
    let mut err = [0u8; 4];
    let mut stderr = stderr;
    stderr.read_exact(&mut err).unwrap();
    assert_eq!(&err, b"err\n");

    // Exec inside the running container, with its own stdout.
    let exec_out = a.stream("c1", "e1", Stream::Stdout);
    let process = Box::new(
        serde_json::from_value(json!({"args": ["sh", "-c", "hostname; exit 5"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}}))
            .unwrap(),
    );
    let stdio = StdioSpec {
        stdout: true,
        ..Default::default()
    };
    assert!(matches!(
        a.request(Request::Exec {
            exec_id: "e1".into(),
            process,
            stdio
        }),
        Response::Created { .. }
    ));
    assert_eq!(a.wait_exit("e1"), 5);
    assert_eq!(read_all(exec_out), "proto\n");

    // Missing programs are classified for the host's 127.
    let process = Box::new(
        serde_json::from_value(json!({"args": ["nope"], "cwd": "/", "user": {"uid": 0, "gid": 0}}))
            .unwrap(),
    );
    match a.request(Request::Exec {
        exec_id: "e2".into(),
        process,
        stdio: StdioSpec::default(),
    }) {
        Response::Error { code, message } => {
            assert_eq!(code, ErrorCode::NotFound);
            assert!(
                message.contains("executable file not found in $PATH"),
                "{message}"
            );
        }
        other => panic!("expected NotFound, got {other:?}"),
    }

    match a.request(Request::Processes) {
        Response::Processes { pids } => assert!(pids.contains(&pid), "{pids:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        a.request(Request::Signal {
            process: "init".into(),
            signal: 9,
            all: true
        }),
        Response::Ok
    );
    assert_eq!(a.wait_exit("init"), 137);
    // Stdout EOF arrives once the process (and its children) are gone.
    read_all(stdout);
    match a.request(Request::Signal {
        process: "init".into(),
        signal: 15,
        all: false,
    }) {
        Response::Error { code, .. } => assert_eq!(code, ErrorCode::NoSuchProcess),
        other => panic!("{other:?}"),
    }
    assert_eq!(a.request(Request::Shutdown), Response::Ok);
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "agent did not exit on Shutdown");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn terminal_process_with_resize() {
    let mut a = AgentProc::start();
    let mut pty = a.stream("t", "init", Stream::Pty);
    let spec = a.spec(
        &[
            "sh",
            "-c",
            "read line; stty size; tty; echo got:$line; exit 3",
        ],
        true,
    );
    let stdio = StdioSpec {
        terminal: true,
        ..Default::default()
    };
    assert!(matches!(
        a.request(Request::Create {
            container_id: "t".into(),
            spec,
            stdio,
            privileged: false,
        }),
        Response::Created { .. }
    ));
    assert_eq!(
        a.request(Request::Resize {
            process: "init".into(),
            rows: 33,
            cols: 101
        }),
        Response::Ok
    );
    assert_eq!(a.request(Request::Start), Response::Ok);
    pty.write_all(b"hello\n").unwrap();
    assert_eq!(a.wait_exit("init"), 3);
    let out = read_all(pty);
    assert!(out.contains("33 101"), "{out:?}");
    assert!(
        out.contains("/dev/pts/0") || out.contains("/dev/console"),
        "{out:?}"
    );
    assert!(out.contains("got:hello"), "{out:?}");
}

#[test]
fn create_errors_are_classified() {
    let mut a = AgentProc::start();
    let spec = a.spec(&["/bin/missing"], false);
    match a.request(Request::Create {
        container_id: "x".into(),
        spec,
        stdio: StdioSpec::default(),
        privileged: false,
    }) {
        Response::Error { code, .. } => assert_eq!(code, ErrorCode::NotFound),
        other => panic!("{other:?}"),
    }
    let mut spec = a.spec(&["sh"], false);
    let mut linux = spec.linux().clone().unwrap();
    linux.set_uid_mappings(Some(vec![serde_json::from_value(
        json!({"containerID": 0, "hostID": 1000, "size": 1}),
    )
    .unwrap()]));
    spec.set_linux(Some(linux));
    match a.request(Request::Create {
        container_id: "x".into(),
        spec,
        stdio: StdioSpec::default(),
        privileged: false,
    }) {
        Response::Error { code, .. } => assert_eq!(code, ErrorCode::Unsupported),
        other => panic!("{other:?}"),
    }
    // Announced streams that never connect fail the request instead of hanging it.
    let spec = a.spec(&["sh"], false);
    let stdio = StdioSpec {
        stdout: true,
        ..Default::default()
    };
    let t = Instant::now();
    match a.request(Request::Create {
        container_id: "x".into(),
        spec,
        stdio,
        privileged: false,
    }) {
        Response::Error { code, .. } => assert_eq!(code, ErrorCode::Other),
        other => panic!("{other:?}"),
    }
    assert!(t.elapsed() >= Duration::from_secs(4));
    assert!(matches!(
        a.request(Request::Start),
        Response::Error {
            code: ErrorCode::InvalidState,
            ..
        }
    ));
}

/// Exactly one exit per started process, while a process inside the container kills every
/// other one (`kill -9 -1`, as shutdown scripts do) at any point of their setup, and signals
/// race their exits: an exec the agent answered `Created` for reports exactly one exit, one it
/// refused reports none, and one that ran to its end reports its own status.
#[test]
fn exec_storm_under_kill_reports_each_exit_exactly_once() {
    const EXECS: usize = 300;
    let mut a = AgentProc::start();
    let spec = a.spec(&["sleep", "1000"], false);
    assert!(matches!(
        a.request(Request::Create {
            container_id: "storm".into(),
            spec,
            stdio: StdioSpec::default(),
            privileged: false,
        }),
        Response::Created { .. }
    ));
    assert_eq!(a.request(Request::Start), Response::Ok);
    let exec = |args: &[&str]| -> Box<oci_spec::runtime::Process> {
        Box::new(
            serde_json::from_value(
                json!({"args": args, "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}}),
            )
            .unwrap(),
        )
    };
    // The killer spares the pid-namespace init and itself; everything else dies at once.
    assert!(matches!(
        a.request(Request::Exec {
            exec_id: "killer".into(),
            process: exec(&["sh", "-c", "while :; do kill -9 -1; done"]),
            stdio: StdioSpec::default(),
        }),
        Response::Created { .. }
    ));
    let mut created: Vec<(String, i32)> = Vec::new();
    let mut refused = Vec::new();
    for i in 0..EXECS {
        let id = format!("e{i}");
        let want = (i % 7) as i32;
        match a.request(Request::Exec {
            exec_id: id.clone(),
            process: exec(&["sh", "-c", &format!("exit {want}")]),
            stdio: StdioSpec::default(),
        }) {
            Response::Created { .. } => created.push((id.clone(), want)),
            Response::Error { .. } => refused.push(id.clone()),
            other => panic!("exec {id}: {other:?}"),
        }
        // A signal racing the previous exec's exit.
        if i % 3 == 0 {
            if let Some((prev, _)) = created.iter().rev().nth(1) {
                let r = a.request(Request::Signal {
                    process: prev.clone(),
                    signal: 15,
                    all: false,
                });
                assert!(
                    matches!(
                        r,
                        Response::Ok
                            | Response::Error {
                                code: ErrorCode::NoSuchProcess,
                                ..
                            }
                    ),
                    "signal {prev}: {r:?}"
                );
            }
        }
    }
    assert_eq!(
        a.request(Request::Signal {
            process: "killer".into(),
            signal: 9,
            all: false
        }),
        Response::Ok
    );
    assert_eq!(a.wait_exit("killer"), 137);
    let mut own_status = 0;
    for (id, want) in &created {
        let status = a.wait_exit(id);
        assert!(
            status == *want || status == 137 || status == 143,
            "{id}: status {status}, wanted {want} (or a kill)"
        );
        own_status += usize::from(status == *want);
    }
    // A refused exec left nothing behind: its name means no process (a process that died
    // before its release is reported by its exit instead, above).
    for id in &refused {
        let r = a.request(Request::Resize {
            process: id.clone(),
            rows: 1,
            cols: 1,
        });
        assert!(
            matches!(
                r,
                Response::Error {
                    code: ErrorCode::NoSuchProcess,
                    ..
                }
            ),
            "refused exec {id} is still known to the agent: {r:?}"
        );
    }
    // Nothing more may come: no second exit, no exit of a refused exec.
    a.ctl
        .control
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    loop {
        match recv::<_, AgentMessage>(&mut a.ctl.control) {
            Ok(Some(AgentMessage::Event { event })) => a.ctl.events.push(event),
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => break,
        }
    }
    let extra: Vec<_> = a
        .ctl
        .events
        .iter()
        .filter(|e| matches!(e, Event::Exit { .. }))
        .collect();
    assert!(
        extra.is_empty(),
        "exits beyond one per started exec ({} started, {} refused): {extra:?}",
        created.len(),
        refused.len()
    );
    eprintln!(
        "exec storm: {} started ({own_status} ran to their own status), {} refused",
        created.len(),
        refused.len()
    );
}

/// Two containers in one guest, each created on its own control connection (as the host side
/// of a container joining another's VM does): the second joins the first's network and IPC
/// namespaces by `/proc/<pid>/ns/...` and has its own mount, pid and UTS namespaces; each
/// connection gets only its own container's exits; closing the second connection removes the
/// second container and leaves the first running.
#[test]
fn two_containers_share_namespaces_on_their_own_connections() {
    let mut a = AgentProc::start();
    let spec = a.spec(&["sleep", "1000"], false);
    let Response::Created { pid: a_pid } = a.request(Request::Create {
        container_id: "first".into(),
        spec,
        stdio: StdioSpec::default(),
        privileged: false,
    }) else {
        panic!("create first")
    };
    assert_eq!(a.request(Request::Start), Response::Ok);
    let ns = |pid: i32, t: &str| std::fs::read_link(format!("/proc/{pid}/ns/{t}")).unwrap();

    let mut b = a.connect();
    let out = a.stream("second", "init", Stream::Stdout);
    let mut spec = a.spec(&["sh", "-c", "hostname; echo $$; sleep 1000"], false);
    let mut linux = spec.linux().clone().unwrap();
    linux.set_namespaces(Some(
        serde_json::from_value(json!([
            {"type": "pid"}, {"type": "mount"}, {"type": "uts"},
            {"type": "ipc", "path": format!("/proc/{a_pid}/ns/ipc")},
            {"type": "network", "path": format!("/proc/{a_pid}/ns/net")},
        ]))
        .unwrap(),
    ));
    spec.set_linux(Some(linux));
    spec.set_hostname(Some("second".into()));
    let Response::Created { pid: b_pid } = b.request(Request::Create {
        container_id: "second".into(),
        spec,
        stdio: StdioSpec {
            stdout: true,
            ..Default::default()
        },
        privileged: false,
    }) else {
        panic!("create second")
    };
    assert_eq!(b.request(Request::Start), Response::Ok);
    assert_eq!(
        ns(b_pid, "net"),
        ns(a_pid, "net"),
        "network namespace shared"
    );
    assert_eq!(ns(b_pid, "ipc"), ns(a_pid, "ipc"), "IPC namespace shared");
    for t in ["mnt", "pid", "uts"] {
        assert_ne!(
            ns(b_pid, t),
            ns(a_pid, t),
            "{t} namespace is the second's own"
        );
    }
    out.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut lines = std::io::BufReader::new(out);
    let mut text = String::new();
    for _ in 0..2 {
        std::io::BufRead::read_line(&mut lines, &mut text).unwrap();
    }
    assert_eq!(text, "second\n1\n", "own hostname and pid namespace");
    // The second's processes are its own: signals by name reach only them.
    assert_eq!(
        b.request(Request::Signal {
            process: "init".into(),
            signal: 9,
            all: false
        }),
        Response::Ok
    );
    assert_eq!(b.wait_exit("init"), 137);
    assert!(
        std::fs::metadata(format!("/proc/{a_pid}")).is_ok(),
        "the first container lives on"
    );
    assert!(
        a.ctl.events.is_empty(),
        "no event of the second on the first's connection: {:?}",
        a.ctl.events
    );

    // A third container on a connection that then closes is removed with its processes.
    let mut c = a.connect();
    let spec = a.spec(&["sleep", "1000"], false);
    let Response::Created { pid: c_pid } = c.request(Request::Create {
        container_id: "third".into(),
        spec,
        stdio: StdioSpec::default(),
        privileged: false,
    }) else {
        panic!("create third")
    };
    assert_eq!(c.request(Request::Start), Response::Ok);
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(format!("/proc/{c_pid}/stat")).is_ok_and(|s| !s.contains(") Z")) {
        assert!(
            Instant::now() < deadline,
            "the closed connection's container still runs"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        a.request(Request::Signal {
            process: "init".into(),
            signal: 9,
            all: false
        }),
        Response::Ok
    );
    assert_eq!(a.wait_exit("init"), 137);
}
