//! The vhost-user front end without a VM: a vhost-user frontend (the `vhost` crate's, the role
//! QEMU plays) talks to `serve_vhost_user` over its socket.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use rootcell_vsock::{serve_vhost_user, BackendHandle, VsockConfig};
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::VhostBackend;

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(name: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("rootcell-vsock-vu-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Dir(d)
}

/// `handle.wait()` bounded by a timeout, so a hang fails the test instead of blocking it.
fn wait_bounded(handle: BackendHandle) -> Result<(), rootcell_vsock::Error> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(handle.wait());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("backend did not finish in time")
}

#[test]
fn sockets_bound_before_return_and_removed_after_stop() {
    let dir = scratch("stop");
    let vu = dir.0.join("vu.sock");
    let uds = dir.0.join("hybrid.sock");
    let handle = serve_vhost_user(
        &vu,
        VsockConfig {
            guest_cid: 3,
            uds_path: uds.clone(),
        },
    )
    .unwrap();
    assert!(vu.exists() && uds.exists());
    // The hybrid socket already accepts clients even though no VMM is attached yet.
    let _client = std::os::unix::net::UnixStream::connect(&uds).unwrap();
    handle.stop();
    handle.stop();
    wait_bounded(handle).unwrap();
    assert!(!vu.exists() && !uds.exists());
}

#[test]
fn binding_an_unusable_path_fails_cleanly() {
    let err = serve_vhost_user(
        std::path::Path::new("/nonexistent-dir/vu.sock"),
        VsockConfig {
            guest_cid: 3,
            uds_path: "/nonexistent-dir/h.sock".into(),
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("/nonexistent-dir/h.sock"), "{err}");
}

#[test]
fn frontend_negotiates_and_reads_guest_cid() {
    let dir = scratch("cfg");
    let vu = dir.0.join("vu.sock");
    let handle = serve_vhost_user(
        &vu,
        VsockConfig {
            guest_cid: 0x0012_3456_789a,
            uds_path: dir.0.join("hybrid.sock"),
        },
    )
    .unwrap();
    let mut fe = Frontend::connect(&vu, 3).unwrap();
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    assert!(features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0);
    assert!(features & (1 << 32) != 0, "VIRTIO_F_VERSION_1");
    fe.set_features(features).unwrap();
    let proto = fe.get_protocol_features().unwrap();
    assert!(proto.contains(VhostUserProtocolFeatures::CONFIG));
    fe.set_protocol_features(VhostUserProtocolFeatures::CONFIG)
        .unwrap();
    let (_, cfg) = fe
        .get_config(0, 8, VhostUserConfigFlags::empty(), &[0u8; 8])
        .unwrap();
    assert_eq!(cfg, 0x0012_3456_789a_u64.to_le_bytes());
    // The VMM going away ends the backend successfully.
    drop(fe);
    wait_bounded(handle).unwrap();
}

#[test]
fn stop_while_vmm_connected() {
    let dir = scratch("stopconn");
    let vu = dir.0.join("vu.sock");
    let handle = serve_vhost_user(
        &vu,
        VsockConfig {
            guest_cid: 3,
            uds_path: dir.0.join("hybrid.sock"),
        },
    )
    .unwrap();
    let fe = Frontend::connect(&vu, 3).unwrap();
    fe.set_owner().unwrap();
    handle.stop();
    wait_bounded(handle).unwrap();
    drop(fe);
}

#[test]
fn drop_stops_the_backend() {
    let dir = scratch("drop");
    let vu = dir.0.join("vu.sock");
    let handle = serve_vhost_user(
        &vu,
        VsockConfig {
            guest_cid: 3,
            uds_path: dir.0.join("hybrid.sock"),
        },
    )
    .unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        drop(handle);
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("drop did not finish");
    assert!(!vu.exists());
}
