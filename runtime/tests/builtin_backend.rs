//! The `builtin` hypervisor through the real `rootcell` binary: backend selection by flag, env
//! and config file, a missing vmlinux, and a bounded real boot on this machine's /dev/kvm. Every
//! failed create must leave no state dir, run dir or process behind.

use rootcell_e2e::run_dir;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_rootcell");

/// A state root and a bundle (busybox-free: these creates never reach the container).
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("rootcell-builtin-")
            .tempdir()
            .unwrap();
        let bundle = dir.path().join("bundle");
        std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
        let st = Command::new(BIN)
            .args(["spec", "-b"])
            .arg(&bundle)
            .status()
            .unwrap();
        assert!(st.success());
        // A detached create needs terminal: false.
        let path = bundle.join("config.json");
        let mut spec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        spec["process"]["terminal"] = false.into();
        std::fs::write(&path, serde_json::to_vec(&spec).unwrap()).unwrap();
        std::fs::write(dir.path().join("initrd"), empty_cpio()).unwrap();
        Fixture { dir }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// `rootcell --root R <global> create -b B id`, with a clean hypervisor environment plus
    /// `env`, killed if it outlives `limit`.
    fn create(&self, global: &[&str], id: &str, env: &[(&str, &str)], limit: Duration) -> Output {
        let mut c = Command::new(BIN);
        c.arg("--root").arg(self.root()).args(global);
        c.args(["create", "-b"])
            .arg(self.dir.path().join("bundle"))
            .arg(id);
        for k in [
            "ROOTCELL_HYPERVISOR",
            "ROOTCELL_CONFIG",
            "ROOTCELL_KERNEL_ARGS",
        ] {
            c.env_remove(k);
        }
        c.env("ROOTCELL_INITRD", self.dir.path().join("initrd"));
        for (k, v) in env {
            c.env(k, v);
        }
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let deadline = Instant::now() + limit;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "create did not return within {limit:?}; stderr: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().unwrap()
    }

    /// Fails the test if anything of container `id` is left on the host.
    fn assert_nothing_left(&self, id: &str) {
        let state = self.root().join(id);
        assert!(!state.exists(), "state dir {} left behind", state.display());
        let run = run_dir(&self.root(), id);
        assert!(!run.exists(), "run dir {} left behind", run.display());
        let root = self.root().display().to_string();
        // The sandbox is gone (it has our root in its command line), with the VM threads in it.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = processes_mentioning(&root);
            if left.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "processes left behind: {left:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts.contains(&run.display().to_string()),
            "mount of {} left behind",
            run.display()
        );
    }
}

/// An initramfs with no files (a lone newc trailer): valid, but there is no /init in it.
fn empty_cpio() -> Vec<u8> {
    let name = b"TRAILER!!!\0";
    let mut h = String::from("070701");
    // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    for v in [0u32, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, name.len() as u32, 0] {
        h.push_str(&format!("{v:08x}"));
    }
    let mut out = h.into_bytes();
    out.extend_from_slice(name);
    out.resize(512, 0);
    out
}

/// Pids whose command line contains `needle`.
fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) && pid != std::process::id() {
            out.push((pid, cmd));
        }
    }
    out
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A name, global flags and environment for one create.
type Case<'a> = (&'a str, &'a [&'a str], Vec<(&'a str, &'a str)>);

#[test]
fn missing_vmlinux_fails_cleanly_by_flag_env_and_config() {
    if !rootcell_test_support::require_root("missing_vmlinux_fails_cleanly_by_flag_env_and_config")
    {
        return;
    }
    let fx = Fixture::new();
    let missing = fx.dir.path().join("no-such-vmlinux");
    let missing_s = missing.display().to_string();
    let cfg = fx.dir.path().join("config.json");
    std::fs::write(&cfg, r#"{"hypervisor": "builtin"}"#).unwrap();
    let cfg_s = cfg.display().to_string();
    let cases: [Case; 4] = [
        ("flag", &["--hypervisor", "builtin"], vec![]),
        ("env", &[], vec![("ROOTCELL_HYPERVISOR", "builtin")]),
        ("config", &[], vec![("ROOTCELL_CONFIG", cfg_s.as_str())]),
        // The flag outranks a bad env value.
        (
            "flag-over-env",
            &["--hypervisor", "builtin"],
            vec![("ROOTCELL_HYPERVISOR", "bogus")],
        ),
    ];
    for (name, global, mut env) in cases {
        env.push(("ROOTCELL_VMLINUX", missing_s.as_str()));
        let id = format!("missing-{name}");
        let out = fx.create(global, &id, &env, Duration::from_secs(60));
        let err = stderr(&out);
        assert!(!out.status.success(), "{name}: create succeeded");
        assert!(
            err.contains("vmlinux") && err.contains(&missing_s) && err.contains("ROOTCELL_VMLINUX"),
            "{name}: unclear error: {err}"
        );
        fx.assert_nothing_left(&id);
    }
}

#[test]
fn bad_selection_is_a_clear_error_before_anything_is_made() {
    if !rootcell_test_support::require_root(
        "bad_selection_is_a_clear_error_before_anything_is_made",
    ) {
        return;
    }
    let fx = Fixture::new();
    let out = fx.create(
        &[],
        "bad-env",
        &[("ROOTCELL_HYPERVISOR", "kvm")],
        Duration::from_secs(60),
    );
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("invalid hypervisor \"kvm\" in ROOTCELL_HYPERVISOR"),
        "{err}"
    );
    fx.assert_nothing_left("bad-env");

    let cfg = fx.dir.path().join("bad.json");
    std::fs::write(&cfg, "{\"hypervisor\": \"vmware\"}").unwrap();
    let cfg_s = cfg.display().to_string();
    let out = fx.create(
        &[],
        "bad-cfg",
        &[("ROOTCELL_CONFIG", cfg_s.as_str())],
        Duration::from_secs(60),
    );
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("invalid rootcell config {cfg_s}")) && err.contains("vmware"),
        "{err}"
    );
    fx.assert_nothing_left("bad-cfg");

    // clap rejects a bad flag value itself.
    let out = fx.create(
        &["--hypervisor", "kvm"],
        "bad-flag",
        &[],
        Duration::from_secs(60),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("invalid value 'kvm'"),
        "{}",
        stderr(&out)
    );
    fx.assert_nothing_left("bad-flag");
}

