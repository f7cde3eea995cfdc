//! `ps`: the host processes that hold the container.

use crate::commands::Global;
use crate::state::process_alive;
use anyhow::{bail, Result};

/// `ps ID`: the host processes that make up the container (its sandbox and VMM); the guest's
/// own processes live in another kernel.
pub fn ps(g: &Global, id: &str, format: &str) -> Result<String> {
    let st = g.load(id)?.refreshed();
    let pids: Vec<i32> = [(st.pid, st.pid_start), (st.vm_pid, st.vm_pid_start)]
        .into_iter()
        .filter(|(p, s)| *p > 0 && process_alive(*p, *s))
        .map(|(p, _)| p)
        .collect();
    match format {
        "json" => Ok(serde_json::to_string(&pids)? + "\n"),
        "table" => {
            if pids.is_empty() {
                return Ok(String::new());
            }
            let list: Vec<String> = pids.iter().map(|p| p.to_string()).collect();
            let out = std::process::Command::new("ps")
                .args(["-f", "-p", &list.join(",")])
                .output()?;
            Ok(String::from_utf8_lossy(&out.stdout).to_string())
        }
        other => bail!("invalid --format {other:?}: use table or json"),
    }
}
