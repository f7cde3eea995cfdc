//! Shared helpers for the end-to-end tests: the runtime binary and guest images built by
//! `scripts/build.sh`, OCI bundles on busybox-static, and leak checks.
//!
//! Every test boots real guests through the real `rootcell` binary. The paths come from the
//! environment that `scripts/test.sh` sets (`build/env`); without it the tests fail and say how
//! to run them, rather than passing vacuously.

pub mod containerd;
pub mod cri;
pub mod docker;
pub mod inginious;
pub mod netns;
pub use netns::NetNs;

use serde_json::{json, Value};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Upper bound for any single runtime command; a guest boot under TCG takes a few seconds.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

/// Environment variable that marks every process a [`Runtime`] starts, and everything those
/// start in turn (sandboxes, exec relays, VMMs: they inherit it through setsid and
/// reparenting), so a stuck test can find and end all of them.
pub const SCOPE_VAR: &str = "ROOTCELL_E2E_SCOPE";
/// Default bound on one test's [`Runtime`] (override: `ROOTCELL_E2E_TEST_TIMEOUT`, seconds).
pub const TEST_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// Default bound on a whole test binary (override: `ROOTCELL_E2E_BINARY_TIMEOUT`, seconds).
pub const BINARY_TIMEOUT: Duration = Duration::from_secs(75 * 60);

/// Paths to what `scripts/build.sh` produced.
#[derive(Debug, Clone)]
pub struct Artifacts {
    /// The `rootcell` binary under test.
    pub bin: PathBuf,
    /// Guest kernel release the guest must report.
    pub kernel_release: String,
}

/// Where the tests' runtimes look for a VM pool unless a test names one
/// (`ROOTCELL_POOL_DIR`): nowhere, so a pool running on the host does not change what they
/// test (each container boots its own VM).
pub const NO_POOL_DIR: &str = "/run/rootcell-e2e-no-pool";

/// Points `c` at no VM pool, unless this process names one (tests/e2e/pool.rs).
pub fn no_host_pool(c: &mut Command) {
    if std::env::var_os("ROOTCELL_POOL_DIR").is_none() {
        c.env("ROOTCELL_POOL_DIR", NO_POOL_DIR);
    }
}

/// Reads the artifact paths from the environment, or panics with instructions.
pub fn artifacts() -> Artifacts {
    let get = |k: &str| {
        std::env::var(k).unwrap_or_else(|_| {
            panic!("{k} is not set: run the end-to-end tests through scripts/test.sh, which builds the guest and sets it")
        })
    };
    get("ROOTCELL_E2E");
    get("ROOTCELL_KERNEL");
    get("ROOTCELL_INITRD");
    Artifacts {
        bin: PathBuf::from(get("ROOTCELL_BIN")),
        kernel_release: get("ROOTCELL_KERNEL_RELEASE"),
    }
}

/// The run dir `rootcell` uses for container `id` under `root`: a 16-hex FNV-1a hash of both
/// (the same computation as runtime/src/paths.rs, which tests compare against what they find).
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
    Path::new("/run/rootcell/r").join(format!("{h:016x}"))
}

/// Directory of the repository's `images/` scripts.
pub fn images_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../images")
}

