//! Credentials: supplementary groups, gid, uid and the five capability sets, in the order the
//! kernel requires (bounding set while still privileged, keep caps across setuid, then capset).

use super::error::{Context, SetupError};
use crate::alog;
use caps::{CapSet, CapsHashSet};
use oci_spec::runtime::{Capabilities, LinuxCapabilities, Process};

/// Converts OCI capability names to the kernel capabilities this kernel knows.
pub fn to_kernel_caps(set: &Capabilities) -> CapsHashSet {
    let supported = caps::runtime::thread_all_supported();
    set.iter()
        .filter_map(|c| {
            let name = format!("CAP_{c}");
            match name.parse::<caps::Capability>() {
                Ok(k) if supported.contains(&k) => Some(k),
                _ => {
                    alog!("ignoring capability {name}, unknown to this kernel");
                    None
                }
            }
        })
        .collect()
}

/// Switches to the process's user and capabilities. Runs as root, right before exec.
pub fn apply_user(process: &Process) -> Result<(), SetupError> {
    let user = process.user();
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(user.umask().unwrap_or(0o022) as libc::mode_t) };
    let caps = process.capabilities().as_ref();
    if let Some(c) = caps {
        drop_bounding(c)?;
        // Keep the permitted set across setuid; the exact sets are applied just below.
        nix::sys::prctl::set_keepcaps(true).ctx(|| "PR_SET_KEEPCAPS".into())?;
    }
    let groups: Vec<nix::unistd::Gid> = user
        .additional_gids()
        .iter()
        .flatten()
        .map(|g| nix::unistd::Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&groups).ctx(|| "setgroups".into())?;
    let gid = nix::unistd::Gid::from_raw(user.gid());
    nix::unistd::setresgid(gid, gid, gid).ctx(|| format!("setgid {}", user.gid()))?;
    let uid = nix::unistd::Uid::from_raw(user.uid());
    nix::unistd::setresuid(uid, uid, uid).ctx(|| format!("setuid {}", user.uid()))?;
    if let Some(c) = caps {
        nix::sys::prctl::set_keepcaps(false).ctx(|| "PR_SET_KEEPCAPS".into())?;
        set_caps(c)?;
    }
    Ok(())
}

/// Drops everything outside the bounding set (needs CAP_SETPCAP, so before setuid).
fn drop_bounding(c: &LinuxCapabilities) -> Result<(), SetupError> {
    let keep = c
        .bounding()
        .as_ref()
        .map(to_kernel_caps)
        .unwrap_or_default();
    for cap in caps::runtime::thread_all_supported() {
        if !keep.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap)
                .ctx(|| format!("drop {cap} from the bounding set"))?;
        }
    }
    Ok(())
}

/// Sets inheritable, effective, permitted and ambient sets.
fn set_caps(c: &LinuxCapabilities) -> Result<(), SetupError> {
    let get = |s: &Option<Capabilities>| s.as_ref().map(to_kernel_caps).unwrap_or_default();
    let (inheritable, effective, permitted, ambient) = (
        get(c.inheritable()),
        get(c.effective()),
        get(c.permitted()),
        get(c.ambient()),
    );
    caps::set(None, CapSet::Inheritable, &inheritable)
        .ctx(|| "set inheritable capabilities".into())?;
    // Effective must stay a subset of permitted at every step: shrink effective first.
    caps::set(
        None,
        CapSet::Effective,
        &effective.intersection(&permitted).copied().collect(),
    )
    .ctx(|| "set effective capabilities".into())?;
    caps::set(None, CapSet::Permitted, &permitted).ctx(|| "set permitted capabilities".into())?;
    caps::set(None, CapSet::Effective, &effective).ctx(|| "set effective capabilities".into())?;
    caps::clear(None, CapSet::Ambient).ctx(|| "clear ambient capabilities".into())?;
    for cap in ambient {
        // The kernel refuses an ambient capability that is not also permitted and inheritable;
        // like runc, log and skip it rather than fail the container.
        if !(inheritable.contains(&cap) && permitted.contains(&cap)) {
            alog!("skipping ambient {cap}: not in the inheritable and permitted sets");
            continue;
        }
        caps::raise(None, CapSet::Ambient, cap).ctx(|| format!("raise ambient {cap}"))?;
    }
    Ok(())
}
