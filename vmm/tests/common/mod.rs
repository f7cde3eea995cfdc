//! Helpers shared by the KVM integration tests.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

pub mod guest_driver;
pub mod virtq;

use std::io::Write;
use std::path::{Path, PathBuf};
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

/// True when /dev/kvm exists; prints why the test is skipped otherwise.
pub fn kvm_present(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        true
    } else {
        println!("SKIPPED {test}: /dev/kvm is absent on this host, so no KVM test can run");
        false
    }
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

/// The real guest kernel: `$ROOTCELL_VMLINUX`, else the newest `/var/cache/rootcell/kernel-*/vmlinux`;
/// panics with how to build one if there is none.
pub fn find_vmlinux() -> PathBuf {
    if let Ok(p) = std::env::var("ROOTCELL_VMLINUX") {
        return PathBuf::from(p);
    }
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir("/var/cache/rootcell")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("kernel-"))
        .map(|e| e.path().join("vmlinux"))
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p).expect(
        "no guest kernel: set ROOTCELL_VMLINUX or build one with images/build-kernel.sh \
         (expected /var/cache/rootcell/kernel-*/vmlinux)",
    )
}