/// A fresh container id, unique within this test process and across parallel test binaries.
pub fn unique_id(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A `--root` state directory of its own per test, cleaned (and checked for leaks) on drop.
///
/// Every command it runs carries its scope ([`SCOPE_VAR`]); the scope is bounded by
/// [`TEST_TIMEOUT`] (a watchdog kills all its processes, so whatever the test waits on ends and
/// the test fails saying so), and whatever is still running in it when it is dropped is killed.
pub struct Runtime {
    /// The artifacts under test.
    pub art: Artifacts,
    /// Temporary directory holding the state root.
    pub dir: tempfile::TempDir,
    /// The value of [`SCOPE_VAR`] in every process this runtime starts.
    pub scope: String,
    extra_env: Vec<(String, String)>,
}

impl Runtime {
    /// A runtime with its own empty state root.
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("rootcell-e2e-")
            .tempdir()
            .expect("tempdir");
        let scope = unique_id("scope");
        watchdog::watch(&scope);
        Runtime {
            art: artifacts(),
            dir,
            scope,
            extra_env: Vec::new(),
        }
    }

    /// The `--root` path.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Sets an environment variable for every command this runtime runs.
    pub fn env(mut self, k: &str, v: impl Into<String>) -> Self {
        self.extra_env.push((k.into(), v.into()));
        self
    }

    /// A `rootcell --root ROOT ARGS...` command, not yet started.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.art.bin);
        c.arg("--root").arg(self.root()).args(args);
        c.env(SCOPE_VAR, &self.scope);
        no_host_pool(&mut c);
        for (k, v) in &self.extra_env {
            c.env(k, v);
        }
        c
    }

    /// Runs a command with no stdin and captured output, bounded by [`COMMAND_TIMEOUT`].
    pub fn run(&self, args: &[&str]) -> Output {
        let mut c = self.command(args);
        c.stdin(Stdio::null());
        output_with_timeout(c, None, COMMAND_TIMEOUT)
    }

    /// Like [`Runtime::run`] but feeds `input` on stdin.
    pub fn run_with_input(&self, args: &[&str], input: Vec<u8>) -> Output {
        output_with_timeout(self.command(args), Some(input), COMMAND_TIMEOUT)
    }

    /// `create` with the container's stdio sent to files (a sandbox holds them open, so pipes
    /// would never see EOF while the container lives). Returns the stdout/stderr file paths.
    pub fn create(&self, bundle: &Bundle, id: &str) -> (Output, PathBuf, PathBuf) {
        let out = self.dir.path().join(format!("{id}.stdout"));
        let err = self.dir.path().join(format!("{id}.stderr"));
        let pid_file = self.dir.path().join(format!("{id}.pid"));
        let mut c = self.command(&[
            "create",
            "--bundle",
            bundle.path().to_str().unwrap(),
            "--pid-file",
            pid_file.to_str().unwrap(),
            id,
        ]);
        c.stdin(Stdio::null())
            .stdout(fs::File::create(&out).unwrap())
            .stderr(fs::File::create(&err).unwrap());
        let status = wait_with_timeout(c.spawn().expect("spawn rootcell create"), COMMAND_TIMEOUT);
        // create's own messages went to the same files as the container's; return them as output.
        let output = Output {
            status,
            stdout: Vec::new(),
            stderr: fs::read(&err).unwrap_or_default(),
        };
        (output, out, err)
    }

    /// `state ID` parsed as JSON; panics with the runtime's message on failure.
    pub fn state(&self, id: &str) -> Value {
        let o = self.run(&["state", id]);
        assert!(
            o.status.success(),
            "rootcell state {id} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).expect("state output is JSON")
    }

    /// Waits until `state ID` reports `status`, bounded.
    pub fn wait_status(&self, id: &str, status: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.state(id);
            if s["status"] == status {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "container {id} never reached {status}: last state {s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Ids of the containers `list` knows.
    pub fn list_ids(&self) -> Vec<String> {
        let o = self.run(&["list", "--format", "json"]);
        if !o.status.success() {
            return Vec::new();
        }
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c["id"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Default for Runtime {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        for id in self.list_ids() {
            let _ = self.run(&["delete", "--force", &id]);
        }
        // Whatever a failed test left (an exec relay, a sandbox whose state is gone) ends here.
        let left = kill_scope(&self.scope);
        if !left.is_empty() {
            let _ = writeln!(
                std::io::stderr(),
                "rootcell-e2e: killed processes left in scope {}: {left:#?}",
                self.scope
            );
        }
        watchdog::unwatch(&self.scope);
    }
}

/// Processes (pid, command line) whose environment has `SCOPE_VAR=scope`.
pub fn scope_processes(scope: &str) -> Vec<(i32, String)> {
    let marker = format!("{SCOPE_VAR}={scope}");
    let me = std::process::id() as i32;
    let mut found = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return found;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(env) = fs::read(e.path().join("environ")) else {
            continue;
        };
        if env.split(|&b| b == 0).any(|v| v == marker.as_bytes()) {
            found.push((pid, cmdline_at(&e.path())));
        }
    }
    found
}

/// SIGKILLs every process of `scope` until none is left (bounded); returns what it found.
pub fn kill_scope(scope: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Zombies keep their environ readable only until reaped; skip the ones already dead.
        let procs: Vec<_> = scope_processes(scope)
            .into_iter()
            .filter(|(pid, _)| !is_zombie(*pid))
            .collect();
        if procs.is_empty() || Instant::now() > deadline {
            return seen;
        }
        for (pid, cmd) in procs {
            // SAFETY: kill(2) of a process that carries this test's scope marker.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let line = format!("{pid}: {cmd}");
            if !seen.contains(&line) {
                seen.push(line);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The scope a running process carries, if any.
pub fn scope_of(pid: i32) -> Option<String> {
    let env = fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{SCOPE_VAR}=");
    env.split(|&b| b == 0).find_map(|v| {
        v.strip_prefix(prefix.as_bytes())
            .map(|s| String::from_utf8_lossy(s).into_owned())
    })
}

/// Kills `pid` and, if it carries a scope, every process of that scope (the helpers it
/// started hold its pipes: killing only `pid` would leave a reader waiting).
pub fn kill_tree(pid: i32) -> Vec<String> {
    let scope = scope_of(pid);
    // SAFETY: kill(2) of a process the caller started and has not reaped.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    scope.map(|s| kill_scope(&s)).unwrap_or_default()
}

fn is_zombie(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(true)
}

/// The bound on every [`Runtime`]'s scope and on the test binary as a whole.
mod watchdog {
    use super::*;
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    fn secs(var: &str, default: Duration) -> Duration {
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(default)
    }

    fn scopes() -> &'static Mutex<HashMap<String, Instant>> {
        static SCOPES: OnceLock<Mutex<HashMap<String, Instant>>> = OnceLock::new();
        SCOPES.get_or_init(|| {
            let started = Instant::now();
            let per_test = secs("ROOTCELL_E2E_TEST_TIMEOUT", TEST_TIMEOUT);
            let per_binary = secs("ROOTCELL_E2E_BINARY_TIMEOUT", BINARY_TIMEOUT);
            std::thread::Builder::new()
                .name("e2e-watchdog".into())
                .spawn(move || loop {
                    std::thread::sleep(Duration::from_secs(1));
                    let now = Instant::now();
                    let all: Vec<(String, Instant)> = scopes()
                        .lock()
                        .map(|m| m.iter().map(|(k, v)| (k.clone(), *v)).collect())
                        .unwrap_or_default();
                    if now.duration_since(started) > per_binary {
                        say(&format!(
                            "this test binary ran longer than {per_binary:?}: killing every test's processes and exiting"
                        ));
                        for (scope, _) in &all {
                            report_kill(scope, "the binary's bound");
                        }
                        std::process::exit(101);
                    }
                    for (scope, since) in all {
                        if now.duration_since(since) > per_test {
                            report_kill(&scope, &format!("its bound of {per_test:?}"));
                            unwatch(&scope);
                        }
                    }
                })
                .expect("start the e2e watchdog");
            Mutex::new(HashMap::new())
        })
    }

    fn say(msg: &str) {
        // Straight to fd 2: the test harness captures eprintln! per test thread.
        let _ = writeln!(std::io::stderr(), "rootcell-e2e watchdog: {msg}");
    }

    fn report_kill(scope: &str, why: &str) {
        let killed = kill_scope(scope);
        say(&format!(
            "test scope {scope} exceeded {why}; killed what it was waiting on: {killed:#?}"
        ));
    }

    /// Starts bounding `scope`.
    pub fn watch(scope: &str) {
        if let Ok(mut m) = scopes().lock() {
            m.insert(scope.to_string(), Instant::now());
        }
    }

    /// Stops bounding `scope`.
    pub fn unwatch(scope: &str) {
        if let Ok(mut m) = scopes().lock() {
            m.remove(scope);
        }
    }
}

/// Runs a command to completion with a deadline. On overrun it kills the command and every
/// process of its scope (the helpers it started, which hold its pipes) and panics saying what
/// was still running. Output is collected until EOF, which a helper that outlives the command
/// could withhold: that wait is bounded too, and names the holders.
pub fn output_with_timeout(c: Command, input: Option<Vec<u8>>, timeout: Duration) -> Output {
    output_with_timeout_or(c, input, timeout, |_| String::new())
}

/// [`output_with_timeout`] that, on overrun, first calls `on_overrun` with the command's pid,
/// while the command and whatever it waits on are still stuck, and puts what it returns in the
/// panic message, with what the command had printed by the time it was killed (so a hook that
/// makes the command dump its state, a Go program's SIGQUIT, shows that dump).
pub fn output_with_timeout_or(
    c: Command,
    input: Option<Vec<u8>>,
    timeout: Duration,
    on_overrun: impl FnOnce(i32) -> String,
) -> Output {
    output_within(c, input, timeout, on_overrun).unwrap_or_else(|overrun| panic!("{overrun}"))
}

/// [`output_with_timeout_or`] that returns what it would panic with (the command overran and
/// was killed, or its output pipes stayed open), for a caller that must go on: a report.
fn output_within(
    mut c: Command,
    input: Option<Vec<u8>>,
    timeout: Duration,
    on_overrun: impl FnOnce(i32) -> String,
) -> Result<Output, String> {
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    if input.is_some() {
        c.stdin(Stdio::piped());
    }
    let what = describe(&c);
    let mut child = c.spawn().expect("spawn command");
    let writer = input.map(|data| {
        let mut stdin = child.stdin.take().unwrap();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        })
    });
    let so = child.stdout.take().unwrap();
    let se = child.stderr.take().unwrap();
    let pipes = [pipe_inode(&so), pipe_inode(&se)];
    let (tx, rx) = std::sync::mpsc::channel();
    for (i, mut r) in [Box::new(so) as Box<dyn Read + Send>, Box::new(se)]
        .into_iter()
        .enumerate()
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = r.read_to_end(&mut b);
            let _ = tx.send((i, b));
        });
    }
    drop(tx);
    let pid = child.id() as i32;
    let scope = scope_of(pid);
    let Some(status) = wait_until(&mut child, Instant::now() + timeout) else {
        let report = on_overrun(pid);
        let killed = kill_tree(pid);
        let _ = child.kill();
        let _ = child.wait();
        // What it printed, unless a helper still holds its pipes (then as much as came).
        let mut out = [Vec::new(), Vec::new()];
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Ok((i, b)) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            out[i] = b;
        }
        return Err(format!(
            "{what} (pid {pid}) did not finish within {timeout:?}; killed it and its scope: {killed:#?}\n{report}\n--- its stdout ---\n{}\n--- its stderr ---\n{}",
            text(&out[0]),
            text(&out[1])
        ));
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    let mut out: [Option<Vec<u8>>; 2] = [None, None];
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.iter().any(Option::is_none) {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((i, b)) => out[i] = Some(b),
            Err(_) => {
                let holders = pipe_holders(&pipes);
                let killed = scope.as_deref().map(kill_scope).unwrap_or_default();
                return Err(format!(
                    "{what} exited ({status:?}) but its output pipes stayed open 30 s later, held by {holders:#?} (killed: {killed:#?})"
                ));
            }
        }
    }
    let [stdout, stderr] = out.map(Option::unwrap_or_default);
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// The command line of the process whose /proc directory is `proc_dir`, arguments joined by
/// spaces; empty if it cannot be read (the process is gone, or a kernel thread).
fn cmdline_at(proc_dir: &Path) -> String {
    fs::read(proc_dir.join("cmdline"))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .unwrap_or_default()
}

