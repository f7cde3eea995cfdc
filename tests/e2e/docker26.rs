//! Debian 13's Docker 26, containerd 1.7 and runc drive rootcell as a daemon.json `path` runtime,
//! as on a Debian 13 host: every test of `docker.rs` and `network.rs` (included below as
//! modules) against that Docker, plus the daemon.json forms Docker 26 has beyond 20.10 (`runtimeArgs` through its
//! wrapper script, and `runtimeType` with `options.BinaryName`).
//!
//! The daemons are the ones of the trixie root that `images/build-trixie-root.sh` builds (cached
//! in /var/cache/rootcell/trixie-<hash>/), chrooted on the host's kernel in a mount namespace of
//! their own with their own socket, data-root, exec-root, containerd and bridge (see
//! `rootcell_e2e::docker`), so a host dockerd is not disturbed. Inside that root,
//! `qemu-system-x86_64` is Debian 13's QEMU 10, which rootcell finds on PATH: the whole stack is
//! what a Debian 13 user without hardware KVM has.

use rootcell_e2e::docker::{
    inspect, ok, private_daemon_of, run_detached, shared_daemon, DockerDaemon, Engine,
    PrivateDaemon, IMAGE,
};
use rootcell_e2e::*;
use serde_json::json;

/// These tests' Docker: the trixie root's.
fn engine() -> Engine {
    Engine::Root(trixie_root().join("rootfs"))
}

/// The daemon the tests of `docker.rs` drive in this binary.
fn daemon() -> &'static DockerDaemon {
    shared_daemon(engine(), &[])
}

/// The tests of docker.rs, against Docker 26.
#[path = "docker.rs"]
mod docker;

/// The tests of network.rs (default bridge, `-p`, user-defined networks by name, `--network
/// none`), against Docker 26; its tests that need no Docker run here again too (seconds).
#[path = "network.rs"]
mod network;

/// `docker version`'s line for `component` (`Engine`, `containerd`, `runc`): its version.
fn component_version(d: &DockerDaemon, component: &str) -> String {
    let all = ok(
        d,
        &[
            "version",
            "--format",
            "{{range .Server.Components}}{{.Name}} {{.Version}}\n{{end}}",
        ],
    );
    all.lines()
        .find_map(|l| l.strip_prefix(&format!("{component} ")))
        .unwrap_or_else(|| panic!("docker version names no {component}: {all}"))
        .trim()
        .to_string()
}

#[test]
fn the_daemon_is_debian_13s_docker_26_with_containerd_1_7() {
    let d = daemon();
    let engine = component_version(d, "Engine");
    let containerd = component_version(d, "containerd");
    let runc = component_version(d, "runc");
    println!("Docker {engine}, containerd {containerd}, runc {runc}");
    assert!(engine.starts_with("26."), "Docker {engine}, not 26");
    assert!(
        containerd.starts_with("1.7."),
        "containerd {containerd}, not 1.7"
    );
    // Docker 26 asks every runtime for `features` at start; rootcell answers, so it is listed.
    let runtimes = ok(d, &["info", "--format", "{{json .Runtimes}}"]);
    assert!(runtimes.contains("rootcell"), "runtimes: {runtimes}");

    // The container's VM: without hardware KVM (these development machines), the root's QEMU
    // 10, which rootcell, running in the daemon's chroot, finds on PATH; with it (the nested
    // lane's L1), `auto` picks the built-in VMM, whose vCPUs are threads of its own process, a
    // child of the sandbox (`builtin-vmm`).
    let id = run_detached(d, &[], "exec sleep 600");
    let pid = inspect(d, &id, "{{.State.Pid}}");
    let chroot = d.dir().join("root");
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/root")).unwrap(),
        chroot,
        "the sandbox runs in the daemon's chroot"
    );
    let qemu = chroot.join("usr/bin/qemu-system-x86_64");
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .collect();
    // Children of any of the sandbox's threads.
    let kids: Vec<String> = tasks
        .iter()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| c.split_whitespace().map(String::from).collect::<Vec<_>>())
        .collect();
    let exes: Vec<_> = kids
        .iter()
        .filter_map(|c| std::fs::read_link(format!("/proc/{c}/exe")).ok())
        .collect();
    let comm_is = |dir: &std::path::Path, f: &dyn Fn(&str) -> bool| {
        std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| f(c.trim()))
    };
    // vCPU threads of the sandbox's built-in VMM process.
    let vcpus = kids
        .iter()
        .map(|k| std::path::PathBuf::from(format!("/proc/{k}")))
        .filter(|k| comm_is(k, &|c| c == "builtin-vmm"))
        .filter_map(|k| std::fs::read_dir(k.join("task")).ok())
        .flat_map(|ts| ts.flatten().collect::<Vec<_>>())
        .filter(|t| comm_is(&t.path(), &|c| c.starts_with("vcpu")))
        .count();
    let builtin = match std::env::var("ROOTCELL_HYPERVISOR").as_deref() {
        Ok("qemu") => false,
        Ok("builtin") => true,
        _ => hardware_kvm(),
    };
    if builtin {
        assert!(
            vcpus > 0 && !exes.contains(&qemu),
            "the built-in VMM runs the VM in its process under the sandbox ({vcpus} vCPU threads; children: {exes:?})"
        );
    } else {
        assert!(
            exes.contains(&qemu),
            "no child of the sandbox runs {}: {exes:?}",
            qemu.display()
        );
    }
    let version = std::fs::read_to_string(trixie_root().join("qemu-version")).unwrap();
    assert!(
        version.starts_with("QEMU emulator version 10."),
        "{version}"
    );
    ok(d, &["rm", "-f", &id]);
}

