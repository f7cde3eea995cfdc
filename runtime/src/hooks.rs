//! Running OCI hooks on the host with the container state on stdin.

use oci_spec::runtime::Hook;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A hook that failed.
#[derive(Debug, thiserror::Error)]
#[error("{kind} hook {path} failed: {msg}")]
pub struct HookError {
    /// Which hook list.
    pub kind: &'static str,
    /// The hook's program.
    pub path: String,
    /// What happened, with its output.
    pub msg: String,
}

/// Runs `hooks` in order; stops at the first failure. Output is captured, never inherited (the
/// sandbox's stdio belongs to the container).
pub fn run(kind: &'static str, hooks: &[Hook], state_json: &str) -> Result<(), HookError> {
    for h in hooks {
        let _span = tracing::info_span!("hook", kind, path = %h.path().display()).entered();
        run_one(kind, h, state_json)?;
    }
    Ok(())
}

/// Runs every hook of `hooks` in order, also after one fails, and logs each failure as a
/// warning: the runtime spec's rule for poststart and poststop hooks, whose failures must not
/// keep the remaining hooks of that phase from running. Returns the failures.
pub fn run_all(kind: &'static str, hooks: &[Hook], state_json: &str) -> Vec<HookError> {
    let mut failed = Vec::new();
    for h in hooks {
        let _span = tracing::info_span!("hook", kind, path = %h.path().display()).entered();
        if let Err(e) = run_one(kind, h, state_json) {
            tracing::warn!("{e}; running the remaining {kind} hooks");
            failed.push(e);
        }
    }
    failed
}

fn run_one(kind: &'static str, h: &Hook, state_json: &str) -> Result<(), HookError> {
    let err = |msg: String| HookError {
        kind,
        path: h.path().display().to_string(),
        msg,
    };
    let mut cmd = Command::new(h.path());
    let args = h.args().clone().unwrap_or_default();
    if let Some((argv0, rest)) = args.split_first() {
        cmd.arg0(argv0).args(rest);
    }
    cmd.env_clear();
    for kv in h.env().iter().flatten() {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| err(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that ignores its stdin may close it early; that is not a failure.
        let _ = stdin.write_all(state_json.as_bytes());
    }
    let timeout = h
        .timeout()
        .filter(|t| *t > 0)
        .map(|t| Duration::from_secs(t as u64));
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if timeout.is_some_and(|t| start.elapsed() > t) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(err(format!(
                    "timed out after {} s",
                    timeout.unwrap_or_default().as_secs()
                )));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(err(e.to_string())),
        }
    }
    let out = child.wait_with_output().map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        return Err(err(format!("{}: {}", out.status, text.trim())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::HookBuilder;

    #[test]
    fn hook_gets_state_on_stdin() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let h = HookBuilder::default()
            .path("/bin/sh")
            .args(vec![
                "sh".to_string(),
                "-c".into(),
                format!("cat > {}", out.display()),
            ])
            .build()
            .unwrap();
        run("prestart", &[h], r#"{"id":"x"}"#).unwrap();
        assert_eq!(std::fs::read_to_string(out).unwrap(), r#"{"id":"x"}"#);
    }

    #[test]
    fn a_failing_poststop_hook_does_not_stop_the_next_ones() {
        let dir = tempfile::tempdir().unwrap();
        let sh = |script: String| {
            HookBuilder::default()
                .path("/bin/sh")
                .args(vec!["sh".to_string(), "-c".into(), script])
                .build()
                .unwrap()
        };
        let hooks = [
            sh("exit 7".into()),
            sh(format!("echo second > {}", dir.path().join("2").display())),
            HookBuilder::default()
                .path("/nonexistent/hook")
                .build()
                .unwrap(),
            sh(format!("echo fourth > {}", dir.path().join("4").display())),
        ];
        let failed = run_all("poststop", &hooks, "{}");
        assert_eq!(failed.len(), 2, "{failed:?}");
        assert!(failed[0].msg.contains('7'), "{}", failed[0]);
        assert_eq!(failed[1].path, "/nonexistent/hook");
        assert!(
            dir.path().join("2").exists(),
            "hook after a failing one ran"
        );
        assert!(
            dir.path().join("4").exists(),
            "hook after a missing one ran"
        );
        // The fatal phases keep stopping at the first failure.
        assert!(run("prestart", &hooks[..2], "{}").is_err());
        std::fs::remove_file(dir.path().join("2")).unwrap();
        let _ = run("prestart", &hooks[..2], "{}");
        assert!(!dir.path().join("2").exists());
    }

    #[test]
    fn failing_hook_reports_output() {
        let h = HookBuilder::default()
            .path("/bin/sh")
            .args(vec![
                "sh".to_string(),
                "-c".into(),
                "echo boom >&2; exit 3".into(),
            ])
            .build()
            .unwrap();
        let e = run("poststop", &[h], "{}").unwrap_err().to_string();
        assert!(e.contains("boom") && e.contains("poststop"), "{e}");
    }
}