/// The child's exit status, or `None` if it still runs at `deadline`.
fn wait_until(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return Some(s);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for a child with a deadline; on overrun kills it and its scope and panics, naming the
/// command and what was still running.
pub fn wait_with_timeout(mut child: Child, timeout: Duration) -> ExitStatus {
    if let Some(s) = wait_until(&mut child, Instant::now() + timeout) {
        return s;
    }
    let pid = child.id() as i32;
    let cmd = cmdline_at(Path::new(&format!("/proc/{pid}")));
    let killed = kill_tree(pid);
    let _ = child.kill();
    let _ = child.wait();
    panic!(
        "command `{cmd}` (pid {pid}) did not finish within {timeout:?}; killed it and its scope: {killed:#?}"
    );
}

/// Where each thread of process `pid` is, from /proc: name, state, kernel wait channel, the
/// system call it is in (number and first arguments) and, where the kernel shows it, its
/// kernel stack. For a report on something stuck.
pub fn thread_dump(pid: i32) -> String {
    let read = |p: &Path| {
        fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|e| format!("({e})"))
    };
    let cmd = cmdline_at(Path::new(&format!("/proc/{pid}")));
    let mut s = format!("pid {pid}: {cmd}\n");
    let mut tids: Vec<i32> = fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect();
    tids.sort_unstable();
    for tid in tids {
        let t = PathBuf::from(format!("/proc/{pid}/task/{tid}"));
        // The state is the field after the parenthesised name.
        let stat = read(&t.join("stat"));
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split(' ').next())
            .unwrap_or("?")
            .to_string();
        let wchan = read(&t.join("wchan"));
        let syscall: Vec<String> = read(&t.join("syscall"))
            .split(' ')
            .take(4)
            .map(String::from)
            .collect();
        s.push_str(&format!(
            "  tid {tid} {} state {state} wchan {wchan} syscall {}\n",
            read(&t.join("comm")),
            syscall.join(" ")
        ));
        // The kernel stack, but of threads that merely wait on a futex or for events.
        let idle = [
            "futex",
            "epoll",
            "poll_schedule",
            "do_select",
            "hrtimer_nanosleep",
        ]
        .iter()
        .any(|w| wchan.contains(w));
        if let (false, Ok(k)) = (idle, fs::read_to_string(t.join("stack"))) {
            for l in k.lines().take(12) {
                s.push_str(&format!("      {l}\n"));
            }
        }
    }
    s
}

