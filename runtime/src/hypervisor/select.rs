//! Which hypervisor backend boots a sandbox's guest. Precedence: `--hypervisor` (which `main`
//! turns into `ROOTCELL_HYPERVISOR` so re-executed helpers see it), then `ROOTCELL_HYPERVISOR`,
//! then the config file (`/etc/rootcell/config.json`, or `ROOTCELL_CONFIG`), then `auto`.
//! `auto` picks the built-in VMM only where /dev/kvm opens and the CPU shows vmx/svm: a software
//! /dev/kvm (such as kvm_pvm) cannot boot a stock guest, so QEMU with TCG is the safe choice.

use std::path::{Path, PathBuf};

/// Environment variable that selects the backend (also set by `--hypervisor`).
pub const ENV: &str = "ROOTCELL_HYPERVISOR";
/// Environment variable that overrides the config file's path.
pub const CONFIG_ENV: &str = "ROOTCELL_CONFIG";
/// Default config file.
pub const DEFAULT_CONFIG: &str = "/etc/rootcell/config.json";

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Choice {
    /// Built-in VMM where hardware virtualization exists, else QEMU.
    Auto,
    /// rootcell's own KVM VMM (in a process of its own under the sandbox).
    Builtin,
    /// QEMU microvm (KVM or TCG).
    Qemu,
}

impl Choice {
    /// The name used on the command line, in the env and in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Choice::Auto => "auto",
            Choice::Builtin => "builtin",
            Choice::Qemu => "qemu",
        }
    }

    /// Parses a user-supplied name; `origin` names where it came from for the error.
    pub fn parse(value: &str, origin: &str) -> Result<Self, SelectError> {
        match value.trim() {
            "auto" => Ok(Choice::Auto),
            "builtin" => Ok(Choice::Builtin),
            "qemu" => Ok(Choice::Qemu),
            _ => Err(SelectError::BadValue {
                origin: origin.to_string(),
                value: value.to_string(),
            }),
        }
    }
}

/// The backend that will actually run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// rootcell's own KVM VMM.
    Builtin,
    /// QEMU.
    Qemu,
}

impl Backend {
    /// Short name, as in `--hypervisor`.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Builtin => "builtin",
            Backend::Qemu => "qemu",
        }
    }
}

/// The resolved backend and why, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// The backend to use.
    pub backend: Backend,
    /// Human-readable reason: where the choice came from and, for `auto`, what the host has.
    pub reason: String,
}

/// Errors choosing a backend.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    /// A hypervisor name that is not builtin, qemu or auto.
    #[error("invalid hypervisor {value:?} in {origin}: expected builtin, qemu or auto")]
    BadValue {
        /// Where the value came from (env variable or file).
        origin: String,
        /// The value.
        value: String,
    },
    /// The config file exists (or was named by ROOTCELL_CONFIG) but cannot be read.
    #[error("cannot read rootcell config {path}: {source}")]
    ConfigRead {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The config file is not valid.
    #[error("invalid rootcell config {path}: {msg} (expected JSON such as {{\"hypervisor\": \"auto\"}})")]
    ConfigParse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
}

/// The contents of the config file.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Backend choice.
    #[serde(default)]
    pub hypervisor: Option<Choice>,
    /// The guest privilege policy for every container (as `--guest-privileged`).
    #[serde(default)]
    pub guest_privileged: Option<bool>,
    /// The VM pool `rootcell pool serve` keeps (see [`crate::pool`]).
    #[serde(default)]
    pub pool: Option<crate::pool::PoolConfig>,
}

