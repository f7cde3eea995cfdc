//! Locating the guest kernel and initramfs.

use crate::hypervisor::HypervisorError;
use std::path::PathBuf;

/// Default guest kernel.
pub const DEFAULT_KERNEL: &str = "/usr/local/share/rootcell/bzImage";
/// Default guest initramfs.
pub const DEFAULT_INITRD: &str = "/usr/local/share/rootcell/initramfs.cpio.gz";

/// Guest boot files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImages {
    /// Kernel image (bzImage).
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: PathBuf,
}

/// `$ROOTCELL_KERNEL` / `$ROOTCELL_INITRD`, else the defaults; both must exist.
pub fn locate() -> Result<GuestImages, HypervisorError> {
    let pick = |var: &str, default: &str, what: &'static str, hint: &'static str| {
        let p = std::env::var_os(var)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(default));
        if p.is_file() {
            Ok(p)
        } else {
            Err(HypervisorError::Missing {
                what,
                path: p,
                hint,
            })
        }
    };
    Ok(GuestImages {
        kernel: pick(
            "ROOTCELL_KERNEL",
            DEFAULT_KERNEL,
            "guest kernel",
            "install rootcell's guest kernel there or set ROOTCELL_KERNEL",
        )?,
        initrd: pick(
            "ROOTCELL_INITRD",
            DEFAULT_INITRD,
            "guest initramfs",
            "install rootcell's initramfs there or set ROOTCELL_INITRD",
        )?,
    })
}
