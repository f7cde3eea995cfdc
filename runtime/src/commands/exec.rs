//! `exec`: run another process in a running container. Like `create`, it leaves a host process
//! behind (the exec relay) whose pid goes in the pid file: it relays the process's stdio,
//! forwards the signals it receives, and exits with the process's status.

use super::create::{reap_failed, spawn_helper, wait_ready, write_pid_file};
use super::Global;
use crate::control::{ControlRequest, ControlResponse};
use crate::sandbox::Ready;
use crate::stdio::{self, Attached, TerminalMode};
use crate::{paths, spec};
use anyhow::{bail, Context, Result};
use oci_spec::runtime::Process;
use rootcell_protocol::StdioSpec;
use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// What `exec` was asked to run.
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    /// A process.json (what Docker passes); otherwise built from the fields below.
    pub process_file: Option<PathBuf>,
    /// Command and arguments.
    pub args: Vec<String>,
    /// Allocate a terminal.
    pub tty: bool,
    /// Working directory.
    pub cwd: Option<String>,
    /// Extra KEY=VALUE environment entries.
    pub env: Vec<String>,
    /// `UID[:GID]`.
    pub user: Option<String>,
    /// Return once the process runs.
    pub detach: bool,
    /// Write the relay's pid here.
    pub pid_file: Option<PathBuf>,
    /// Console socket for a terminal.
    pub console_socket: Option<PathBuf>,
}

/// The process to run, from `--process` or from the container's own process plus overrides.
fn build_process(bundle: &Path, o: &ExecOptions) -> Result<Process> {
    if let Some(f) = &o.process_file {
        let data = std::fs::read(f)
            .with_context(|| format!("cannot read process file {}", f.display()))?;
        return serde_json::from_slice(&data)
            .with_context(|| format!("invalid process file {}", f.display()));
    }
    if o.args.is_empty() {
        bail!("exec needs a command (or --process FILE)");
    }
    let mut p = spec::load(bundle)
        .ok()
        .and_then(|b| b.spec.process().clone())
        .unwrap_or_default();
    p.set_args(Some(o.args.clone()));
    p.set_terminal(Some(o.tty));
    if let Some(cwd) = &o.cwd {
        p.set_cwd(cwd.into());
    }
    if !o.env.is_empty() {
        let mut env = p.env().clone().unwrap_or_default();
        env.extend(o.env.iter().cloned());
        p.set_env(Some(env));
    }
    if let Some(u) = &o.user {
        let (uid, gid) = u.split_once(':').unwrap_or((u, "0"));
        let mut user = p.user().clone();
        user.set_uid(
            uid.parse()
                .with_context(|| format!("invalid --user {u}: use UID[:GID]"))?,
        );
        user.set_gid(
            gid.parse()
                .with_context(|| format!("invalid --user {u}: use UID[:GID]"))?,
        );
        p.set_user(user);
    }
    Ok(p)
}