/// How long gdb may take to attach to a process and print its backtraces.
const GDB_TIMEOUT: Duration = Duration::from_secs(60);

/// Every thread's user-space backtrace of process `pid` (gdb, bounded), or why there is none.
pub fn gdb_backtraces(pid: i32) -> String {
    if !Path::new("/usr/bin/gdb").exists() {
        return "(no /usr/bin/gdb for user-space backtraces)".into();
    }
    let mut c = Command::new("/usr/bin/gdb");
    c.args(["-nx", "-batch", "-p", &pid.to_string()])
        .args(["-ex", "thread apply all bt 25"])
        .stdin(Stdio::null());
    // Bounded, and an overrun is part of the report, not a panic: the report runs while the
    // command it explains is still stuck, and a panic here would lose the rest of it and skip
    // killing that command. gdb killed mid-attach leaves the shim running (the kernel detaches
    // a dead tracer's tracees).
    let o = match output_within(c, None, GDB_TIMEOUT, |_| String::new()) {
        Ok(o) => o,
        Err(overrun) => return format!("(no backtraces: {overrun})"),
    };
    // Threads and frames, without the frames every thread has (thread start, closure shims).
    let boring = [
        "start_thread",
        "clone3",
        "thread_start",
        "__rust_begin_short_backtrace",
        "call_once{{vtable",
        "lang_start",
        "in main ()",
    ];
    text(&o.stdout)
        .lines()
        .filter(|l| {
            l.starts_with("Thread ")
                || (l.starts_with('#') && !boring.iter().any(|b| l.contains(b)))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn describe(c: &Command) -> String {
    let mut s = format!("`{}", c.get_program().to_string_lossy());
    for a in c.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s.push('`');
    s
}

fn pipe_inode(f: &impl std::os::fd::AsRawFd) -> String {
    fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Processes (other than this one) with one of `pipes` (`pipe:[N]` links) open.
fn pipe_holders(pipes: &[String]) -> Vec<String> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.chars().all(|c| c.is_ascii_digit()) || name == me {
            continue;
        }
        let holds = fs::read_dir(e.path().join("fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| {
                fs::read_link(fd.path()).is_ok_and(|l| {
                    pipes
                        .iter()
                        .any(|p| !p.is_empty() && l.to_string_lossy() == *p)
                })
            });
        if holds {
            found.push(format!("{name}: {}", cmdline_at(&e.path())));
        }
    }
    found
}

/// An OCI bundle in a temporary directory: a busybox-static rootfs and a config.json that the
/// builder methods shape.
pub struct Bundle {
    dir: tempfile::TempDir,
    /// The config.json contents, written by [`Bundle::write`].
    pub spec: Value,
}

impl Bundle {
    /// A bundle running `args` as root with default mounts and namespaces.
    pub fn new(args: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("rootcell-bundle-")
            .tempdir()
            .expect("tempdir");
        let st = Command::new(images_dir().join("make-rootfs.sh"))
            .arg(dir.path().join("rootfs"))
            .stdout(Stdio::null())
            .status()
            .expect("run images/make-rootfs.sh");
        assert!(st.success(), "images/make-rootfs.sh failed");
        let b = Bundle {
            dir,
            spec: default_spec(args),
        };
        b.write();
        b
    }

    /// The bundle directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The rootfs directory.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    /// Writes config.json from [`Bundle::spec`].
    pub fn write(&self) {
        fs::write(
            self.dir.path().join("config.json"),
            serde_json::to_vec_pretty(&self.spec).unwrap(),
        )
        .unwrap();
    }

    /// Applies `f` to the spec and rewrites config.json.
    pub fn edit(mut self, f: impl FnOnce(&mut Value)) -> Self {
        f(&mut self.spec);
        self.write();
        self
    }
}

/// For containers that share a VM: a server in the first container: busybox httpd on 127.0.0.1:8080 serving `hello-from-a`,
/// and a file only its root has.
pub const LOCAL_SERVER: &str =
    "mkdir -p /www && echo hello-from-a > /www/index.html && echo a > /a-only \
                      && exec httpd -f -p 127.0.0.1:8080 -h /www";

/// A client loop: fetch the first container's page (retrying while it comes up).
pub const LOCAL_FETCH: &str =
    "for i in $(seq 100); do wget -q -O - http://127.0.0.1:8080/ && break; sleep 0.2; done";

/// Every capability a root process has, for specs that want "full" root in the guest.
pub const ALL_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
];

/// Docker's default capability set.
pub const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Sets all five capability sets of the spec's process to `caps`.
pub fn set_caps(spec: &mut Value, caps: &[&str]) {
    let c: Vec<Value> = caps.iter().map(|s| json!(s)).collect();
    spec["process"]["capabilities"] =
        json!({"bounding": c, "effective": c, "permitted": c, "inheritable": c, "ambient": c});
}

/// The spec Docker would write for a busybox container, minus what rootcell does not need.
pub fn default_spec(args: &[&str]) -> Value {
    let mut spec = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"],
            "cwd": "/",
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "rootcell-test",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    });
    set_caps(&mut spec, DEFAULT_CAPS);
    spec
}

