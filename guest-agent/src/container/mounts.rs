//! OCI `mounts` entries: option parsing (pure) and performing one mount inside the new root.

use super::error::{Context, SetupError};
use super::paths::{create_mount_target, resolve_in_root, TargetKind};
use crate::alog;
use nix::mount::{mount, MsFlags};
use oci_spec::runtime::Mount;
use std::path::{Path, PathBuf};

/// Mount options split into what `mount(2)` needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// Flags to set.
    pub flags: MsFlags,
    /// Propagation changes to apply after mounting (each its own `mount(2)` call).
    pub propagation: Vec<MsFlags>,
    /// Filesystem-specific options, passed as the `data` string.
    pub data: Vec<String>,
    /// A bind mount (`bind` or `rbind`).
    pub bind: bool,
    /// A recursive bind mount (`rbind`).
    pub recursive: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            flags: MsFlags::empty(),
            propagation: Vec::new(),
            data: Vec::new(),
            bind: false,
            recursive: false,
        }
    }
}

impl MountOptions {
    /// The data argument, `None` if empty.
    pub fn data_string(&self) -> Option<String> {
        (!self.data.is_empty()).then(|| self.data.join(","))
    }

    /// Flags that need a remount after a bind mount to take effect (bind ignores them).
    pub fn remount_flags(&self) -> MsFlags {
        self.flags & !(MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_REMOUNT)
    }
}

/// Parses OCI/fstab-style mount options.
pub fn parse_options(options: &[String]) -> MountOptions {
    let mut o = MountOptions::default();
    for opt in options {
        let (set, clear) = match opt.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty()),
            "nomand" => (MsFlags::empty(), MsFlags::MS_MANDLOCK),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "nostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME),
            "remount" => (MsFlags::MS_REMOUNT, MsFlags::empty()),
            "bind" => {
                o.bind = true;
                (MsFlags::MS_BIND, MsFlags::empty())
            }
            "rbind" => {
                o.bind = true;
                o.recursive = true;
                (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty())
            }
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable"
            | "runbindable" => {
                o.propagation
                    .push(propagation_flags(opt).unwrap_or(MsFlags::MS_PRIVATE));
                continue;
            }
            // Docker/containerd-only hints with no kernel meaning.
            "tmpcopyup" | "defaults" => continue,
            _ => {
                o.data.push(opt.clone());
                continue;
            }
        };
        o.flags = (o.flags | set) & !clear;
    }
    o
}

/// Propagation flags for a propagation keyword (`rprivate` -> PRIVATE|REC).
pub fn propagation_flags(name: &str) -> Option<MsFlags> {
    let (rec, base) = match name.strip_prefix('r') {
        Some(b) if b != "o" => (MsFlags::MS_REC, b),
        _ => (MsFlags::empty(), name),
    };
    let flag = match base {
        "private" => MsFlags::MS_PRIVATE,
        "shared" => MsFlags::MS_SHARED,
        "slave" => MsFlags::MS_SLAVE,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        _ => return None,
    };
    Some(flag | rec)
}

/// Host facts that change how some mount types are performed.
#[derive(Debug, Clone, Copy, Default)]
pub struct MountEnv {
    /// The guest has a cgroup2 hierarchy: `cgroup` mounts become cgroup2 mounts.
    pub cgroup2: bool,
}

