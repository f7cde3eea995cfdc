//! `spec`: write a default config.json.

use anyhow::{bail, Context, Result};
use std::path::Path;

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
