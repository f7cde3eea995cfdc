//! The `rootcell-vmm` binary with every thread confined: vCPUs, the control thread (after
//! start) and the vsock and virtio-fs I/O threads, booting hand-assembled guests. A syscall
//! missing from any allowlist kills the process with SIGSYS, which these tests would report.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};
use std::time::Duration;

/// Prints "OK" on COM1 and pulses reset through the i8042.
const RESETS: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, 0xb0, b'O', 0xee, 0xb0, b'K', 0xee, 0xb0, 0xfe, 0xe6, 0x64, 0xf4,
];
/// `cli; hlt; jmp .-2`: never ends; the control thread's timeout must stop it.
const HANGS: &[u8] = &[0xfa, 0xf4, 0xeb, 0xfd];

fn run_vmm(name: &str, program: &[u8], timeout_secs: u32) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let kernel = common::write_tiny_kernel(name, program);
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rootcell-vmm"))
        .arg("--kernel")
        .arg(&kernel)
        .args(["--mem-mib", "32", "--serial", "-", "--timeout-secs"])
        .arg(timeout_secs.to_string())
        .arg("--vsock")
        .arg(dir.path().join("vsock.sock"))
        .arg("--share")
        .arg(&share)
        .output()
        .unwrap();
    std::fs::remove_file(&kernel).unwrap();
    assert!(
        !dir.path().join("vsock.sock").exists(),
        "the VMM removed its vsock socket under its filters"
    );
    out
}

fn describe(out: &Output) -> String {
    format!(
        "status {:?} (signal {:?})\nstdout: {}\nstderr: {}",
        out.status,
        out.status.signal(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn confined_vmm_runs_a_guest_to_its_reset() {
    if !common::kvm_present("confined_vmm_runs_a_guest_to_its_reset") {
        return;
    }
    let out = run_vmm("bin-reset.elf", RESETS, 30);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "OK");
}

#[test]
fn confined_vmm_stops_a_guest_that_never_ends() {
    if !common::kvm_present("confined_vmm_stops_a_guest_that_never_ends") {
        return;
    }
    let start = std::time::Instant::now();
    let out = run_vmm("bin-hang.elf", HANGS, 1);
    // 2: the timeout stopped the VM (kicking the vCPU out of KVM_RUN), not a signal.
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(start.elapsed() < Duration::from_secs(20));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exit Stopped"),
        "{}",
        describe(&out)
    );
}