/// Performs one spec mount below `root` (before pivot_root). Returns the target path.
pub fn mount_entry(root: &Path, m: &Mount, env: MountEnv) -> Result<PathBuf, SetupError> {
    let opts = parse_options(m.options().as_deref().unwrap_or(&[]));
    let typ = m.typ().as_deref().unwrap_or("");
    let dest = resolve_in_root(root, m.destination())?;
    let bind = opts.bind || typ == "bind";

    if bind {
        let source = m.source().as_ref().ok_or_else(|| {
            SetupError::other(format!(
                "bind mount to {} has no source",
                m.destination().display()
            ))
        })?;
        let meta =
            std::fs::metadata(source).ctx(|| format!("bind mount source {}", source.display()))?;
        let kind = if meta.is_dir() {
            TargetKind::Dir
        } else {
            TargetKind::File
        };
        create_mount_target(&dest, kind)?;
        let mut flags = MsFlags::MS_BIND;
        if opts.recursive {
            flags |= MsFlags::MS_REC;
        }
        mount(
            Some(source.as_path()),
            &dest,
            None::<&str>,
            flags,
            None::<&str>,
        )
        .ctx(|| {
            format!(
                "bind mount {} on {}",
                source.display(),
                m.destination().display()
            )
        })?;
        let extra = opts.remount_flags();
        if !extra.is_empty() {
            // A bind mount ignores most flags; they apply only through a remount.
            mount(
                None::<&str>,
                &dest,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | extra,
                None::<&str>,
            )
            .ctx(|| format!("remount {} with {:?}", m.destination().display(), extra))?;
        }
    } else {
        create_mount_target(&dest, TargetKind::Dir)?;
        let (fstype, source) = match typ {
            "cgroup" | "cgroup2" if env.cgroup2 => ("cgroup2", "cgroup2".to_string()),
            "cgroup" => {
                alog!(
                    "skipping cgroup v1 mount on {} (no cgroup2 hierarchy)",
                    m.destination().display()
                );
                return Ok(dest);
            }
            "" => {
                return Err(SetupError::other(format!(
                    "mount on {} has no type",
                    m.destination().display()
                )))
            }
            t => (
                t,
                m.source()
                    .as_ref()
                    .map(|s| s.display().to_string())
                    .unwrap_or_else(|| t.to_string()),
            ),
        };
        let data = opts.data_string();
        mount(
            Some(source.as_str()),
            &dest,
            Some(fstype),
            opts.flags,
            data.as_deref(),
        )
        .ctx(|| format!("mount {fstype} on {}", m.destination().display()))?;
    }
    for p in &opts.propagation {
        mount(None::<&str>, &dest, None::<&str>, *p, None::<&str>)
            .ctx(|| format!("set propagation of {}", m.destination().display()))?;
    }
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(list: &[&str]) -> MountOptions {
        parse_options(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn docker_proc_and_dev_options() {
        let o = opts(&["nosuid", "noexec", "nodev"]);
        assert_eq!(
            o.flags,
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV
        );
        assert!(o.data.is_empty() && !o.bind);

        let o = opts(&["nosuid", "strictatime", "mode=755", "size=65536k"]);
        assert_eq!(o.flags, MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME);
        assert_eq!(o.data_string().as_deref(), Some("mode=755,size=65536k"));

        let o = opts(&[
            "nosuid",
            "noexec",
            "newinstance",
            "ptmxmode=0666",
            "mode=0620",
            "gid=5",
        ]);
        assert_eq!(
            o.data_string().as_deref(),
            Some("newinstance,ptmxmode=0666,mode=0620,gid=5")
        );
    }

    #[test]
    fn bind_options_and_later_options_win() {
        let o = opts(&["rbind", "rprivate", "ro", "rw", "ro"]);
        assert!(o.bind && o.recursive);
        assert_eq!(o.propagation, vec![MsFlags::MS_PRIVATE | MsFlags::MS_REC]);
        assert_eq!(o.remount_flags(), MsFlags::MS_RDONLY);

        let o = opts(&["bind", "ro", "rw"]);
        assert!(o.bind && !o.recursive);
        assert!(o.remount_flags().is_empty());
    }

    #[test]
    fn propagation_keywords() {
        assert_eq!(
            propagation_flags("rslave"),
            Some(MsFlags::MS_SLAVE | MsFlags::MS_REC)
        );
        assert_eq!(propagation_flags("shared"), Some(MsFlags::MS_SHARED));
        assert_eq!(
            propagation_flags("runbindable"),
            Some(MsFlags::MS_UNBINDABLE | MsFlags::MS_REC)
        );
        assert_eq!(propagation_flags("ro"), None);
        assert_eq!(propagation_flags("bogus"), None);
    }
}