/// Parses config file text; `path` is only for the error.
pub fn parse_config(text: &str, path: &Path) -> Result<FileConfig, SelectError> {
    serde_json::from_str(text).map_err(|e| SelectError::ConfigParse {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

/// Reads the config file. A missing file is "no config" unless the user named it
/// (`explicit`), in which case it is an error: a typo in ROOTCELL_CONFIG must not be ignored.
pub fn read_config(path: &Path, explicit: bool) -> Result<FileConfig, SelectError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_config(&text, path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
            Ok(FileConfig::default())
        }
        Err(source) => Err(SelectError::ConfigRead {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// What `auto` looks at on the host.
#[derive(Debug, Clone)]
pub struct HostProbe {
    /// Whether /dev/kvm opens read-write (the error text otherwise).
    pub kvm: Result<(), String>,
    /// The text of /proc/cpuinfo (empty if unreadable).
    pub cpuinfo: String,
}

impl HostProbe {
    /// Looks at this machine.
    pub fn detect() -> Self {
        let kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map(drop)
            .map_err(|e| e.to_string());
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        HostProbe { kvm, cpuinfo }
    }
}

impl HostProbe {
    /// Whether a real (hardware-assisted) KVM is there: /dev/kvm opens and the CPU has vmx/svm.
    pub fn hardware_kvm(&self) -> bool {
        self.kvm.is_ok() && has_hw_virt(&self.cpuinfo)
    }

    /// What the probe found, in words for logs and errors.
    pub fn describe(&self) -> String {
        match (&self.kvm, has_hw_virt(&self.cpuinfo)) {
            (Ok(()), true) => "/dev/kvm is usable and the CPU has vmx/svm".into(),
            (Ok(()), false) => "/dev/kvm exists but /proc/cpuinfo shows no vmx/svm (software KVM, which cannot boot the guest); using QEMU with TCG".into(),
            (Err(e), _) => format!("/dev/kvm is not usable ({e}); using QEMU with TCG"),
        }
    }
}

/// True if a `flags` line of `cpuinfo` has vmx (Intel VT-x) or svm (AMD-V).
pub fn has_hw_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// What `auto` resolves to on a host, and why.
pub fn decide_auto(probe: &HostProbe) -> (Backend, String) {
    let backend = if probe.hardware_kvm() {
        Backend::Builtin
    } else {
        Backend::Qemu
    };
    (backend, probe.describe())
}

/// Resolves the backend from the env value (`ROOTCELL_HYPERVISOR`, already carrying any
/// `--hypervisor`), the config file, and `probe` (called only for `auto`).
pub fn resolve(
    env: Option<&str>,
    config_path: &Path,
    config_explicit: bool,
    probe: impl FnOnce() -> HostProbe,
) -> Result<Selection, SelectError> {
    let (choice, origin) = match env.filter(|v| !v.trim().is_empty()) {
        Some(v) => (
            Choice::parse(v, ENV)?,
            format!("{ENV}={v}, set directly or by --hypervisor"),
        ),
        None => match read_config(config_path, config_explicit)?.hypervisor {
            Some(c) => (c, format!("{} in {}", c.as_str(), config_path.display())),
            None => (Choice::Auto, "default".to_string()),
        },
    };
    Ok(match choice {
        Choice::Builtin => Selection {
            backend: Backend::Builtin,
            reason: format!("requested by {origin}"),
        },
        Choice::Qemu => Selection {
            backend: Backend::Qemu,
            reason: format!("requested by {origin}"),
        },
        Choice::Auto => {
            let (backend, why) = decide_auto(&probe());
            Selection {
                backend,
                reason: format!("auto ({origin}): {why}"),
            }
        }
    })
}

/// The config file's path (`ROOTCELL_CONFIG` or the default) and whether the user named it.
pub fn config_path_from_env() -> (PathBuf, bool) {
    match std::env::var_os(CONFIG_ENV) {
        Some(p) if !p.is_empty() => (PathBuf::from(p), true),
        _ => (PathBuf::from(DEFAULT_CONFIG), false),
    }
}

/// The config file this process's environment names (empty when there is none).
pub fn config_from_env() -> Result<FileConfig, SelectError> {
    let (path, explicit) = config_path_from_env();
    read_config(&path, explicit)
}

/// [`resolve`] with this process's environment and this machine.
pub fn resolve_from_env() -> Result<Selection, SelectError> {
    let env = std::env::var(ENV).ok();
    let (path, explicit) = config_path_from_env();
    resolve(env.as_deref(), &path, explicit, HostProbe::detect)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VMX: &str = "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr vmx sse2\n";
    const SVM: &str = "processor\t: 0\nflags\t\t: fpu svm lm\n";
    const NONE: &str =
        "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr sse2 hypervisor\nvmx flags\t: none\n";

    fn probe(kvm: bool, cpuinfo: &str) -> HostProbe {
        HostProbe {
            kvm: if kvm {
                Ok(())
            } else {
                Err("No such file or directory (os error 2)".into())
            },
            cpuinfo: cpuinfo.into(),
        }
    }

    fn no_config() -> PathBuf {
        PathBuf::from("/nonexistent/rootcell-config.json")
    }

    #[test]
    fn hw_virt_flags_are_read_from_flags_lines_only() {
        assert!(has_hw_virt(VMX));
        assert!(has_hw_virt(SVM));
        assert!(!has_hw_virt(NONE));
        assert!(!has_hw_virt(""));
        // A substring is not a flag.
        assert!(!has_hw_virt("flags\t: vmxx svm2\n"));
    }

    #[test]
    fn auto_needs_both_kvm_and_hw_virt() {
        assert_eq!(decide_auto(&probe(true, VMX)).0, Backend::Builtin);
        assert_eq!(decide_auto(&probe(true, SVM)).0, Backend::Builtin);
        let (b, why) = decide_auto(&probe(true, NONE));
        assert_eq!(b, Backend::Qemu);
        assert!(why.contains("no vmx/svm") && why.contains("TCG"), "{why}");
        let (b, why) = decide_auto(&probe(false, VMX));
        assert_eq!(b, Backend::Qemu);
        assert!(
            why.contains("/dev/kvm is not usable") && why.contains("os error 2"),
            "{why}"
        );
    }

    #[test]
    fn precedence_env_over_config_over_default() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config.json");
        std::fs::write(&cfg, r#"{"hypervisor": "builtin"}"#).unwrap();
        let never = || -> HostProbe { panic!("auto was not asked for") };
        // Env wins over the file.
        let s = resolve(Some("qemu"), &cfg, true, never).unwrap();
        assert_eq!(s.backend, Backend::Qemu);
        assert!(
            s.reason.contains("ROOTCELL_HYPERVISOR=qemu"),
            "{}",
            s.reason
        );
        // File wins over the default.
        let s = resolve(None, &cfg, true, never).unwrap();
        assert_eq!(s.backend, Backend::Builtin);
        assert!(
            s.reason.contains(&cfg.display().to_string()),
            "{}",
            s.reason
        );
        // An empty env value counts as unset.
        assert_eq!(
            resolve(Some(""), &cfg, true, never).unwrap().backend,
            Backend::Builtin
        );
        // No env, no file: auto, which consults the host.
        let s = resolve(None, &no_config(), false, || probe(true, NONE)).unwrap();
        assert_eq!(s.backend, Backend::Qemu);
        assert!(s.reason.starts_with("auto (default)"), "{}", s.reason);
        let s = resolve(Some("auto"), &cfg, true, || probe(true, VMX)).unwrap();
        assert_eq!(s.backend, Backend::Builtin);
        // A file without the key is the default.
        std::fs::write(&cfg, "{}").unwrap();
        let s = resolve(None, &cfg, true, || probe(false, VMX)).unwrap();
        assert_eq!(s.backend, Backend::Qemu);
    }

    #[test]
    fn bad_values_and_files_are_clear_errors() {
        let e = resolve(Some("kvm"), &no_config(), false, || probe(true, VMX)).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("\"kvm\"")
                && msg.contains("ROOTCELL_HYPERVISOR")
                && msg.contains("builtin, qemu or auto"),
            "{msg}"
        );

        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config.json");
        for (text, want) in [
            ("{\"hypervisor\": \"kvm\"}", "unknown variant `kvm`"),
            ("{\"hypervisor\": auto}", "expected value"),
            ("{\"hypervisr\": \"auto\"}", "unknown field `hypervisr`"),
            ("\"auto\"", "invalid type"),
        ] {
            std::fs::write(&cfg, text).unwrap();
            let msg = resolve(None, &cfg, false, || probe(true, VMX))
                .unwrap_err()
                .to_string();
            assert!(msg.contains(&cfg.display().to_string()), "{msg}");
            assert!(
                msg.contains("invalid rootcell config") && msg.contains(want),
                "{text}: {msg}"
            );
        }
        // A missing default file is fine; a missing file the user named is not.
        assert!(read_config(&no_config(), false)
            .unwrap()
            .hypervisor
            .is_none());
        let msg = read_config(&no_config(), true).unwrap_err().to_string();
        assert!(
            msg.contains("cannot read rootcell config /nonexistent/rootcell-config.json"),
            "{msg}"
        );
        // A directory is not a config file.
        let msg = read_config(dir.path(), false).unwrap_err().to_string();
        assert!(msg.contains("cannot read rootcell config"), "{msg}");
    }

    #[test]
    fn choice_names_round_trip() {
        for c in [Choice::Auto, Choice::Builtin, Choice::Qemu] {
            assert_eq!(Choice::parse(c.as_str(), "test").unwrap(), c);
        }
        assert_eq!(Backend::Builtin.as_str(), "builtin");
    }
}