/// A private Docker 26 with rootcell registered in the forms 20.10 lacks, its containerd shim
/// included.
fn forms_daemon() -> PrivateDaemon {
    let bin = artifacts().bin;
    private_daemon_of(
        engine(),
        &json!({
            "runtimes": {
                // Docker writes runtimeArgs into a wrapper script that puts them before its own
                // global flags: --log-format json then comes twice (the last one wins).
                "rc-args": {"path": bin, "runtimeArgs": ["--log-format", "json"]},
                // The shim-v2 form: containerd's runc shim with rootcell as its binary.
                "rc-shim": {
                    "runtimeType": "io.containerd.runc.v2",
                    "options": {"BinaryName": bin}
                },
                // rootcell's own containerd shim (issue 18), by the absolute path of its binary
                // (by name, `--runtime io.containerd.rootcell.v2` needs it on containerd's PATH).
                "rc-v2": {"runtimeType": bin.with_file_name("containerd-shim-rootcell-v2")}
            }
        }),
    )
}

#[test]
fn runtime_args_and_the_runtime_type_form_both_run_containers() {
    let d = forms_daemon();
    let release = artifacts().kernel_release;
    for runtime in ["rc-args", "rc-shim", "rc-v2"] {
        let o = d.docker(&[
            "run",
            "--rm",
            "--runtime",
            runtime,
            IMAGE,
            "sh",
            "-c",
            "id -u; uname -r; exit 7",
        ]);
        assert_eq!(
            code(&o),
            7,
            "{runtime}: {}\ndockerd log:\n{}",
            text(&o.stderr),
            d.log_tail(20)
        );
        assert_eq!(text(&o.stdout), format!("0\n{release}\n"), "{runtime}");

        // stdin to EOF and back through the same runtime.
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let o = d.docker_with_input(
            &["run", "--rm", "-i", "--runtime", runtime, IMAGE, "cat"],
            data.clone(),
        );
        assert_eq!(code(&o), 0, "{runtime} -i: {}", text(&o.stderr));
        assert!(o.stdout == data, "{runtime}: stdin came back changed");

        // A runtime error reaches the user through the shim's log.
        let o = d.docker(&["run", "--rm", "--runtime", runtime, IMAGE, "/no/such"]);
        assert_eq!(code(&o), 127, "{runtime}: {}", text(&o.stderr));
    }
    // rc-v2 really is rootcell's shim: a running container's shim process is it.
    let id = ok(
        &d,
        &["run", "-d", "--runtime", "rc-v2", IMAGE, "sleep", "600"],
    );
    let shims: Vec<String> = processes_mentioning("containerd-shim-rootcell-v2")
        .into_iter()
        .filter(|p| p.contains(id.trim()))
        .collect();
    assert_eq!(shims.len(), 1, "one rootcell shim for {id}: {shims:#?}");
    ok(&d, &["rm", "-f", id.trim()]);
    drop(d);
}

