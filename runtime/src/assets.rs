//! Locating the guest kernel and initramfs.

use crate::hypervisor::HypervisorError;
use std::path::PathBuf;

/// Default guest kernel.
pub const DEFAULT_KERNEL: &str = "/usr/local/share/rootcell/bzImage";
/// Default guest kernel of the built-in VMM (ELF vmlinux).
pub const DEFAULT_VMLINUX: &str = "/usr/local/share/rootcell/vmlinux";
/// Default guest initramfs.
pub const DEFAULT_INITRD: &str = "/usr/local/share/rootcell/initramfs.cpio";

/// Guest boot files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImages {
    /// Kernel image (bzImage for QEMU, vmlinux for the built-in VMM).
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

/// The built-in VMM's images: `$ROOTCELL_VMLINUX` (else [`DEFAULT_VMLINUX`]) and the same
/// initramfs as [`locate`]; both must exist.
pub fn locate_builtin() -> Result<GuestImages, HypervisorError> {
    let kernel = std::env::var_os("ROOTCELL_VMLINUX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_VMLINUX));
    if !kernel.is_file() {
        return Err(HypervisorError::Missing {
            what: "guest kernel (vmlinux) for the builtin hypervisor",
            path: kernel,
            hint:
                "install rootcell's vmlinux there, set ROOTCELL_VMLINUX, or use --hypervisor qemu",
        });
    }
    let initrd = std::env::var_os("ROOTCELL_INITRD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_INITRD));
    if !initrd.is_file() {
        return Err(HypervisorError::Missing {
            what: "guest initramfs",
            path: initrd,
            hint: "install rootcell's initramfs there or set ROOTCELL_INITRD",
        });
    }
    Ok(GuestImages { kernel, initrd })
}
