//! Helpers shared by the KVM integration tests.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

pub mod guest_driver;
pub mod virtq;

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// A serial-console writer the test can read while the guest writes.
#[derive(Clone, Default)]
pub struct Console(pub Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    /// Everything written so far, lossily decoded.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Whether /dev/kvm exists, required as `rootcell-test-support` says (missing: a failure under
/// scripts/test.sh, SKIPPED in a bare `cargo test`).
pub fn kvm_present(test: &str) -> bool {
    rootcell_test_support::require_kvm(test)
}

/// Writes a minimal 64-bit ELF "kernel" containing `code` at physical 16 MiB, returns its path.
pub fn write_tiny_kernel(name: &str, code: &[u8]) -> PathBuf {
    let paddr: u64 = 0x100_0000;
    let mut v = Vec::new();
    v.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    v.extend_from_slice(&2u16.to_le_bytes());
    v.extend_from_slice(&0x3eu16.to_le_bytes());
    v.extend_from_slice(&1u32.to_le_bytes());
    v.extend_from_slice(&paddr.to_le_bytes());
    v.extend_from_slice(&64u64.to_le_bytes());
    v.extend_from_slice(&0u64.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    for h in [64u16, 56, 1, 0, 0, 0] {
        v.extend_from_slice(&h.to_le_bytes());
    }
    v.extend_from_slice(&1u32.to_le_bytes());
    v.extend_from_slice(&5u32.to_le_bytes());
    v.extend_from_slice(&120u64.to_le_bytes());
    v.extend_from_slice(&paddr.to_le_bytes());
    v.extend_from_slice(&paddr.to_le_bytes());
    v.extend_from_slice(&(code.len() as u64).to_le_bytes());
    v.extend_from_slice(&(code.len() as u64).to_le_bytes());
    v.extend_from_slice(&0x1000u64.to_le_bytes());
    v.extend_from_slice(code);
    let p = std::env::temp_dir().join(format!("rootcell-vmm-{}-{name}", std::process::id()));
    std::fs::write(&p, v).unwrap();
    p
}

/// The real guest kernel (found by `rootcell-test-support`); panics with how to build one.
pub fn find_vmlinux() -> PathBuf {
    rootcell_test_support::vmlinux()
        .expect("no guest kernel vmlinux: run scripts/build.sh (it builds and caches one), or set ROOTCELL_VMLINUX")
}
