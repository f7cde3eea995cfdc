//! The command line, shaped like runc's (global flags before or after the subcommand).

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use std::ffi::OsString;
use std::path::PathBuf;

impl Cli {
    /// Parses a command line as runc does: a flag given more than once (global or a
    /// subcommand's) takes its last value instead of being an error, since Docker puts
    /// daemon.json `runtimeArgs` before its own copies of the same global flags. Repeatable
    /// list flags (`exec --env`) still collect every value.
    pub fn try_parse_runc<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let mut cmd = Self::command()
            .args_override_self(true)
            .mut_subcommands(|s| s.args_override_self(true));
        let matches = cmd.try_get_matches_from_mut(args)?;
        Self::from_arg_matches(&matches).map_err(|e| e.format(&mut cmd))
    }
}

/// rootcell: an OCI runtime that runs every container in its own microVM.
#[derive(Debug, Parser)]
#[command(name = "rootcell", version, about)]
pub struct Cli {
    /// Directory for container state.
    #[arg(long, global = true, default_value = "/run/rootcell")]
    pub root: PathBuf,
    /// Append logs (and errors) to this file.
    #[arg(long, global = true)]
    pub log: Option<PathBuf>,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log debug messages and span timings.
    #[arg(long, global = true)]
    pub debug: bool,
    /// Hypervisor backend (default: $ROOTCELL_HYPERVISOR, else /etc/rootcell/config.json, else
    /// auto = builtin with hardware virtualization, qemu otherwise).
    #[arg(long, global = true, value_enum)]
    pub hypervisor: Option<crate::hypervisor::select::Choice>,
    /// Give every container created by this call what `docker run --privileged` gives, inside
    /// its guest: all capabilities, no masked or read-only paths, writable /sys and /proc/sys,
    /// the guest's devices (also `"guest_privileged": true` in /etc/rootcell/config.json).
    #[arg(long, global = true)]
    pub guest_privileged: bool,
    /// Accepted for runc compatibility: the form of `linux.cgroupsPath` says which layout it uses.
    #[arg(long, global = true, hide = true)]
    pub systemd_cgroup: bool,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// `--log-format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// JSON lines with level, msg and time.
    Json,
}

/// Options shared by `create` and `run`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Bundle directory (holds config.json).
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    /// Write the sandbox process's pid here.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Unix socket that receives the pty master for `terminal: true`.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Accepted for runc compatibility (no effect: the VM has its own root).
    #[arg(long, hide = true)]
    pub no_pivot: bool,
    /// Accepted for runc compatibility (no effect).
    #[arg(long, hide = true)]
    pub no_new_keyring: bool,
    /// Extra fds to pass; only 0 is supported.
    #[arg(long, default_value_t = 0, hide = true)]
    pub preserve_fds: u32,
    /// Container id.
    pub id: String,
}

