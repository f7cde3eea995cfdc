//! The runtime's entry point, [`BuiltinVm::start`]: the real guest kernel boots with the vsock
//! and virtio-fs devices attached and vCPUs under seccomp, and still prints its banner; both
//! devices are declared on its command line; stopping leaves no socket behind. Bad input fails
//! cleanly with nothing left behind.
//!
//! Bounded by `ROOTCELL_BANNER_TIMEOUT_SECS` (default 120 s); skipped only when /dev/kvm is
//! absent.

mod common;

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rootcell_vmm::builder::{BuiltinConfig, BuiltinVm, NetConfig};
use rootcell_vmm::Error;

use common::find_vmlinux;

#[test]
fn real_kernel_boots_with_vsock_and_virtio_fs_attached() {
    if !common::kvm_present("real_kernel_boots_with_vsock_and_virtio_fs_attached") {
        return;
    }
    let limit = Duration::from_secs(
        std::env::var("ROOTCELL_BANNER_TIMEOUT_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(120),
    );
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let console = dir.path().join("console.log");
    let uds = dir.path().join("vsock.sock");
    let mut config = BuiltinConfig::new(find_vmlinux(), &uds, &share);
    config.cmdline = "earlyprintk=serial,ttyS0,115200 nokaslr tsc=reliable no_timer_check \
                      lpj=1000000"
        .into();
    config.mem_mib = 128;
    config.console_log = Some(console.clone());
    let start = Instant::now();
    let vm = BuiltinVm::start(config).expect("start the builtin VM");

    let cmdline = vm.cmdline().to_owned();
    let (vsock, fs) = vm.slots();
    assert_eq!(
        cmdline.matches("virtio_mmio.device=").count(),
        2,
        "{cmdline}"
    );
    assert!(cmdline.contains(&vsock.cmdline_param()), "{cmdline}");
    assert!(cmdline.contains(&fs.cmdline_param()), "{cmdline}");
    assert!(cmdline.starts_with("console=ttyS0"), "{cmdline}");

    // The host side is up while the guest boots: a client can connect and queue a CONNECT.
    let mut client = UnixStream::connect(vm.vsock_uds()).expect("hybrid socket listening");
    client.write_all(b"CONNECT 1024\n").unwrap();

    let mut banner_at = None;
    let mut exit = None;
    while start.elapsed() < limit {
        exit = vm.wait_timeout(Duration::from_millis(100));
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.contains("Linux version") {
            banner_at = Some(start.elapsed());
            break;
        }
        if exit.is_some() {
            break;
        }
    }
    let report = vm.stop();
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    let tail: String = text
        .chars()
        .rev()
        .take(1500)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let t = banner_at.unwrap_or_else(|| {
        panic!(
            "no `Linux version` banner after {:.1} s (exit {exit:?}, report {report:?})\n\
             console ({} bytes):\n{tail}",
            start.elapsed().as_secs_f64(),
            text.len()
        )
    });
    println!(
        "banner after {:.2} s with both devices attached; create->first KVM_RUN {:?}",
        t.as_secs_f64(),
        report.create_to_first_run
    );
    assert!(report.stuck_vcpus.is_empty(), "{report:?}");
    assert!(
        !uds.exists(),
        "the hybrid socket is removed when the VM stops"
    );
}

#[test]
fn bad_input_leaves_nothing_behind() {
    if !common::kvm_present("bad_input_leaves_nothing_behind") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let uds = dir.path().join("vsock.sock");
    let console = dir.path().join("console.log");

    // A kernel that does not exist.
    let mut config = BuiltinConfig::new(dir.path().join("no-vmlinux"), &uds, &share);
    config.console_log = Some(console.clone());
    let err = BuiltinVm::start(config.clone()).unwrap_err();
    assert!(matches!(err, Error::ImageIo { .. }), "{err}");

    // A share that does not exist.
    config.kernel = find_vmlinux();
    config.fs_shared_dir = dir.path().join("no-share");
    let err = BuiltinVm::start(config.clone()).unwrap_err();
    assert!(err.to_string().contains("no-share"), "{err}");

    // Memory out of range.
    config.fs_shared_dir = share.clone();
    config.mem_mib = 1;
    let err = BuiltinVm::start(config.clone()).unwrap_err();
    assert!(matches!(err, Error::MemorySize { .. }), "{err}");

    // A network card whose "tap" is a plain file.
    config.mem_mib = 128;
    let not_a_tap = std::fs::File::open(&share).unwrap();
    config.net = vec![NetConfig {
        tap: Arc::new(not_a_tap.into()),
        mac: [2, 0, 0, 0, 0, 1],
        mtu: 1500,
    }];
    let err = BuiltinVm::start(config.clone()).unwrap_err();
    assert!(err.to_string().contains("virtio-net #0"), "{err}");
    config.net.clear();

    // A vsock socket path that cannot be bound.
    config.vsock_uds = dir.path().join("missing-dir").join("vsock.sock");
    let err = BuiltinVm::start(config).unwrap_err();
    assert!(err.to_string().contains("missing-dir"), "{err}");

    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["share"], "nothing but the share is left");
}

