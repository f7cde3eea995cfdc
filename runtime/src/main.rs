//! rootcell: a runc-compatible OCI runtime that runs every container in its own microVM.

use cli::{Cli, Command};
use commands::create::CreateOptions;
use commands::Global;
use rootcell_runtime::{cli, commands, error, hypervisor, logging, paths, rlimits, sandbox, stdio};
use std::io::Write;

fn main() {
    rlimits::remember_callers();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match Cli::try_parse_runc(args.clone()) {
        Ok(cli) => cli,
        Err(e) => {
            if e.use_stderr() {
                // Logging is not set up yet, but the shim reads errors only from --log.
                let rendered = e.render().to_string();
                let first = rendered
                    .lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("");
                let msg = first.strip_prefix("error: ").unwrap_or(first);
                logging::early_error(&args, &format!("invalid command line: {msg}"));
            }
            e.exit()
        }
    };
    if let Some(h) = cli.hypervisor {
        // The flag outranks the env; carried as the env, it reaches the re-executed sandbox
        // (set before any thread exists).
        std::env::set_var(hypervisor::select::ENV, h.as_str());
    }
    let g = Global {
        root: paths::absolute(&cli.root),
        log: cli.log.as_deref().map(paths::absolute),
        log_format: if cli.log_format == cli::LogFormat::Json {
            logging::Format::Json
        } else {
            logging::Format::Text
        },
        debug: cli.debug,
        guest_privileged: cli.guest_privileged,
    };
    if let Command::Sandbox {
        id,
        ready_fd,
        console_socket,
        tty_stdio,
    } = cli.command
    {
        init_process_logging(&g, &id);
        let args = sandbox::SandboxArgs {
            root: g.root.clone(),
            id,
            ready_fd,
            console_socket,
            tty_stdio,
        };
        std::process::exit(sandbox::main(args));
    }
    if let Command::BuiltinVmm { .. } = cli.command {
        // It logs to the backend's diagnostics file once its VM runs.
        std::process::exit(hypervisor::builtin::process::main());
    }
    if let Command::ExecRelay {
        id,
        exec_id,
        ready_fd,
        console_socket,
        tty_stdio,
    } = cli.command
    {
        init_process_logging(&g, &id);
        let mode = stdio::TerminalMode {
            terminal: false,
            console_socket,
            tty_stdio,
        };
        let args = commands::exec::RelayArgs {
            id,
            exec_id,
            ready_fd,
            mode,
        };
        std::process::exit(commands::exec::relay_main(&g, args));
    }
    logging::init(
        g.log.as_deref(),
        Box::new(std::io::stderr()),
        g.log_format,
        g.debug,
    );
    if cli.systemd_cgroup {
        tracing::debug!("--systemd-cgroup accepted; a slice:prefix:name cgroupsPath is laid out as systemd would");
    }
    match dispatch(&g, cli.command) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            let msg = format!("{e:#}");
            if g.log.is_some() {
                // The shim shows the last error line of the log file to the user.
                tracing::error!("{msg}");
            }
            let _ = writeln!(std::io::stderr(), "rootcell: {msg}");
            // Interrupted, it ends as the signal would have ended it, once it has cleaned up:
            // a shell loop that runs it stops on a SIGINT as with any other program.
            if let Some(error::RuntimeError::Interrupted { signal, .. }) = e
                .chain()
                .find_map(|c| c.downcast_ref::<error::RuntimeError>())
            {
                die_by(*signal);
            }
            // `run`/`exec` of a program that cannot start exit like a shell would (127/126).
            let status = e
                .chain()
                .find_map(|c| match c.downcast_ref::<error::RuntimeError>() {
                    Some(error::RuntimeError::Process { status, .. }) => Some(*status),
                    _ => None,
                });
            std::process::exit(status.unwrap_or(1));
        }
    }
}