/// `rootcell pool` subcommands.
#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Serve the pool configured in /etc/rootcell/config.json ("pool") until SIGTERM.
    Serve,
    /// Print the pool's counts as JSON.
    Status,
    /// Internal: one pooled VM's process.
    #[command(hide = true)]
    Vm {
        /// The VM's name.
        #[arg(long)]
        name: String,
        /// Its run dir.
        #[arg(long)]
        run_dir: PathBuf,
        /// Guest RAM in MiB.
        #[arg(long)]
        memory_mib: u64,
        /// vCPUs.
        #[arg(long)]
        vcpus: u32,
        /// The server's pid.
        #[arg(long)]
        server_pid: i32,
        /// Blank room (spaces) that a claim overwrites with the claiming container's state
        /// dir, so that `ps` names the container whose VM this process holds.
        #[arg(long)]
        claimed_for: Option<String>,
    },
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a container (boot its VM) without running the user program.
    Create(CreateArgs),
    /// Run the user program of a created container.
    Start {
        /// Container id.
        id: String,
    },
    /// Print the OCI state of a container.
    State {
        /// Container id.
        id: String,
    },
    /// Send a signal to the container's init process.
    Kill {
        /// Signal every process of the container.
        #[arg(short, long)]
        all: bool,
        /// Container id.
        id: String,
        /// Signal name or number.
        #[arg(default_value = "TERM")]
        signal: String,
    },
    /// Delete a container and everything it left on the host.
    Delete {
        /// Kill the container first if it is still running.
        #[arg(short, long)]
        force: bool,
        /// Container id.
        id: String,
    },
    /// Create and start a container, then wait for it (unless --detach).
    Run {
        /// Return after start instead of waiting.
        #[arg(short, long)]
        detach: bool,
        /// Keep the container's state after it exits.
        #[arg(long)]
        keep: bool,
        /// Create options.
        #[command(flatten)]
        create: CreateArgs,
    },
    /// List containers.
    List {
        /// Output format: table or json.
        #[arg(short, long, default_value = "table")]
        format: String,
        /// Print ids only.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Write a default config.json.
    Spec {
        /// Bundle directory to write it to.
        #[arg(short, long, default_value = ".")]
        bundle: PathBuf,
    },
    /// Print the features this runtime supports, as JSON.
    Features,
    /// Run another process in a running container.
    Exec {
        /// process.json to run (as Docker passes it).
        #[arg(short, long)]
        process: Option<PathBuf>,
        /// Return once the process runs.
        #[arg(short, long)]
        detach: bool,
        /// Write the relay process's pid here.
        #[arg(long)]
        pid_file: Option<PathBuf>,
        /// Unix socket that receives the pty master.
        #[arg(long)]
        console_socket: Option<PathBuf>,
        /// Allocate a terminal.
        #[arg(short, long)]
        tty: bool,
        /// Working directory.
        #[arg(long)]
        cwd: Option<String>,
        /// Extra environment (KEY=VALUE), repeatable.
        #[arg(short, long)]
        env: Vec<String>,
        /// `UID[:GID]`.
        #[arg(short, long)]
        user: Option<String>,
        /// Accepted for runc compatibility (no effect).
        #[arg(long, hide = true)]
        preserve_fds: Option<u32>,
        /// Container id.
        id: String,
        /// Command and arguments (without --process).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Freeze the container's VM.
    Pause {
        /// Container id.
        id: String,
    },
    /// Thaw the container's VM.
    Resume {
        /// Container id.
        id: String,
    },
    /// List the host processes of the container (its sandbox and VMM).
    Ps {
        /// Output format: table or json.
        #[arg(short, long, default_value = "table")]
        format: String,
        /// Container id.
        id: String,
        /// Extra `ps` arguments (ignored).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        ps_args: Vec<String>,
    },
    /// Change resource limits of a running container (CPU limits on the host cgroup).
    Update {
        /// resources JSON file, `-` for stdin (as Docker's shim passes it).
        #[arg(short = 'r', long)]
        resources: Option<String>,
        /// Container id.
        id: String,
    },
    /// One sample of the container's resource usage in the guest (`--stats`; a stream of
    /// events is not supported).
    Events {
        /// Print one stats sample and exit (the only form supported).
        #[arg(long)]
        stats: bool,
        /// runc's sampling interval (accepted, unused: there is no stream).
        #[arg(long)]
        interval: Option<String>,
        /// Container id.
        id: String,
    },
    /// Not supported yet: checkpoint, restore.
    #[command(name = "checkpoint", aliases = ["restore"], hide = true)]
    Unsupported {
        /// Whatever was passed.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        rest: Vec<String>,
    },
    /// Internal: relay of an exec'd process.
    #[command(hide = true)]
    ExecRelay {
        /// Container id.
        #[arg(long)]
        id: String,
        /// Exec id.
        #[arg(long)]
        exec_id: String,
        /// Readiness fd.
        #[arg(long)]
        ready_fd: i32,
        /// Console socket.
        #[arg(long)]
        console_socket: Option<PathBuf>,
        /// Relay the pty over our own stdio.
        #[arg(long)]
        tty_stdio: bool,
    },
    /// Keep VMs booted ahead of need, so containers start without waiting for a boot.
    Pool {
        /// What to do.
        #[command(subcommand)]
        command: PoolCommand,
    },
    /// Internal: the built-in VMM's own process, started by the sandbox (its control socket
    /// is stdin).
    #[command(hide = true)]
    BuiltinVmm {
        /// Whose VM it runs (a container's state dir or a pool VM's dir): not used, only
        /// shown, so that `ps` tells which container the process serves.
        #[arg(long = "for")]
        owner: Option<PathBuf>,
    },
    /// Internal: the per-container sandbox process.
    #[command(hide = true)]
    Sandbox {
        /// Container id.
        #[arg(long)]
        id: String,
        /// Readiness fd.
        #[arg(long)]
        ready_fd: i32,
        /// Console socket.
        #[arg(long)]
        console_socket: Option<PathBuf>,
        /// Relay the pty over our own stdio.
        #[arg(long)]
        tty_stdio: bool,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn docker_style_invocations_parse() {
        let c = Cli::try_parse_from([
            "rootcell",
            "--root",
            "/run/docker/runtime-runc/moby",
            "--log",
            "/b/log.json",
            "--log-format",
            "json",
            "create",
            "--bundle",
            "/b",
            "--pid-file",
            "/b/init.pid",
            "abc",
        ])
        .unwrap();
        assert_eq!(c.log_format, LogFormat::Json);
        assert!(
            matches!(c.command, Command::Create(ref a) if a.id == "abc" && a.pid_file.is_some())
        );
        let k = Cli::try_parse_from(["rootcell", "kill", "abc"]).unwrap();
        assert!(
            matches!(k.command, Command::Kill { ref signal, all: false, .. } if signal == "TERM")
        );
        let k = Cli::try_parse_from(["rootcell", "--systemd-cgroup", "kill", "--all", "abc", "9"])
            .unwrap();
        assert!(matches!(k.command, Command::Kill { ref signal, all: true, .. } if signal == "9"));
        let d = Cli::try_parse_from(["rootcell", "delete", "-f", "abc"]).unwrap();
        assert!(matches!(d.command, Command::Delete { force: true, .. }));
        let r = Cli::try_parse_from(["rootcell", "run", "-b", "/b", "-d", "x"]).unwrap();
        assert!(matches!(r.command, Command::Run { detach: true, .. }));
    }

    #[test]
    fn repeated_flags_take_the_last_value_as_runc_does() {
        let c = Cli::try_parse_runc([
            "rootcell",
            "--log-format",
            "text",
            "--root",
            "/first",
            "--log",
            "/a.log",
            "--debug",
            "--debug",
            "--log-format",
            "json",
            "--root",
            "/second",
            "--log",
            "/b.log",
            "--systemd-cgroup",
            "delete",
            "--root",
            "/third",
            "--force",
            "--force",
            "x",
        ])
        .unwrap();
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.root, PathBuf::from("/third"));
        assert_eq!(c.log, Some(PathBuf::from("/b.log")));
        assert!(c.debug);
        assert!(matches!(c.command, Command::Delete { force: true, ref id } if id == "x"));
        let c = Cli::try_parse_runc(["rootcell", "create", "-b", "/b1", "--bundle", "/b2", "c1"])
            .unwrap();
        assert!(matches!(c.command, Command::Create(ref a) if a.bundle == Path::new("/b2")));
        // List flags keep every value.
        let c = Cli::try_parse_runc(["rootcell", "exec", "-e", "A=1", "--env", "B=2", "x", "sh"])
            .unwrap();
        assert!(
            matches!(c.command, Command::Exec { ref env, .. } if env == &["A=1", "B=2"]),
            "{:?}",
            c.command
        );
        // Real mistakes are still errors.
        assert!(Cli::try_parse_runc(["rootcell", "--log-format", "xml", "state", "x"]).is_err());
        assert!(Cli::try_parse_runc(["rootcell", "--bogus", "state", "x"]).is_err());
    }

    #[test]
    fn hypervisor_flag_is_global() {
        use crate::hypervisor::select::Choice;
        let c =
            Cli::try_parse_from(["rootcell", "--hypervisor", "builtin", "create", "x"]).unwrap();
        assert_eq!(c.hypervisor, Some(Choice::Builtin));
        let c = Cli::try_parse_from(["rootcell", "run", "--hypervisor", "qemu", "x"]).unwrap();
        assert_eq!(c.hypervisor, Some(Choice::Qemu));
        assert_eq!(
            Cli::try_parse_from(["rootcell", "state", "x"])
                .unwrap()
                .hypervisor,
            None
        );
        assert!(Cli::try_parse_from(["rootcell", "--hypervisor", "kvm", "state", "x"]).is_err());
    }
}
