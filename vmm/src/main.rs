//! `rootcell-vmm`: boot a kernel in the built-in VMM from the command line (manual testing and
//! benchmarks; the runtime uses the library).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rootcell_fs::FsConfig;
use rootcell_vmm::devices::virtio::{fs::VirtioFs, vsock::VsockDevice};
use rootcell_vmm::{SerialOutput, Vm, VmConfig, VmExit};
use rootcell_vsock::VsockConfig;

const USAGE: &str =
    "usage: rootcell-vmm --kernel PATH [--initramfs PATH] [--cmdline STR] [--mem-mib N] \
[--vcpus N] [--serial PATH|-] [--timeout-secs N] [--vsock UDS] [--share DIR [--share-ro]] [--bench] \
[--no-seccomp]";

fn main() {
    let start = Instant::now();
    match run(start) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("rootcell-vmm: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Memory the process uses that is not guest RAM: guest RAM is a shared memfd and is counted in
/// RssShmem, so the VMM's own footprint is RssAnon + RssFile.
fn own_rss_kib() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("RssAnon:")? + field("RssFile:")?, field("RssShmem:")?))
}

fn run(start: Instant) -> anyhow::Result<i32> {
    let mut args = std::env::args().skip(1);
    let mut kernel = None;
    let mut config = VmConfig::new(
        "",
        "console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=-1",
    );
    let mut timeout = Duration::from_secs(60);
    let mut bench = false;
    let mut vsock_uds: Option<PathBuf> = None;
    let mut share: Option<PathBuf> = None;
    let mut share_ro = false;
    // vCPU threads and this (control) thread run under seccomp unless told otherwise; the
    // device I/O threads always do.
    let mut seccomp = true;
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--kernel" => kernel = Some(PathBuf::from(value()?)),
            "--initramfs" => config.initramfs = Some(PathBuf::from(value()?)),
            "--cmdline" => config.cmdline = value()?,
            "--mem-mib" => config.mem_mib = value()?.parse().context("--mem-mib")?,
            "--vcpus" => config.vcpus = value()?.parse().context("--vcpus")?,
            "--serial" => {
                let v = value()?;
                config.serial = if v == "-" {
                    SerialOutput::Writer(Box::new(std::io::stdout()))
                } else {
                    SerialOutput::File(v.into())
                };
            }
            "--timeout-secs" => {
                timeout = Duration::from_secs(value()?.parse().context("--timeout-secs")?)
            }
            "--bench" => bench = true,
            "--vsock" => vsock_uds = Some(PathBuf::from(value()?)),
            "--share" => share = Some(PathBuf::from(value()?)),
            "--share-ro" => share_ro = true,
            "--no-seccomp" => seccomp = false,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    config.kernel = kernel.with_context(|| format!("--kernel is required\n{USAGE}"))?;
    config.seccomp = seccomp;
    let mut vm = Vm::create(config)?;
    if let Some(uds) = vsock_uds {
        let dev = VsockDevice::new(&VsockConfig::new(&uds)).context("--vsock")?;
        vm.add_virtio_device(Box::new(dev))?;
    }
    if let Some(dir) = share {
        let dev = VirtioFs::new(
            &FsConfig {
                shared_dir: dir,
                read_only: share_ro,
            },
            rootcell_protocol::SHARE_TAG,
        )
        .context("--share")?;
        vm.add_virtio_device(Box::new(dev))?;
    }
    let running = vm.start()?;
    if bench {
        // Let the guest run a moment so the VMM's steady-state footprint is measured.
        running.wait_timeout(Duration::from_millis(500));
        let first = running.vcpu_status().first().and_then(|s| s.first_run);
        if let Some(t) = first {
            eprintln!(
                "bench: main() to first KVM_RUN: {:.2} ms",
                (t - start).as_secs_f64() * 1e3
            );
            // The launcher's clock reading just before exec, to include exec and dynamic loading.
            if let Some(t0) = std::env::var("ROOTCELL_BENCH_T0_NS")
                .ok()
                .and_then(|v| v.parse::<u128>().ok())
            {
                let first_wall = std::time::SystemTime::now() - t.elapsed();
                let ns = first_wall
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0);
                eprintln!(
                    "bench: launch to first KVM_RUN: {:.2} ms",
                    ns.saturating_sub(t0) as f64 / 1e6
                );
            }
        }
        if let Some(cpu) = running.vcpu_status().first().and_then(|s| s.first_run_cpu) {
            eprintln!(
                "bench: process CPU time at first KVM_RUN: {:.2} ms",
                cpu.as_secs_f64() * 1e3
            );
        }
        if let Some((own, guest)) = own_rss_kib() {
            eprintln!(
                "bench: VMM RSS excluding guest RAM: {own} KiB (guest RAM resident: {guest} KiB)"
            );
        }
    }
    if seccomp {
        // From here this thread only waits, stops the vCPUs, drops the devices and reports.
        let filter = rootcell_vmm::seccomp::vmm_filter(seccompiler::SeccompAction::KillProcess)?;
        rootcell_vmm::seccomp::apply(&filter)?;
    }
    let exit = running.wait_timeout(timeout);
    let report = running.stop();
    eprintln!("rootcell-vmm: exit {:?}", report.exit);
    for v in &report.vcpus {
        eprintln!(
            "  vcpu{}: {} exits, last {}, rip {:#x?}",
            v.cpu, v.exits, v.last_exit, v.rip
        );
        // A triple fault: the registers then and the guest's page tables read from its memory.
        if let Some(state) = &v.shutdown_state {
            eprintln!("  vcpu{} registers at the shutdown: {state}", v.cpu);
        }
        if let Some(walk) = &v.page_walk {
            eprintln!("  vcpu{} {walk}", v.cpu);
        }
    }
    Ok(match exit {
        Some(VmExit::Reset) | Some(VmExit::Shutdown) => 0,
        Some(VmExit::Error { .. }) => 1,
        Some(VmExit::Stopped) | None => 2,
    })
}