/// Runs `exec`; returns the exit status to use (0 when detached).
pub fn exec(g: &Global, id: &str, o: &ExecOptions) -> Result<i32> {
    let _span = tracing::info_span!("exec", id).entered();
    let st = g.load(id)?.refreshed();
    st.status
        .check(crate::state::Action::Exec)
        .with_context(|| format!("cannot exec in container {id}"))?;
    let mut process = build_process(&st.bundle, o)?;
    crate::rlimits::inherit(&mut process);
    let terminal = process.terminal().unwrap_or(false);
    if terminal && o.console_socket.is_none() && o.detach {
        bail!("the process has a terminal but no --console-socket was given; a detached exec needs one");
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    let exec_id = format!("exec-{}-{nanos:08x}", std::process::id());
    let file = paths::state_dir(&g.root, id).join(format!("{exec_id}.json"));
    std::fs::write(&file, serde_json::to_vec(&process)?)
        .with_context(|| format!("cannot write {}", file.display()))?;
    let mut args: Vec<String> = [
        "exec-relay",
        "--id",
        id,
        "--exec-id",
        &exec_id,
        "--ready-fd",
        "3",
    ]
    .map(String::from)
    .to_vec();
    if let Some(c) = &o.console_socket {
        args.extend([
            "--console-socket".to_string(),
            paths::absolute(c).display().to_string(),
        ]);
    } else if terminal {
        args.push("--tty-stdio".into());
    }
    let target = std::sync::Arc::new(std::sync::atomic::AtomicI32::new(0));
    if !o.detach {
        // An exec'd process starts within a bound of seconds: signals are held for it.
        super::run::relay_signals_to(target.clone(), false);
    }
    let (mut child, mut rd) = spawn_helper(g, &args, o.console_socket.is_some(), false)?;
    if let Err(e) = wait_ready(&mut rd, None) {
        reap_failed(&mut child, crate::timeouts::PROCESS_GONE);
        let _ = std::fs::remove_file(&file);
        return Err(e.into());
    }
    if let Some(p) = &o.pid_file {
        write_pid_file(p, child.id())?;
    }
    if o.detach {
        return Ok(0);
    }
    target.store(child.id() as i32, std::sync::atomic::Ordering::SeqCst);
    let status = child.wait()?;
    Ok(status.code().unwrap_or_else(|| {
        128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(9)
    }))
}

/// Arguments of the hidden `exec-relay` subcommand.
#[derive(Debug, Clone)]
pub struct RelayArgs {
    /// Container id.
    pub id: String,
    /// Exec id (names the process file in the state dir).
    pub exec_id: String,
    /// Readiness fd.
    pub ready_fd: i32,
    /// Terminal handling.
    pub mode: TerminalMode,
}

/// The exec relay process; returns its exit status.
pub fn relay_main(g: &Global, a: RelayArgs) -> i32 {
    crate::sandbox::block_signals();
    // SAFETY: the fd was set up for us by `exec` and is ours alone.
    let mut ready = unsafe { File::from_raw_fd(a.ready_fd) };
    let report = |ready: &mut File, r: Ready| {
        let mut line = serde_json::to_vec(&r).unwrap_or_default();
        line.push(b'\n');
        let _ = ready.write_all(&line);
    };
    let (conn, attached, run_dir) = match relay_prepare(g, &a) {
        Ok(x) => x,
        Err(e) => {
            tracing::error!("{e:#}");
            report(&mut ready, Ready::failed(&e));
            return 1;
        }
    };
    report(&mut ready, Ready::ok());
    // Closing the pipe lets `exec` return (it waits for EOF-or-report).
    drop(ready);
    let Attached {
        streams,
        tty_fd,
        saved,
    } = attached;
    let (done_tx, done) = std::sync::mpsc::channel();
    let outputs = stdio::spawn_relays(streams, done_tx);
    let ctl = run_dir.join(paths::CONTROL_SOCKET);
    let exec_id = a.exec_id.clone();
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let Ok(sig) = crate::sandbox::forwarded_set().wait() else {
                continue;
            };
            let req = if sig as i32 == libc::SIGWINCH {
                match tty_fd.and_then(crate::console::window_size) {
                    Some((rows, cols)) => ControlRequest::Resize {
                        process: exec_id.clone(),
                        rows,
                        cols,
                    },
                    None => continue,
                }
            } else {
                ControlRequest::Signal {
                    signal: sig as i32,
                    all: false,
                    process: Some(exec_id.clone()),
                }
            };
            let _ = crate::control::call(&ctl, &req, crate::timeouts::CLI_QUICK);
        });
    let mut conn = conn;
    let _ = conn.set_read_timeout(None);
    let status = match rootcell_protocol::recv::<_, ControlResponse>(&mut conn) {
        Ok(Some(ControlResponse::Exited { status })) => status,
        other => {
            tracing::warn!(?other, "lost the sandbox before the exec'd process ended");
            137
        }
    };
    if !stdio::wait_outputs(&done, outputs, crate::timeouts::OUTPUT_DRAIN) {
        tracing::warn!("exec output did not reach EOF within 3 s after exit");
    }
    drop(saved);
    status
}

/// Attaches the streams and asks the sandbox to start the process.
fn relay_prepare(g: &Global, a: &RelayArgs) -> Result<(UnixStream, Attached, PathBuf)> {
    let st = g.load(&a.id)?;
    let file = paths::state_dir(&g.root, &a.id).join(format!("{}.json", a.exec_id));
    let data = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()));
    let _ = std::fs::remove_file(&file);
    let process: Process = serde_json::from_slice(&data?)?;
    let terminal = process.terminal().unwrap_or(false);
    let mode = TerminalMode {
        terminal,
        ..a.mode.clone()
    };
    let attached = stdio::attach(&st.vsock_uds(), &st.id, &a.exec_id, &mode)?;
    let ctl = st.control_socket();
    let mut conn = UnixStream::connect(&ctl)
        .with_context(|| format!("cannot reach the container's sandbox at {}", ctl.display()))?;
    let _ = conn.set_read_timeout(Some(crate::timeouts::CLI_EXEC));
    let stdio = StdioSpec {
        stdin: !terminal,
        stdout: !terminal,
        stderr: !terminal,
        terminal,
    };
    let req = ControlRequest::Exec {
        exec_id: a.exec_id.clone(),
        process: Box::new(process),
        stdio,
    };
    rootcell_protocol::send(&mut conn, &req)?;
    match rootcell_protocol::recv::<_, ControlResponse>(&mut conn)? {
        Some(ControlResponse::Ok) => {}
        Some(ControlResponse::Error { message }) => bail!("{message}"),
        Some(ControlResponse::Refused { error }) => {
            return Err(error).context("cannot exec in the container")
        }
        Some(ControlResponse::ProcessFailed { message, status }) => {
            return Err(crate::error::RuntimeError::Process {
                msg: message,
                status,
            }
            .into())
        }
        other => bail!("unexpected answer from the sandbox: {other:?}"),
    }
    if let Some(fd) = attached.tty_fd {
        if let Some((rows, cols)) = crate::console::window_size(fd) {
            let _ = crate::control::call(
                &ctl,
                &ControlRequest::Resize {
                    process: a.exec_id.clone(),
                    rows,
                    cols,
                },
                crate::timeouts::CLI_QUICK,
            );
        }
    }
    Ok((conn, attached, st.run_dir))
}