/// Exit code of a finished command, panicking on a signal death of the runtime itself.
pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or_else(|| {
        panic!(
            "runtime killed by a signal: {:?}; stderr: {}",
            o.status,
            text(&o.stderr)
        )
    })
}

/// Lossy UTF-8 text of some output.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Whether this host has hardware KVM (/dev/kvm and the CPU's vmx/svm flag), so that `auto`
/// picks the built-in VMM: true in the nested lane's L1, false on these development machines,
/// whose /dev/kvm is a software hypervisor.
pub fn hardware_kvm() -> bool {
    Path::new("/dev/kvm").exists()
        && std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
            c.lines().any(|l| {
                l.starts_with("flags") && l.split_whitespace().any(|f| f == "vmx" || f == "svm")
            })
        })
}

/// Host processes whose command line mentions `needle` (e.g. a container id or state root).
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    processes_mentioning_any(&[needle])
}

/// Host processes (`pid: command line`, once each) whose command line mentions any of
/// `needles`.
pub fn processes_mentioning_any(needles: &[&str]) -> Vec<String> {
    processes_where(|args| {
        let cmd = args.join(" ");
        needles.iter().any(|n| cmd.contains(n))
    })
}

/// Host processes but this one (`pid: command line`, once each) whose arguments (the command
/// line split at its NULs) `matches`.
fn processes_where(matches: impl Fn(&[&str]) -> bool) -> Vec<String> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if !pid.chars().all(|c| c.is_ascii_digit()) || pid == me {
            continue;
        }
        let cmd = fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        let args: Vec<&str> = cmd.split('\0').collect();
        if matches(&args) {
            found.push(format!("{pid}: {}", args.join(" ")));
        }
    }
    found
}

