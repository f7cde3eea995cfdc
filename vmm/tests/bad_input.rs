//! Bad input: every failure is a clear error and leaves nothing behind (no open descriptors —
//! memfd, KVM fds, eventfds — no threads, no console file).
//!
//! One test function on purpose: it counts this process's descriptors and threads, which
//! parallel tests in the same binary would disturb.

mod common;

use std::path::PathBuf;

use rootcell_vmm::{Error, SerialOutput, Vm, VmConfig};

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

fn expect_err(config: VmConfig) -> Error {
    match Vm::create(config) {
        Ok(_) => panic!("VM creation unexpectedly succeeded"),
        Err(e) => e,
    }
}

#[test]
fn bad_input_is_a_clear_error_without_leftovers() {
    let (fds, threads) = (fd_count(), thread_count());
    let tmp = std::env::temp_dir();
    let console = tmp.join(format!("rootcell-vmm-{}-console.log", std::process::id()));
    let good = common::write_tiny_kernel("good.elf", &[0xf4]);
    let base = |kernel: &PathBuf| {
        let mut c = VmConfig::new(kernel, "console=ttyS0");
        c.mem_mib = 32;
        c.serial = SerialOutput::File(console.clone());
        c
    };

    // Memory size and vCPU count out of range: rejected before touching KVM.
    let mut c = base(&good);
    c.mem_mib = 8;
    let e = expect_err(c);
    assert!(matches!(e, Error::MemorySize { got_mib: 8, .. }), "{e}");
    assert!(
        e.to_string().contains("out of range (16..=262144 MiB)"),
        "{e}"
    );
    let mut c = base(&good);
    c.mem_mib = 300 << 10;
    assert!(matches!(
        expect_err(c),
        Error::MemorySize {
            got_mib: 307200,
            ..
        }
    ));
    let mut c = base(&good);
    c.vcpus = 0;
    assert!(matches!(expect_err(c), Error::VcpuCount { got: 0, .. }));
    let mut c = base(&good);
    c.vcpus = 33;
    let e = expect_err(c);
    assert!(e.to_string().contains("vCPU count 33 out of range"), "{e}");

    // /dev/kvm absent, or present but not a usable KVM device.
    let mut c = base(&good);
    c.kvm_path = "/nonexistent/kvm".into();
    let e = expect_err(c);
    assert!(matches!(e, Error::KvmAbsent), "{e}");
    assert!(e.to_string().contains("/dev/kvm not found"), "{e}");
    let mut c = base(&good);
    c.kvm_path = tmp.clone(); // a directory cannot be opened read-write
    let e = expect_err(c);
    assert!(matches!(e, Error::KvmAccess(_)), "{e}");
    let mut c = base(&good);
    c.kvm_path = "/dev/null".into(); // opens, but is not KVM
    let e = expect_err(c);
    assert!(matches!(e, Error::KvmApiVersion(_)), "{e}");

    if common::kvm_present("bad_input (image part)") {
        // Kernel missing.
        let e = expect_err(base(&tmp.join("rootcell-vmm-no-such-vmlinux")));
        assert!(matches!(e, Error::ImageIo { what: "kernel", .. }), "{e}");
        // Not ELF, not bzImage.
        let script = tmp.join(format!("rootcell-vmm-{}-script", std::process::id()));
        std::fs::write(&script, b"#!/bin/sh\nexit 0\n").unwrap();
        let e = expect_err(base(&script));
        assert!(matches!(e, Error::KernelFormat { .. }), "{e}");
        std::fs::remove_file(&script).unwrap();
        // Too large for memory: a 40 MiB image for 32 MiB of RAM.
        let big = tmp.join(format!("rootcell-vmm-{}-big", std::process::id()));
        let f = std::fs::File::create(&big).unwrap();
        std::fs::write(&big, b"\x7fELF").unwrap();
        f.set_len(40 << 20).unwrap();
        let e = expect_err(base(&big));
        assert!(matches!(e, Error::KernelLoad { mem_mib: 32, .. }), "{e}");
        std::fs::remove_file(&big).unwrap();
        // Initramfs that does not fit above the kernel.
        let rd = tmp.join(format!("rootcell-vmm-{}-initrd", std::process::id()));
        std::fs::write(&rd, vec![0u8; 20 << 20]).unwrap();
        let mut c = base(&good);
        c.initramfs = Some(rd.clone());
        let e = expect_err(c);
        assert!(matches!(e, Error::InitramfsTooLarge { .. }), "{e}");
        std::fs::remove_file(&rd).unwrap();
        // An empty initramfs.
        let rd = tmp.join(format!("rootcell-vmm-{}-empty-initrd", std::process::id()));
        std::fs::write(&rd, b"").unwrap();
        let mut c = base(&good);
        c.initramfs = Some(rd.clone());
        let e = expect_err(c);
        assert_eq!(
            e.to_string(),
            format!("initramfs {} is empty", rd.display())
        );
        std::fs::remove_file(&rd).unwrap();
        // Command line too long.
        let mut c = base(&good);
        c.cmdline = "x".repeat(5000);
        assert!(matches!(expect_err(c), Error::Cmdline(_)));
    }
    std::fs::remove_file(&good).unwrap();

    assert!(
        !console.exists(),
        "a failed start must not create the console file"
    );
    assert_eq!(
        fd_count(),
        fds,
        "descriptors leaked (memfd, KVM or eventfd)"
    );
    assert_eq!(thread_count(), threads, "threads leaked");
}