/// Ends the process by `signal` (its default action), or with 128 + `signal` if it survives.
fn die_by(signal: i32) -> ! {
    // SAFETY: resetting a disposition, unblocking and raising have no memory effects.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, signal);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(signal);
    }
    std::process::exit(128 + signal)
}

/// True if `a` is the value of a global flag (so not the subcommand's name).
fn is_global_value(a: &str) -> bool {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2).any(|w| {
        w[1] == a
            && matches!(
                w[0].as_str(),
                "--root" | "--log" | "--log-format" | "--hypervisor"
            )
    })
}

fn dispatch(g: &Global, command: Command) -> anyhow::Result<i32> {
    let out = |s: String| {
        let mut o = std::io::stdout();
        let _ = o.write_all(s.as_bytes());
        let _ = o.flush();
    };
    match command {
        Command::Create(a) => {
            let opts = CreateOptions {
                bundle: a.bundle,
                pid_file: a.pid_file,
                console_socket: a.console_socket,
                attached: false,
            };
            commands::create::create(g, &a.id, &opts)?;
        }
        Command::Run {
            detach,
            keep,
            create: a,
        } => {
            let opts = CreateOptions {
                bundle: a.bundle,
                pid_file: a.pid_file,
                console_socket: a.console_socket,
                attached: !detach,
            };
            return commands::run::run(g, &a.id, &opts, detach, keep);
        }
        Command::Start { id } => commands::start::start(g, &id)?,
        Command::State { id } => out(commands::state::state(g, &id)? + "\n"),
        Command::Kill { all, id, signal } => commands::kill::kill(g, &id, &signal, all)?,
        Command::Delete { force, id } => commands::delete::delete(g, &id, force)?,
        Command::List { format, quiet } => out(commands::list::list(g, &format, quiet)?),
        Command::Spec { bundle } => commands::spec::spec(&bundle)?,
        Command::Pause { id } => commands::pause::pause(g, &id, true)?,
        Command::Resume { id } => commands::pause::pause(g, &id, false)?,
        Command::Ps {
            format,
            id,
            ps_args: _,
        } => out(commands::ps::ps(g, &id, &format)?),
        Command::Pool { command } => return commands::pool::pool(g, command),
        Command::Features => out(commands::features::features() + "\n"),
        Command::Update { resources, id } => {
            commands::update::update(g, &id, resources.as_deref())?
        }
        Command::Events { stats, id, .. } => {
            if !stats {
                anyhow::bail!("`events` without --stats (a stream of events) is not supported by this rootcell version; `events --stats ID` prints one sample");
            }
            out(commands::events::stats(g, &id)?)
        }
        Command::Unsupported { .. } => {
            let name = std::env::args()
                .skip(1)
                .find(|a| !a.starts_with('-') && !is_global_value(a))
                .unwrap_or_default();
            anyhow::bail!("`{name}` is not supported by this rootcell version yet; use create/start/kill/delete");
        }
        Command::Exec {
            process,
            detach,
            pid_file,
            console_socket,
            tty,
            cwd,
            env,
            user,
            preserve_fds: _,
            id,
            command,
        } => {
            let o = commands::exec::ExecOptions {
                process_file: process,
                args: command,
                tty,
                cwd,
                env,
                user,
                detach,
                pid_file,
                console_socket,
            };
            return commands::exec::exec(g, &id, &o);
        }
        Command::Sandbox { .. } | Command::ExecRelay { .. } | Command::BuiltinVmm { .. } => {
            unreachable!("handled in main")
        }
    }
    Ok(0)
}

/// Logging for the long-lived sandbox and exec-relay processes: their stdio is the container's,
/// so their own logs never go there but to `--log` or the container's `sandbox.log`.
fn init_process_logging(g: &Global, id: &str) {
    let own_log = paths::state_dir(&g.root, id).join("sandbox.log");
    let file = g.log.clone().unwrap_or(own_log);
    logging::init(
        Some(&file),
        Box::new(std::io::sink()),
        g.log_format,
        g.debug,
    );
}