/// Whether `text` (one argument of a command line, one field of a mount line) names `name` as a
/// whole: holds it with neither side running on into a longer name (a character a container id
/// may hold: letters, digits, `_+-.`). So id `a` is named by `--id a`, `guest=/r/a` and
/// `/r/a/console.sock`, not by `ab` or `x-a`; root `/t/r` by `/t/r/a`, not by `/t/r2`. As the
/// runtime's `delete --force` sweep compares whole arguments (commands/delete.rs `named`), for
/// the broader set of processes [`processes_of`] looks for.
pub fn names(text: &str, name: &str) -> bool {
    let part = |c: char| c.is_ascii_alphanumeric() || "_+-.".contains(c);
    !name.is_empty()
        && text.match_indices(name).any(|(i, _)| {
            !text[..i].chars().next_back().is_some_and(part)
                && !text[i + name.len()..].chars().next().is_some_and(part)
        })
}

/// Host processes (`pid: command line`, once each) one of whose arguments [`names`] one of
/// `names_`.
fn processes_naming_any(names_: &[&str]) -> Vec<String> {
    processes_where(|args| args.iter().any(|a| names_.iter().any(|n| names(a, n))))
}

/// The host processes of container `id` under `root`, by their command lines, which name it:
/// its sandbox and exec relays (`rootcell --root <root> sandbox --id <id>`), its VMM (QEMU's
/// `-name guest=<root>/<id>`, `rootcell builtin-vmm --for <root>/<id>`), a pool VM's holder
/// once the container claimed it (`... pool vm ... --claimed-for <root>/<id>`); any process
/// naming the root (another container's, or a runtime call still running), and one naming the
/// container's run dir (an unjailed QEMU's socket paths). Each as a whole ([`names`]): a
/// container whose id has `id` as a prefix is not this one.
pub fn processes_of(root: &Path, id: &str) -> Vec<String> {
    let root = root.to_string_lossy().into_owned();
    let run = run_dir(Path::new(&root), id).to_string_lossy().into_owned();
    processes_naming_any(&[id, &root, &run])
}

