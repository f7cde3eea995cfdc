//! Boots the real guest kernel (vmlinux) and waits for its `Linux version` banner on COM1.
//!
//! Bounded: gives up after `ROOTCELL_BANNER_TIMEOUT_SECS` (default 120 s) and then reports
//! where the guest got to (last console bytes, each vCPU's last exit and RIP). Skipped only when
//! /dev/kvm is absent; a missing kernel image is a failure that says how to build one.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use rootcell_vmm::{SerialOutput, Vm, VmConfig};

/// Command line: console on COM1 with the early console so the banner appears before the
/// regular 8250 driver probes; `reboot=k` makes a reboot pulse the i8042 (our reset exit);
/// `panic=-1` reboots immediately on panic; `noapictimer`-style tweaks are not needed.
const CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1 \
nokaslr tsc=reliable no_timer_check lpj=1000000 i8042.noaux i8042.nomux";

fn find_vmlinux() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("ROOTCELL_VMLINUX") {
        return Some(PathBuf::from(p));
    }
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir("/var/cache/rootcell")
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("kernel-"))
        .map(|e| e.path().join("vmlinux"))
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p)
}

#[test]
fn real_kernel_prints_its_banner_on_serial() {
    if !common::kvm_present("real_kernel_prints_its_banner_on_serial") {
        return;
    }
    let kernel = find_vmlinux().expect(
        "no guest kernel: set ROOTCELL_VMLINUX or build one with images/build-kernel.sh \
         (expected /var/cache/rootcell/kernel-*/vmlinux)",
    );
    let limit = Duration::from_secs(
        std::env::var("ROOTCELL_BANNER_TIMEOUT_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(120),
    );
    let console = common::Console::default();
    let mut config = VmConfig::new(&kernel, CMDLINE);
    config.mem_mib = 128;
    config.serial = SerialOutput::Writer(Box::new(console.clone()));
    config.seccomp = true;
    let start = Instant::now();
    let running = Vm::create(config)
        .expect("create VM")
        .start()
        .expect("start VM");
    let mut banner_at = None;
    let mut exit = None;
    while start.elapsed() < limit {
        exit = running.wait_timeout(Duration::from_millis(100));
        if console.text().contains("Linux version") {
            banner_at = Some(start.elapsed());
            break;
        }
        if exit.is_some() {
            break;
        }
    }
    let report = running.stop();
    let stopped_in = start.elapsed() - banner_at.unwrap_or(start.elapsed());
    let text = console.text();
    let tail: String = text
        .chars()
        .rev()
        .take(1500)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let where_ = report
        .vcpus
        .iter()
        .map(|v| {
            format!(
                "vcpu{}: {} exits, last {}, rip {:#x?}",
                v.cpu, v.exits, v.last_exit, v.rip
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    match banner_at {
        Some(t) => {
            let line = text.lines().find(|l| l.contains("Linux version")).unwrap_or_default();
            println!("banner after {:.2} s: {line}", t.as_secs_f64());
            println!("vCPUs stopped cleanly in {stopped_in:?}; stuck: {:?}", report.stuck_vcpus);
            println!("{where_}");
            assert!(report.stuck_vcpus.is_empty(), "vCPU threads did not stop: {where_}");
        }
        None => panic!(
            "no `Linux version` banner after {:.1} s (exit {exit:?}, VM report exit {:?})\n{where_}\n\
             last console output ({} bytes total):\n{tail}",
            start.elapsed().as_secs_f64(),
            report.exit,
            text.len()
        ),
    }
}
