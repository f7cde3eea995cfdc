//! Boots the real guest kernel (vmlinux) and waits for its `Linux version` banner on COM1, and
//! (with 8 GiB) for its e820 printout of RAM on both sides of the 32-bit MMIO hole.
//!
//! Bounded: gives up after `ROOTCELL_BANNER_TIMEOUT_SECS` (default 120 s) and then reports
//! where the guest got to (last console bytes, each vCPU's last exit and RIP). Skipped only when
//! /dev/kvm is absent; a missing kernel image is a failure that says how to build one.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use rootcell_vmm::{SerialOutput, Vm, VmConfig};

/// Command line: console on COM1 with the early console so the banner appears before the
/// regular 8250 driver probes; `reboot=k` makes a reboot pulse the i8042 (our reset exit);
/// `panic=-1` reboots immediately on panic; `noapictimer`-style tweaks are not needed.
const CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1 \
nokaslr tsc=reliable no_timer_check lpj=1000000 i8042.noaux i8042.nomux";

/// Boots `kernel` with `mem_mib` of RAM until the console shows every one of `needles` (or
/// the bounded wait ends); panics with where the guest got to if it does not. Returns when
/// the last needle appeared.
fn boot_until(kernel: &Path, mem_mib: u64, extra_cmdline: &str, needles: &[&str]) -> Duration {
    let limit = Duration::from_secs(
        std::env::var("ROOTCELL_BANNER_TIMEOUT_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(120),
    );
    let console = common::Console::default();
    let mut config = VmConfig::new(kernel, format!("{CMDLINE} {extra_cmdline}"));
    config.mem_mib = mem_mib;
    config.serial = SerialOutput::Writer(Box::new(console.clone()));
    config.seccomp = true;
    let start = Instant::now();
    let running = Vm::create(config)
        .expect("create VM")
        .start()
        .expect("start VM");
    let mut seen_at = None;
    let mut exit = None;
    while start.elapsed() < limit {
        exit = running.wait_timeout(Duration::from_millis(100));
        let text = console.text();
        if needles.iter().all(|n| text.contains(n)) {
            seen_at = Some(start.elapsed());
            break;
        }
        if exit.is_some() {
            break;
        }
    }
    let report = running.stop();
    let now = start.elapsed();
    let stopped_in = now - seen_at.unwrap_or(now);
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
    match seen_at {
        Some(t) => {
            for n in needles {
                let line = text.lines().find(|l| l.contains(n)).unwrap_or_default();
                println!("after {:.2} s: {line}", t.as_secs_f64());
            }
            println!("vCPUs stopped cleanly in {stopped_in:?}; stuck: {:?}", report.stuck_vcpus);
            println!("{where_}");
            assert!(report.stuck_vcpus.is_empty(), "vCPU threads did not stop: {where_}");
            t
        }
        None => panic!(
            "console never showed {needles:?} after {:.1} s (exit {exit:?}, VM report exit {:?})\n{where_}\n\
             last console output ({} bytes total):\n{tail}",
            start.elapsed().as_secs_f64(),
            report.exit,
            text.len()
        ),
    }
}

#[test]
fn real_kernel_prints_its_banner_on_serial() {
    if !common::kvm_present("real_kernel_prints_its_banner_on_serial") {
        return;
    }
    boot_until(&common::find_vmlinux(), 128, "", &["Linux version"]);
}

/// 8 GiB: the kernel's printout of the firmware (our zero page's) e820 map shows RAM below the
/// MMIO hole and 5 GiB from 4 GiB up. `mem=256M` makes the kernel use only the first 256 MiB
/// after printing it: initialising 8 GiB of page structures takes minutes on a software KVM.
#[test]
fn real_kernel_sees_ram_above_the_mmio_hole() {
    if !common::kvm_present("real_kernel_sees_ram_above_the_mmio_hole") {
        return;
    }
    boot_until(
        &common::find_vmlinux(),
        8 << 10,
        "mem=256M",
        &[
            "BIOS-e820: [mem 0x0000000000100000-0x00000000bfffffff] usable",
            "BIOS-e820: [mem 0x0000000100000000-0x000000023fffffff] usable",
        ],
    );
}