/// Asserts that nothing of container `id` is left on the host: no process of it
/// ([`processes_of`]: its sandbox, relays, VMM or claimed pool VM, or anything naming the
/// runtime's root), no mount under the root, no entry in the state root, and nothing in the
/// runtime's short socket directory that mentions it.
pub fn assert_no_leftovers(rt: &Runtime, id: &str) {
    // Processes may take a moment to be reaped after the runtime returns.
    let deadline = Instant::now() + Duration::from_secs(10);
    let root = rt.root().to_string_lossy().into_owned();
    loop {
        let procs = processes_of(&rt.root(), id);
        if procs.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "processes left behind for {id}: {procs:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let leaked: Vec<&str> = mounts
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .any(|f| names(f, id) || names(f, &root))
        })
        .collect();
    assert!(
        leaked.is_empty(),
        "mounts left behind for {id}: {leaked:#?}"
    );
    if let Ok(entries) = fs::read_dir(rt.root()) {
        let left: Vec<_> = entries.flatten().map(|e| e.file_name()).collect();
        assert!(
            left.iter().all(|n| n.to_string_lossy() != id),
            "state directory left behind for {id}: {left:?}"
        );
    }
}

/// The cache directory of the Debian 13 (trixie) root file system that
/// `images/build-trixie-root.sh` builds (about 5 minutes the first time, then found in
/// `/var/cache/rootcell/trixie-<hash>/`): `rootfs/` with Debian 13's QEMU, Docker, containerd and
/// runc, `rootcell-qemu` (that QEMU on the root's own libraries), `qemu-version` and
/// `docker-version`. Built or found once per test process; a failed build panics saying why.
pub fn trixie_root() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let script = images_dir().join("build-trixie-root.sh");
        let started = Instant::now();
        // Bounded (a stuck mirror must not hang the suite), and in a scope of its own so a
        // timeout ends debootstrap and apt too.
        let mut c = Command::new(&script);
        c.env(SCOPE_VAR, unique_id("trixie-root"))
            .stdin(Stdio::null());
        let o = output_with_timeout(c, None, Duration::from_secs(20 * 60));
        assert!(
            o.status.success(),
            "{} failed ({}), so Debian 13's packages cannot be tested: {}\n\
             It needs root, debootstrap >= 1.0.128 (scripts/install-deps.sh) and the Debian mirror \
             (DEBIAN_MIRROR); run it by hand to see the whole log.",
            script.display(),
            o.status,
            text(&o.stderr)
        );
        let dir = PathBuf::from(text(&o.stdout).trim());
        eprintln!(
            "trixie root {} ({:.0} s to build or find)",
            dir.display(),
            started.elapsed().as_secs_f64()
        );
        dir
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids and roots are named only as wholes: a container whose id has another's as a prefix
    /// (or a suffix), or a root that extends another's, is not taken for it.
    #[test]
    fn names_compares_whole_names() {
        let (root, id) = ("/tmp/.tmpA1/root", "rmd-7-3");
        for arg in [
            "rmd-7-3",
            "guest=/tmp/.tmpA1/root/rmd-7-3",
            "/tmp/.tmpA1/root/rmd-7-3/console.sock",
            "/tmp/.tmpA1/root/rmd-7-3      ",
            "socket,path=/tmp/.tmpA1/root/rmd-7-3,server=on",
        ] {
            assert!(names(arg, id), "{arg} names {id}");
            assert!(arg == id || names(arg, root), "{arg} names {root}");
        }
        for arg in [
            "rmd-7-3b",
            "rmd-7-31",
            "xrmd-7-3",
            "rmd-7-3.b",
            "guest=/tmp/.tmpA1/root/rmd-7-3b",
            "",
        ] {
            assert!(!names(arg, id), "{arg} does not name {id}");
        }
        for arg in [
            "/tmp/.tmpA1/root2/rmd-7-3",
            "/x/tmp/.tmpA1/root",
            "/tmp/.tmpA1/roo",
        ] {
            assert!(!names(arg, root), "{arg} does not name {root}");
        }
        assert!(!names("anything", ""), "an empty name names nothing");
    }

    /// A live process is found by a whole argument, and not by a longer one that holds it.
    #[test]
    fn processes_of_finds_whole_arguments_only() {
        let dir = tempfile::tempdir().unwrap();
        let id = unique_id("po");
        let sibling = format!("{id}b");
        // A shell that waits on its stdin (a builtin: it stays itself) with `--id <sibling>`.
        let mut sh = Command::new("sh")
            .args(["-c", "read x", "sh", "--id", &sibling])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = sh.id().to_string();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mine = |procs: Vec<String>| procs.iter().any(|p| p.starts_with(&format!("{pid}: ")));
        while !mine(processes_of(dir.path(), &sibling)) {
            assert!(Instant::now() < deadline, "{sibling}'s process not found");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            !mine(processes_of(dir.path(), &id)),
            "{id} is not {sibling}: {:?}",
            processes_of(dir.path(), &id)
        );
        drop(sh.stdin.take());
        sh.wait().unwrap();
    }

    /// A report's commands overrun without a panic: the report goes on.
    #[test]
    fn an_overrun_is_returned_not_panicked() {
        let mut c = Command::new("sleep");
        c.arg("30");
        let start = Instant::now();
        let overrun = output_within(c, None, Duration::from_millis(300), |pid| {
            format!("report on {pid}")
        })
        .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(15), "{overrun}");
        assert!(overrun.contains("did not finish within 300ms"), "{overrun}");
        assert!(overrun.contains("report on "), "{overrun}");
    }

    /// gdb (scripts/install-deps.sh installs it) attaches and prints a backtrace per thread.
    #[test]
    fn gdb_backtraces_show_the_threads_of_a_process() {
        let mut child = Command::new("sleep").arg("60").spawn().unwrap();
        let bt = gdb_backtraces(child.id() as i32);
        let _ = child.kill();
        let _ = child.wait();
        assert!(bt.lines().any(|l| l.starts_with("Thread 1 ")), "{bt}");
        assert!(bt.lines().any(|l| l.starts_with("#0 ")), "{bt}");
    }
}
