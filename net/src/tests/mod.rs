//! Tests that need root. Each runs on a thread of its own in fresh network namespaces
//! (a network namespace belongs to a thread), so they run in parallel and leave nothing:
//! the namespaces, and every device in them, go away with their last reference.

mod apply;
mod guard;
mod mirror;
mod scan;

use nix::sched::{setns, unshare, CloneFlags};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::process::Command;

/// Runs `f` on a new thread in a new, empty network namespace.
pub(crate) fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET): tests need root");
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Runs `f` on a new thread that joined the network namespace `ns`.
pub(crate) fn in_netns<T: Send + 'static>(ns: &File, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.try_clone().unwrap();
    std::thread::spawn(move || {
        setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// A second, empty network namespace, held open by the returned file.
pub(crate) fn other_netns() -> File {
    in_new_netns(|| File::open("/proc/thread-self/ns/net").unwrap())
}

/// A path other processes can open to reach `ns` (for `ip ... netns PATH`, `nsenter`).
pub(crate) fn ns_path(ns: &File) -> String {
    format!("/proc/{}/fd/{}", std::process::id(), ns.as_raw_fd())
}

/// Runs shell commands in the calling thread's network namespace, panicking on failure.
pub(crate) fn sh(script: &str) -> String {
    let out = Command::new("sh")
        .args(["-ec", script])
        .output()
        .expect("running sh");
    assert!(
        out.status.success(),
        "{script}\nfailed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs shell commands in network namespace `ns`.
pub(crate) fn sh_in(ns: &File, script: &str) -> String {
    sh(&format!("nsenter --net={} sh -ec '{script}'", ns_path(ns)))
}

/// Parses the JSON that `ip -j` or `tc -j` printed.
pub(crate) fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// Builds a veth `name` with `mac` and `mtu` in the calling thread's namespace, its peer
/// `peer` (up) in `ns`.
pub(crate) fn veth_to(ns: &File, name: &str, mac: &str, mtu: u32, peer: &str) {
    sh(&format!(
        "ip link add {name} address {mac} mtu {mtu} type veth peer name {peer} mtu {mtu} netns {}",
        ns_path(ns)
    ));
    sh_in(ns, &format!("ip link set {peer} up"));
}
