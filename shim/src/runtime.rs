//! Running the `rootcell` binary, as containerd's runc shim runs runc.

use containerd_shim::monitor::{monitor_subscribe, wait_pid, Topic};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The rootcell binary and the state root the shim's containers live under.
#[derive(Debug, Clone)]
pub struct Rootcell {
    /// The binary (`rootcell` beside the shim, else on PATH).
    pub binary: PathBuf,
    /// `--root`: one per containerd state dir and namespace, so that a private containerd and
    /// the system one never see each other's containers, and the containers of a pod (same
    /// namespace) find each other's namespaces.
    pub root: PathBuf,
}

/// The stdio a rootcell command hands on to the process it starts.
pub struct Stdio3 {
    /// Standard input.
    pub stdin: Option<File>,
    /// Standard output.
    pub stdout: Option<File>,
    /// Standard error.
    pub stderr: Option<File>,
}

impl Rootcell {
    /// The runtime for a bundle under `<state>/io.containerd.runtime.v2.task/<ns>/<id>`.
    pub fn new(bundle: &Path, namespace: &str) -> Self {
        let binary = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("rootcell")))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("rootcell"));
        // The bundle's grandparent is containerd's state dir for this runtime plugin.
        let state = bundle
            .parent()
            .and_then(Path::parent)
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/run/containerd"));
        Rootcell {
            binary,
            root: state.join("rootcell").join(namespace),
        }
    }

    fn command(&self, log: Option<&Path>) -> Command {
        let mut c = Command::new(&self.binary);
        c.arg("--root").arg(&self.root);
        if let Some(l) = log {
            c.arg("--log").arg(l).args(["--log-format", "json"]);
        }
        c
    }

    /// Runs `rootcell ARGS` with its output captured; its error message on failure.
    pub fn run(&self, args: &[&str]) -> Result<String, String> {
        let sub = monitor_subscribe(Topic::Pid).map_err(|e| e.to_string())?;
        let mut c = self.command(None);
        c.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.binary.display()))?;
        let mut out = String::new();
        let mut err = String::new();
        use std::io::Read;
        let mut so = child.stdout.take().expect("piped");
        let mut se = child.stderr.take().expect("piped");
        // Small outputs: stderr after stdout cannot deadlock on the commands used here
        // (state and ps print little; the others print only errors).
        let _ = so.read_to_string(&mut out);
        let _ = se.read_to_string(&mut err);
        // The shim's reaper collects the child; its exit comes through the monitor.
        let code = wait_pid(child.id() as i32, sub);
        if code == 0 {
            Ok(out)
        } else {
            Err(last_line(&err)
                .unwrap_or_else(|| format!("rootcell {} exited with {code}", args[0])))
        }
    }

    /// Runs `rootcell ARGS` with `stdio` as its stdio (which `create` and `exec` hand on to the
    /// container); its errors go to the json log `log`, read back on failure.
    pub fn run_with_stdio(&self, args: &[String], stdio: Stdio3, log: &Path) -> Result<(), String> {
        let sub = monitor_subscribe(Topic::Pid).map_err(|e| e.to_string())?;
        let mut c = self.command(Some(log));
        c.args(args);
        c.stdin(stdio.stdin.map_or_else(Stdio::null, Stdio::from));
        c.stdout(stdio.stdout.map_or_else(Stdio::null, Stdio::from));
        c.stderr(stdio.stderr.map_or_else(Stdio::null, Stdio::from));
        let child = c
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.binary.display()))?;
        // Drop our copies of the container's stdio now, so that it closes when the container
        // is done with it.
        drop(c);
        let code = wait_pid(child.id() as i32, sub);
        if code == 0 {
            return Ok(());
        }
        Err(last_log_error(log)
            .unwrap_or_else(|| format!("rootcell {} exited with {code}", args[0])))
    }
}

fn last_line(s: &str) -> Option<String> {
    s.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim_start_matches("rootcell: ").to_string())
}

/// The last error message in a rootcell json log.
fn last_log_error(log: &Path) -> Option<String> {
    let data = std::fs::read_to_string(log).ok()?;
    data.lines().rev().find_map(|l| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        let level = v["level"].as_str().unwrap_or_default();
        if !level.eq_ignore_ascii_case("error") {
            return None;
        }
        v["msg"]
            .as_str()
            .or_else(|| v["fields"]["message"].as_str())
            .map(String::from)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reaper_test::{alone, with_reaper};

    fn rootcell(binary: &str) -> Rootcell {
        Rootcell {
            binary: binary.into(),
            root: std::env::temp_dir(),
        }
    }

    /// The serving shim's reaper collects every child with waitpid(-1), so a rootcell command
    /// must neither wait for its child itself nor be waited for by std: std's `Command` (no
    /// `pre_exec`, no env or uid changes, so posix_spawn) reports a failed exec as spawn's
    /// result, and the exit comes from the reaper through containerd-shim's monitor. Either
    /// outcome, many times over, against a reaper at its quickest.
    #[test]
    fn rootcell_commands_get_their_outcome_while_a_reaper_collects_every_child() {
        let name =
            "runtime::tests::rootcell_commands_get_their_outcome_while_a_reaper_collects_every_child";
        if !alone(name) {
            return;
        }
        let log = std::env::temp_dir().join(format!("rc-shim-rt-{}.log", std::process::id()));
        with_reaper(|| {
            for _ in 0..300 {
                let e = rootcell("/no/such/rootcell")
                    .run(&["state", "c1"])
                    .unwrap_err();
                assert!(e.starts_with("cannot run /no/such/rootcell: "), "{e}");
                let none = || Stdio3 {
                    stdin: None,
                    stdout: None,
                    stderr: None,
                };
                let e = rootcell("/no/such/rootcell")
                    .run_with_stdio(&["start".into(), "c1".into()], none(), &log)
                    .unwrap_err();
                assert!(e.starts_with("cannot run /no/such/rootcell: "), "{e}");
            }
            for _ in 0..50 {
                assert_eq!(
                    rootcell("/bin/true").run(&["state", "c1"]),
                    Ok(String::new())
                );
                let e = rootcell("/bin/false").run(&["state", "c1"]).unwrap_err();
                assert_eq!(e, "rootcell state exited with 1");
            }
        });
        let _ = std::fs::remove_file(&log);
    }
}
