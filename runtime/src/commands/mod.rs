//! The CLI commands, one file each (as runc's).

pub mod create;
pub mod delete;
pub mod events;
pub mod exec;
pub mod features;
pub mod kill;
pub mod list;
pub mod pause;
pub mod pool;
pub mod ps;
pub mod run;
pub mod spec;
pub mod start;
pub mod state;
pub mod update;

use crate::error::RuntimeError;
use crate::logging::Format;
use crate::state::ContainerState;
use std::path::PathBuf;

/// Global options every command sees.
#[derive(Debug, Clone)]
pub struct Global {
    /// State root (absolute).
    pub root: PathBuf,
    /// Log file.
    pub log: Option<PathBuf>,
    /// Log format.
    pub log_format: Format,
    /// Debug logging.
    pub debug: bool,
    /// `--guest-privileged`: the guest privilege policy for containers this call creates.
    pub guest_privileged: bool,
}

impl Global {
    /// Loads the state of `id`, or "container X does not exist".
    pub fn load(&self, id: &str) -> Result<ContainerState, RuntimeError> {
        crate::id::validate(id)?;
        ContainerState::load(&crate::paths::state_file(&self.root, id))
            .map_err(|_| RuntimeError::NotExist(id.to_string()))
    }

    /// The flags to pass on to a re-executed rootcell so it logs the same way.
    pub fn args(&self) -> Vec<String> {
        let mut a = vec!["--root".to_string(), self.root.display().to_string()];
        if let Some(l) = &self.log {
            a.extend(["--log".to_string(), l.display().to_string()]);
        }
        a.extend([
            "--log-format".to_string(),
            if self.log_format == Format::Json {
                "json"
            } else {
                "text"
            }
            .to_string(),
        ]);
        if self.debug {
            a.push("--debug".into());
        }
        a
    }
}
