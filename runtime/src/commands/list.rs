//! `list`: the containers under the state root.

use crate::commands::Global;
use crate::state::ContainerState;
use anyhow::{bail, Result};

/// `list`: every container under the root, as a table, JSON, or ids only.
pub fn list(g: &Global, format: &str, quiet: bool) -> Result<String> {
    let mut states: Vec<ContainerState> = std::fs::read_dir(&g.root)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| ContainerState::load(&e.path().join("state.json")).ok())
                .map(|s| s.refreshed())
                .collect()
        })
        .unwrap_or_default();
    states.sort_by(|a, b| a.created.cmp(&b.created));
    if quiet {
        return Ok(states.iter().map(|s| format!("{}\n", s.id)).collect());
    }
    match format {
        "json" => {
            let v: Vec<serde_json::Value> = states.iter().map(|s| s.oci_json()).collect();
            Ok(serde_json::to_string(&v)? + "\n")
        }
        "table" => {
            let mut rows =
                vec![["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"].map(String::from)];
            for s in &states {
                let pid = s.oci_json()["pid"].to_string();
                rows.push([
                    s.id.clone(),
                    pid,
                    s.status.as_str().into(),
                    s.bundle.display().to_string(),
                    s.created.clone(),
                    "root".into(),
                ]);
            }
            let widths: Vec<usize> = (0..6)
                .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
                .collect();
            let mut out = String::new();
            for r in rows {
                let cells: Vec<String> = r
                    .iter()
                    .zip(&widths)
                    .map(|(c, w)| format!("{c:<w$}"))
                    .collect();
                out.push_str(cells.join("   ").trim_end());
                out.push('\n');
            }
            Ok(out)
        }
        other => bail!("invalid --format {other:?}: use table or json"),
    }
}
