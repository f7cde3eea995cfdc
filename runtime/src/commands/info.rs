//! `list`, `spec` and `features`.

use super::Global;
use crate::state::ContainerState;
use anyhow::{bail, Context, Result};
use std::path::Path;

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

/// `spec`: writes runc's default config.json (a `sh` with a terminal) into `bundle`.
pub fn spec(bundle: &Path) -> Result<()> {
    let path = bundle.join("config.json");
    if path.exists() {
        bail!("{} already exists; remove it first", path.display());
    }
    let mut s = oci_spec::runtime::Spec::default();
    s.set_hostname(Some("rootcell".into()));
    s.set_root(Some(
        oci_spec::runtime::RootBuilder::default()
            .path("rootfs")
            .readonly(true)
            .build()?,
    ));
    if let Some(p) = s.process_mut() {
        p.set_terminal(Some(true));
        p.set_no_new_privileges(Some(true));
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&s)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// `features`: what this runtime supports, in the OCI features format.
pub fn features() -> String {
    let v = serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.2.0",
        "hooks": ["prestart", "createRuntime", "poststart", "poststop"],
        "mountOptions": ["bind", "rbind", "ro", "rw"],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "uts"],
        },
        "annotations": {
            "io.github.rootcell.isolation": "microvm",
        },
    });
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_writes_a_loadable_runc_like_config() {
        let d = tempfile::tempdir().unwrap();
        spec(d.path()).unwrap();
        let s: oci_spec::runtime::Spec =
            serde_json::from_slice(&std::fs::read(d.path().join("config.json")).unwrap()).unwrap();
        let p = s.process().as_ref().unwrap();
        assert_eq!(p.args().as_ref().unwrap(), &vec!["sh".to_string()]);
        assert_eq!(p.terminal(), Some(true));
        assert!(s
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .any(|m| m.destination() == Path::new("/proc")));
        assert!(!s
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .as_ref()
            .unwrap()
            .is_empty());
        assert!(p.capabilities().is_some());
        assert!(spec(d.path()).is_err(), "must not overwrite");
    }
}