/// True if the CPU shows vmx/svm (then a real guest can boot on /dev/kvm).
fn has_hw_virt() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| {
            s.lines().any(|l| {
                l.starts_with("flags") && l.split_whitespace().any(|f| f == "vmx" || f == "svm")
            })
        })
        .unwrap_or(false)
}

#[test]
fn real_builtin_boot_is_bounded_and_quotes_the_console() {
    if !rootcell_test_support::require_root("real_builtin_boot_is_bounded_and_quotes_the_console") {
        return;
    }
    if !rootcell_test_support::require_kvm("real_builtin_boot_is_bounded_and_quotes_the_console") {
        return;
    }
    let Some(vmlinux) = rootcell_test_support::require_vmlinux(
        "real_builtin_boot_is_bounded_and_quotes_the_console",
    ) else {
        return;
    };
    let fx = Fixture::new();
    let vmlinux_s = vmlinux.display().to_string();
    let hw = has_hw_virt();
    // The real initramfs if the build made one (on hardware KVM the agent then answers).
    let initrd = std::env::var("ROOTCELL_INITRD")
        .unwrap_or_else(|_| fx.dir.path().join("initrd").display().to_string());
    let t0 = Instant::now();
    let out = fx.create(
        &["--hypervisor", "builtin"],
        "boot",
        &[
            ("ROOTCELL_VMLINUX", vmlinux_s.as_str()),
            ("ROOTCELL_INITRD", initrd.as_str()),
            ("ROOTCELL_BOOT_TIMEOUT", "90"),
            // The early console prints the banner long before the 8250 driver would (guest
            // kernel code is emulated slowly here); loglevel undoes the runtime's `quiet`.
            (
                "ROOTCELL_KERNEL_ARGS",
                "earlyprintk=serial,ttyS0,115200 loglevel=7",
            ),
        ],
        Duration::from_secs(150),
    );
    let took = t0.elapsed();
    let err = stderr(&out);
    eprintln!(
        "builtin create took {took:?}; status {:?}; stderr:\n{err}",
        out.status
    );
    if out.status.success() {
        // Hardware KVM with a real initramfs: the guest came up. Clean up and check.
        assert!(hw, "the guest came up on a software /dev/kvm?");
        let st = Command::new(BIN)
            .arg("--root")
            .arg(fx.root())
            .args(["delete", "--force", "boot"])
            .status()
            .unwrap();
        assert!(st.success());
    } else if hw {
        assert!(err.contains("console"), "{err}");
    } else {
        // Software KVM (ENVIRONMENT.md): the kernel prints its banner after 8-35 s (machine
        // load), then either the vCPU stops on an instruction the emulator lacks or the boot
        // timeout hits first. Both must be a clean failure that quotes the console.
        assert!(
            err.contains("the guest did not come up within 90 s")
                || err.contains("the guest stopped before its agent answered"),
            "{err}"
        );
        assert!(
            err.contains("Linux version"),
            "no kernel banner in the quoted console: {err}"
        );
    }
    fx.assert_nothing_left("boot");
}

#[test]
fn builtin_boot_timeout_kills_the_running_vm_cleanly() {
    if !rootcell_test_support::require_root("builtin_boot_timeout_kills_the_running_vm_cleanly") {
        return;
    }
    if !rootcell_test_support::require_kvm("builtin_boot_timeout_kills_the_running_vm_cleanly") {
        return;
    }
    let Some(vmlinux) =
        rootcell_test_support::require_vmlinux("builtin_boot_timeout_kills_the_running_vm_cleanly")
    else {
        return;
    };
    let fx = Fixture::new();
    let vmlinux_s = vmlinux.display().to_string();
    let t0 = Instant::now();
    // 3 s is far less than any guest needs to reach its agent, so the vCPU is still running
    // (inside KVM_RUN) when the sandbox gives up and must stop it.
    let out = fx.create(
        &["--hypervisor", "builtin"],
        "timeout",
        &[
            ("ROOTCELL_VMLINUX", vmlinux_s.as_str()),
            ("ROOTCELL_BOOT_TIMEOUT", "3"),
        ],
        Duration::from_secs(60),
    );
    let took = t0.elapsed();
    let err = stderr(&out);
    eprintln!("builtin create with a 3 s boot timeout took {took:?}; stderr:\n{err}");
    assert!(!out.status.success());
    // With hardware KVM the kernel may reach its panic (this initramfs has no /init) in 3 s.
    let stopped = has_hw_virt() && err.contains("the guest stopped before its agent answered");
    assert!(
        stopped || err.contains("the guest did not come up within 3 s"),
        "{err}"
    );
    assert!(err.contains("console"), "{err}");
    assert!(
        took < Duration::from_secs(20),
        "stopping the VM took too long: {took:?}"
    );
    fx.assert_nothing_left("timeout");
}