/// Opens a tap named `name` the way the runtime does (in the calling thread's netns).
fn open_tap(name: &str) -> OwnedFd {
    // SAFETY: open of a device node and TUNSETIFF on a 40-byte struct ifreq.
    unsafe {
        let fd = libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        assert!(
            fd >= 0,
            "open /dev/net/tun: {}",
            std::io::Error::last_os_error()
        );
        let fd = OwnedFd::from_raw_fd(fd);
        let mut ifr = [0u8; 40];
        ifr[..name.len()].copy_from_slice(name.as_bytes());
        let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as u16;
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        let rc = libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, ifr.as_mut_ptr());
        assert!(rc >= 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        fd
    }
}

#[test]
fn network_cards_are_declared_after_vsock_and_fs() {
    if !common::kvm_present("network_cards_are_declared_after_vsock_and_fs") {
        return;
    }
    // A private network namespace for this thread: the taps never reach the host's network.
    std::thread::spawn(|| {
        // SAFETY: unshare affects only this thread.
        let netns = unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0;
        let why = format!("no network namespace: {}", std::io::Error::last_os_error());
        let test = "network_cards_are_declared_after_vsock_and_fs";
        if !rootcell_test_support::require(test, netns, &why, "run as root") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut config =
            BuiltinConfig::new(find_vmlinux(), dir.path().join("vsock.sock"), dir.path());
        config.mem_mib = 64;
        for (i, name) in ["rcsb0", "rcsb1"].into_iter().enumerate() {
            config.net.push(NetConfig {
                tap: Arc::new(open_tap(name)),
                mac: [2, 0, 0, 0, 0, i as u8 + 1],
                mtu: 1500,
            });
        }
        let vm = BuiltinVm::start(config).expect("start with two network cards");
        // Every device thread (vsock, fs, two nets) pauses under its seccomp filter.
        vm.pause().expect("pause the vCPUs and all four devices");
        assert!(vm.is_paused());
        vm.resume();
        assert!(!vm.is_paused());
        let cmdline = vm.cmdline().to_owned();
        let (_, fs) = vm.slots();
        let nets = vm.net_slots().to_vec();
        let report = vm.stop();
        assert_eq!(
            cmdline.matches("virtio_mmio.device=").count(),
            4,
            "{cmdline}"
        );
        assert_eq!(nets.len(), 2);
        assert!(nets[0].base > fs.base && nets[1].base > nets[0].base);
        for n in &nets {
            assert!(cmdline.contains(&n.cmdline_param()), "{cmdline}");
        }
        assert!(report.stuck_vcpus.is_empty(), "{report:?}");
        // The stop reads every device's registers and rings, in the order they were attached.
        let devices: Vec<&str> = report
            .virtio
            .iter()
            .map(|l| l.split(':').next().unwrap_or(""))
            .collect();
        assert_eq!(
            devices,
            ["vsock", "fs", "net", "net"],
            "{:?}",
            report.virtio
        );
        println!("virtio at the stop: {:?}", report.virtio);
    })
    .join()
    .unwrap();
}
