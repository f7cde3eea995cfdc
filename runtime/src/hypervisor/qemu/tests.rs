//! Unit tests of the parent module.

use super::*;

fn cfg() -> VmConfig {
    VmConfig {
        kernel: "/k/bzImage".into(),
        initrd: "/k/initrd.gz".into(),
        memory_mib: 512,
        vcpus: 2,
        cmdline: "console=ttyS0 panic=-1 quiet".into(),
        console_log: "/state/a,b/console.log".into(),
        hypervisor_log: "/state/qemu.log".into(),
        socket_dir: "/run/rootcell/r/x".into(),
        owner: "/state/a,b/ctr-1".into(),
        vsock_uds: "/run/rootcell/r/x/vsock.sock".into(),
        guest_cid: 3,
        share_dir: "/run/rootcell/r/x/share".into(),
        share_tag: "rootcell".into(),
        nets: vec![],
    }
}

#[test]
fn qemu_command_line() {
    let a = command_args(
        &cfg(),
        Accel::Tcg,
        Some(V7_2),
        Path::new("/r/vsock.vu"),
        Path::new("/r/fs.vu"),
        true,
    );
    let joined = a.join(" ");
    let after = |flag: &str| a[a.iter().position(|x| x == flag).unwrap() + 1].clone();
    assert_eq!(
        after("-M"),
        "microvm,acpi=off,x-option-roms=off,rtc=off,memory-backend=mem"
    );
    assert_eq!(after("-accel"), "tcg");
    assert_eq!(after("-cpu"), "max");
    assert_eq!(after("-smp"), "2");
    assert_eq!(after("-m"), "512M");
    assert_eq!(
        after("-object"),
        "memory-backend-memfd,id=mem,size=512M,share=on"
    );
    assert_eq!(after("-serial"), "file:/state/a,,b/console.log");
    // Whose VM it is, for `ps`: the container's state dir (its comma doubled for QEMU).
    assert_eq!(after("-name"), "guest=/state/a,,b/ctr-1");
    assert_eq!(after("-append"), "console=ttyS0 panic=-1 quiet reboot=t");
    assert_eq!(after("-kernel"), "/k/bzImage");
    assert_eq!(after("-initrd"), "/k/initrd.gz");
    assert_eq!(
        after("-sandbox"),
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    );
    for flag in ["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"] {
        assert!(a.contains(&flag.to_string()), "{flag}");
    }
    assert!(joined.contains(
        "-chardev socket,id=vsock,path=/r/vsock.vu -device vhost-user-vsock-device,chardev=vsock"
    ));
    assert!(joined.contains(
        "-chardev socket,id=fs,path=/r/fs.vu -device vhost-user-fs-device,chardev=fs,tag=rootcell"
    ));
    assert!(!joined.contains("-netdev"), "no network card without taps");
    let kvm = |sandbox| {
        command_args(
            &cfg(),
            Accel::Kvm,
            None,
            "/a".as_ref(),
            "/b".as_ref(),
            sandbox,
        )
    };
    assert!(kvm(true).join(" ").contains("-accel kvm -cpu host"));
    // ROOTCELL_JAIL without the VMM's half: no seccomp sandbox either.
    let unjailed = kvm(false);
    assert!(!unjailed.iter().any(|a| a == "-sandbox"), "{unjailed:?}");
}

const V7_2: QemuVersion = QemuVersion { major: 7, minor: 2 };

#[test]
fn qemu_version_parsed() {
    assert_eq!(
        parse_version("QEMU emulator version 10.0.13 (Debian 1:10.0.13+ds-0+deb13u1)\nCopyright"),
        Some(QemuVersion {
            major: 10,
            minor: 0
        })
    );
    assert_eq!(
        parse_version("QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)\n"),
        Some(V7_2)
    );
    assert_eq!(parse_version("qemu-system-x86_64: bad"), None);
}

#[test]
fn tcg_on_new_qemu_zeroes_allocated_pages() {
    let v10 = Some(QemuVersion {
        major: 10,
        minor: 0,
    });
    let base = format!("{} {QEMU_KERNEL_ARGS}", cfg().cmdline);
    let append = |accel, version| {
        let a = command_args(
            &cfg(),
            accel,
            version,
            Path::new("/a"),
            Path::new("/b"),
            true,
        );
        a[a.iter().position(|x| x == "-append").unwrap() + 1].clone()
    };
    assert_eq!(append(Accel::Tcg, v10), format!("{base} init_on_alloc=1"));
    assert_eq!(append(Accel::Tcg, None), format!("{base} init_on_alloc=1"));
    assert_eq!(append(Accel::Tcg, Some(V7_2)), base);
    assert_eq!(append(Accel::Kvm, v10), base);
    // A setting the user gave (ROOTCELL_KERNEL_ARGS is already in the command line) wins.
    assert_eq!(
        tcg_kernel_args(Accel::Tcg, v10, "quiet init_on_alloc=0"),
        None
    );
}

#[test]
fn one_virtio_net_card_per_tap() {
    let mut c = cfg();
    for (fd, mac) in [(7, "02:42:ac:11:00:02"), (9, "02:42:ac:12:00:05")] {
        c.nets.push(super::super::NetCard {
            tap_fd: fd,
            mac: mac.parse().unwrap(),
            mtu: 1450,
        });
    }
    let joined = command_args(
        &c,
        Accel::Tcg,
        Some(V7_2),
        Path::new("/a"),
        Path::new("/b"),
        true,
    )
    .join(" ");
    assert!(joined.contains("-netdev tap,id=net0,fd=7 -device virtio-net-device,netdev=net0,mac=02:42:ac:11:00:02,host_mtu=1450"), "{joined}");
    assert!(joined.contains("-netdev tap,id=net1,fd=9 -device virtio-net-device,netdev=net1,mac=02:42:ac:12:00:05,host_mtu=1450"), "{joined}");
}

#[test]
fn the_console_log_keeps_the_head_and_stops_at_the_cap() {
    use rootcell_vmm::devices::serial::CONSOLE_LOG_CAP;
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("console.log");
    let write = capped_console(&log).unwrap();
    let mut guest = std::fs::File::from(write);
    guest.write_all(b"Linux version x\n").unwrap();
    let chunk = vec![b'y'; 1 << 20];
    for _ in 0..(CONSOLE_LOG_CAP >> 20) + 4 {
        guest.write_all(&chunk).unwrap();
    }
    drop(guest);
    // The reader finishes at EOF.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let text = loop {
        let t = std::fs::read(&log).unwrap();
        if t.ends_with(b"]\n") || std::time::Instant::now() > deadline {
            break t;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(text.starts_with(b"Linux version x\n"));
    assert!(
        text.len() as u64 <= CONSOLE_LOG_CAP + 100,
        "{} bytes kept",
        text.len()
    );
    assert!(String::from_utf8_lossy(&text[text.len() - 100..]).contains("console log cut here"));
}
