//! What the tests of every crate need from the host, found one way: the guest images
//! (`scripts/build.sh` builds them; `ROOTCELL_KERNEL`, `ROOTCELL_VMLINUX`, `ROOTCELL_INITRD`
//! name them, else the newest cached kernel under `/var/cache/rootcell/kernel-*/`), QEMU
//! (`ROOTCELL_QEMU`, else `qemu-system-x86_64` on `PATH`), `/dev/kvm`, root.
//!
//! And one rule for what is missing ([`require`]): under the README's test command
//! (`scripts/test.sh`, which sets `ROOTCELL_E2E=1`) a missing piece fails the test with what to
//! do; in a bare `cargo test` the test says SKIPPED and returns, so a developer without root or
//! a kernel can still run the rest.

use std::path::{Path, PathBuf};

/// Where `images/build-kernel.sh` caches kernels, one `kernel-<hash>/` directory per input set.
pub const KERNEL_CACHE: &str = "/var/cache/rootcell";

/// Whether this run is the README's test command, where nothing may be skipped.
pub fn strict() -> bool {
    std::env::var_os("ROOTCELL_E2E").is_some_and(|v| !v.is_empty())
}

/// Checks one thing a test needs. Returns `true` if it is there. Otherwise, under
/// [`strict`] it panics with `what` and `how` (what to do about it); in a bare `cargo test` it
/// prints `SKIPPED test: what` (to stderr, which libtest does not capture) and returns `false`.
pub fn require(test: &str, ok: bool, what: &str, how: &str) -> bool {
    if ok {
        return true;
    }
    if strict() {
        panic!("{test}: {what}; {how}");
    }
    eprintln!("SKIPPED {test}: {what} ({how})");
    false
}

/// A guest image from `env`, or the newest `name` among the cached kernels.
fn image(env: &str, name: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(KERNEL_CACHE)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("kernel-"))
        .map(|e| e.path().join(name))
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p)
}

/// How to get the guest images.
const BUILD_HINT: &str =
    "run scripts/build.sh (it builds and caches the guest kernel) and `source build/env`";

/// The guest `bzImage` for QEMU (`ROOTCELL_KERNEL`, else the newest cached one).
pub fn bzimage() -> Option<PathBuf> {
    image("ROOTCELL_KERNEL", "bzImage")
}

/// The guest `vmlinux` for the built-in VMM (`ROOTCELL_VMLINUX`, else the newest cached one).
pub fn vmlinux() -> Option<PathBuf> {
    image("ROOTCELL_VMLINUX", "vmlinux")
}

/// The agent's initramfs (`ROOTCELL_INITRD`; only `scripts/build.sh` makes it).
pub fn initrd() -> Option<PathBuf> {
    std::env::var_os("ROOTCELL_INITRD")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
}

/// QEMU: `ROOTCELL_QEMU`, else `qemu-system-x86_64` on `PATH`.
pub fn qemu() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ROOTCELL_QEMU").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| p.is_file())
}

/// `path` if it was found, else `None` after [`require`] said why.
fn found(test: &str, path: Option<PathBuf>, what: &str, how: &str) -> Option<PathBuf> {
    if require(test, path.is_some(), what, how) {
        path
    } else {
        None
    }
}

/// [`bzimage`], or `None` after [`require`] said why.
pub fn require_bzimage(test: &str) -> Option<PathBuf> {
    found(test, bzimage(), "no guest kernel (bzImage)", BUILD_HINT)
}

/// [`vmlinux`], or `None` after [`require`] said why.
pub fn require_vmlinux(test: &str) -> Option<PathBuf> {
    found(test, vmlinux(), "no guest kernel (vmlinux)", BUILD_HINT)
}

/// [`initrd`], or `None` after [`require`] said why.
pub fn require_initrd(test: &str) -> Option<PathBuf> {
    found(
        test,
        initrd(),
        "no agent initramfs (ROOTCELL_INITRD)",
        BUILD_HINT,
    )
}

/// [`qemu`], or `None` after [`require`] said why.
pub fn require_qemu(test: &str) -> Option<PathBuf> {
    let how = "install it with scripts/install-deps.sh (Debian's qemu-system-x86)";
    found(test, qemu(), "qemu-system-x86_64 is not installed", how)
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no memory effects.
    unsafe { libc::geteuid() == 0 }
}

/// [`require`] of root (mount namespaces, taps, cgroups).
pub fn require_root(test: &str) -> bool {
    require(
        test,
        is_root(),
        "needs root",
        "run the tests as root, as scripts/test.sh does",
    )
}

/// [`require`] of `/dev/kvm` (any KVM, also a software one: enough for device-level tests).
pub fn require_kvm(test: &str) -> bool {
    require(
        test,
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is absent",
        "load kvm_intel/kvm_amd (or run where KVM exists)",
    )
}

/// What each fd of an fd directory (`/proc/self/fd`, `/proc/<pid>/task/<tid>/fd`) names, by
/// number: a file's path as the reader's root sees it, or `socket:[..]`, `pipe:[..]`,
/// `anon_inode:[eventfd]` and the like. Entries that close while it is read are left out.
pub fn fd_targets(dir: &Path) -> std::collections::BTreeMap<i32, String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .flatten()
        .filter_map(|e| {
            let fd = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            Some((fd, target.to_string_lossy().into_owned()))
        })
        .collect()
}

/// `/proc/self/task/<tid>` of this process's thread named `comm` whose root holds `path`
/// (relative to that root): one thread in a root of its own, among others of its name.
pub fn thread_holding(comm: &str, path: &Path) -> Option<PathBuf> {
    std::fs::read_dir("/proc/self/task")
        .ok()?
        .flatten()
        .map(|t| t.path())
        .find(|t| {
            std::fs::read_to_string(t.join("comm")).is_ok_and(|c| c.trim() == comm)
                && t.join("root").join(path).exists()
        })
}

/// Runs test `name` (its full path, `module::tests::name`) of the current test binary again,
/// alone, in a process of its own with `var` set to `value`, and returns its output once it
/// ended: for a test whose subject ends the process (an abort). The test finds `var` set and
/// does the part that may end its process.
pub fn rerun_test_alone(
    name: &str,
    var: &str,
    value: impl AsRef<std::ffi::OsStr>,
) -> std::process::Output {
    std::process::Command::new(std::env::current_exe().expect("the test binary"))
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(var, value)
        .output()
        .expect("running the test binary again")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_there_is_required_silently() {
        assert!(require("t", true, "x", "y"));
    }

    #[test]
    fn a_named_image_that_is_missing_is_not_replaced_by_the_cache() {
        // An explicit path wins over the cache, even when it does not exist: a typo must not
        // silently test another kernel. (A variable only this test uses.)
        std::env::set_var("ROOTCELL_TEST_SUPPORT_PROBE", "/nonexistent/bzImage");
        assert_eq!(image("ROOTCELL_TEST_SUPPORT_PROBE", "bzImage"), None);
    }
}
