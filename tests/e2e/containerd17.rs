//! Debian 13's containerd 1.7 drives `containerd-shim-rootcell-v2`: every test of
//! `containerd.rs` (included below as a module: `ctr run` with output and exit code, `-t`,
//! exec, kill, pause/resume, metrics, the OOM event, a killed shim's cleanup, and Kubernetes-style
//! pods through the CRI plugin) against that containerd, as on a Debian 13 host.
//!
//! The containerd and `ctr` are those of the trixie root that `images/build-trixie-root.sh`
//! builds (cached in /var/cache/rootcell/trixie-<hash>/), chrooted on the host's kernel in a
//! mount namespace of their own (see `rootcell_e2e::containerd`); rootcell, run by the shim in
//! that chroot, finds the root's QEMU 10 on PATH.

use rootcell_e2e::docker::Engine;
use rootcell_e2e::trixie_root;

/// These tests' containerd: the trixie root's.
fn engine() -> Engine {
    Engine::Root(trixie_root().join("rootfs"))
}

/// The tests of containerd.rs, against containerd 1.7.
#[path = "containerd.rs"]
mod containerd;

#[test]
fn the_containerd_is_debian_13s_1_7() {
    if std::env::var("ROOTCELL_E2E").is_err() {
        eprintln!("skipped: set ROOTCELL_E2E=1 (scripts/test.sh does)");
        return;
    }
    let c = rootcell_e2e::containerd::Containerd::start_on(engine());
    let o = c.ctr(&["version"]);
    let out = rootcell_e2e::text(&o.stdout);
    println!("{out}");
    assert!(o.status.success(), "{}", rootcell_e2e::text(&o.stderr));
    // Client and server: both the root's.
    let versions: Vec<&str> = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Version:"))
        .map(str::trim)
        .collect();
    assert_eq!(versions.len(), 2, "{out}");
    assert!(
        versions.iter().all(|v| v.starts_with("1.7.")),
        "not containerd 1.7: {out}"
    );
}
