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

    // The container's VM is the root's QEMU 10: rootcell runs in the daemon's chroot and finds
    // that QEMU on PATH.
    let id = run_detached(d, &[], "exec sleep 600");
    let pid = inspect(d, &id, "{{.State.Pid}}");
    let chroot = d.dir().join("root");
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/root")).unwrap(),
        chroot,
        "the sandbox runs in the daemon's chroot"
    );
    let qemu = chroot.join("usr/bin/qemu-system-x86_64");
    // Children of any of the sandbox's threads.
    let exes: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| c.split_whitespace().map(String::from).collect::<Vec<_>>())
        .filter_map(|c| std::fs::read_link(format!("/proc/{c}/exe")).ok())
        .collect();
    assert!(
        exes.contains(&qemu),
        "no child of the sandbox runs {}: {exes:?}",
        qemu.display()
    );
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