/// Docker 23+ selects rootcell's shim by its runtime name alone, with nothing in daemon.json,
/// once the shim is installed where containerd looks for `containerd-shim-rootcell-v2`: on its
/// PATH. The install is `scripts/setup.sh`'s (both binaries into /usr/local/bin), done here in
/// the daemon's own root; the daemon was started without them, so only this install can be what
/// containerd finds.
#[test]
fn docker_selects_the_shim_by_runtime_name_from_containerds_path() {
    const RUNTIME: &str = "io.containerd.rootcell.v2";
    const SHIM: &str = "/usr/local/bin/containerd-shim-rootcell-v2";
    let d = private_daemon_of(engine(), &json!({}));
    // Through /proc/PID/root: the daemon's chroot, its overlay and mount namespace, as dockerd and
    // the containerd it starts see it.
    let root = std::path::PathBuf::from(format!("/proc/{}/root", d.pid()));
    let path = std::fs::read(format!("/proc/{}/environ", d.pid())).unwrap();
    let path = String::from_utf8_lossy(&path)
        .split('\0')
        .find_map(|v| v.strip_prefix("PATH=").map(String::from))
        .unwrap_or_default();
    assert!(
        path.split(':').any(|p| p == "/usr/local/bin"),
        "the daemon's PATH has no /usr/local/bin: {path}"
    );
    assert!(
        !root.join(SHIM.trim_start_matches('/')).exists(),
        "the root has a shim before the install"
    );
    // Not installed yet: Docker accepts the name, containerd finds no such shim and says so.
    let o = d.docker(&["run", "--rm", "--runtime", RUNTIME, IMAGE, "true"]);
    assert_ne!(code(&o), 0, "ran without the shim installed");
    assert!(
        text(&o.stderr).contains("containerd-shim-rootcell-v2"),
        "{}",
        text(&o.stderr)
    );
    println!("before the install: {}", text(&o.stderr).trim());
    let bin = artifacts().bin;
    for (from, to) in [
        (bin.clone(), "/usr/local/bin/rootcell"),
        (bin.with_file_name("containerd-shim-rootcell-v2"), SHIM),
    ] {
        let st = std::process::Command::new("install")
            .args(["-D", "-m", "0755"])
            .arg(&from)
            .arg(root.join(to.trim_start_matches('/')))
            .status()
            .unwrap();
        assert!(st.success(), "install {} {to}", from.display());
    }

    let release = artifacts().kernel_release;
    let o = d.docker(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        IMAGE,
        "sh",
        "-c",
        "id -u; uname -r; exit 7",
    ]);
    assert_eq!(
        code(&o),
        7,
        "{}\ndockerd log:\n{}",
        text(&o.stderr),
        d.log_tail(20)
    );
    assert_eq!(text(&o.stdout), format!("0\n{release}\n"));
    println!("--runtime {RUNTIME}: exit 7, stdout {:?}", text(&o.stdout));

    // One shim per container, and it is the installed binary: two running containers, each with
    // exactly one shim whose command line names it, started from /usr/local/bin in the root.
    let ids: Vec<String> = (0..2)
        .map(|_| {
            ok(
                &d,
                &["run", "-d", "--runtime", RUNTIME, IMAGE, "sleep", "600"],
            )
            .trim()
            .to_string()
        })
        .collect();
    for id in &ids {
        assert_eq!(
            inspect(&d, id, "{{.HostConfig.Runtime}}"),
            RUNTIME,
            "the runtime Docker records for {id}"
        );
        let shims: Vec<String> = processes_mentioning("containerd-shim-rootcell-v2")
            .into_iter()
            .filter(|p| p.contains(id.as_str()))
            .collect();
        assert_eq!(shims.len(), 1, "one rootcell shim for {id}: {shims:#?}");
        let pid = shims[0].split(':').next().unwrap();
        let argv0 = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let argv0 = String::from_utf8_lossy(argv0.split(|&b| b == 0).next().unwrap()).into_owned();
        assert_eq!(argv0, SHIM, "the shim containerd started for {id}");
        assert_eq!(
            std::fs::read_link(format!("/proc/{pid}/root")).unwrap(),
            d.dir().join("root"),
            "the shim of {id} runs in the daemon's root"
        );
        println!("{id}: shim pid {pid}, {argv0}");
    }
    let mut args = vec!["rm", "-f"];
    args.extend(ids.iter().map(String::as_str));
    ok(&d, &args);
    // Removing the containers ends their shims.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let left: Vec<String> = processes_mentioning("containerd-shim-rootcell-v2")
            .into_iter()
            .filter(|p| ids.iter().any(|id| p.contains(id.as_str())))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "shims left after docker rm: {left:#?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    drop(d);
}

#[test]
fn network_container_joins_the_first_containers_vm_from_a_chroot() {
    // The runtime runs in the daemon's chroot here: joining the owner's mount namespace must
    // keep the owner's root, not the namespace's real root (where the share's paths differ).
    let d = daemon();
    let a = run_detached(d, &[], "exec sleep 600");
    let boot_id = "cat /proc/sys/kernel/random/boot_id";
    let first = ok(d, &["exec", &a, "sh", "-c", boot_id]);
    let o = d.docker(&[
        "run",
        "--rm",
        "--runtime",
        "rootcell",
        "--network",
        &format!("container:{a}"),
        IMAGE,
        "sh",
        "-c",
        boot_id,
    ]);
    assert_eq!(code(&o), 0, "{}\n{}", text(&o.stderr), d.log_tail(20));
    assert_eq!(
        text(&o.stdout),
        first,
        "the second container runs in the first's VM"
    );
    ok(d, &["rm", "-f", &a]);
}
