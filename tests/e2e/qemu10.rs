//! Debian 13's QEMU (10.x) under TCG: lifecycle, exit codes, a fork-heavy shell and stdio, on the
//! QEMU of a Debian trixie root file system that `images/build-trixie-root.sh` builds (cached in
//! /var/cache/rootcell/trixie-<hash>/, about 4 minutes the first time) and runs through the root's
//! own loader and libraries (`rootcell-qemu`), so the host's packages stay Debian 12's.
//!
//! The fork-heavy test is the reproduction of issue 19: without the QEMU backend's
//! `init_on_alloc=1` under TCG, nearly every program started from the virtio-fs share crashes on
//! QEMU 10 (stale translations of pages the vhost-user back end filled). Set
//! `ROOTCELL_KERNEL_ARGS=init_on_alloc=0` to see it fail.
//!
//! The guests run one at a time (the development machines have 2 shared cores).

use rootcell_e2e::*;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The trixie root's cache directory, holding Debian 13's QEMU 10.
fn trixie() -> &'static Path {
    let dir = trixie_root();
    let version = std::fs::read_to_string(dir.join("qemu-version")).unwrap_or_default();
    assert!(
        version.starts_with("QEMU emulator version 10."),
        "{} holds {version:?}, not QEMU 10",
        dir.display()
    );
    dir
}

/// One guest at a time, whatever the test harness's thread count.
fn one_guest() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A runtime that boots its guests with the trixie root's QEMU under TCG.
fn runtime() -> Runtime {
    let qemu = trixie().join("rootcell-qemu");
    Runtime::new()
        .env("ROOTCELL_QEMU", qemu.to_str().unwrap())
        .env("ROOTCELL_HYPERVISOR", "qemu")
        .env("ROOTCELL_ACCEL", "tcg")
}

fn run(rt: &Runtime, b: &Bundle, prefix: &str, input: Option<Vec<u8>>) -> std::process::Output {
    let id = unique_id(prefix);
    let args = ["run", "--bundle", b.path().to_str().unwrap(), &id];
    let o = match input {
        Some(data) => rt.run_with_input(&args, data),
        None => rt.run(&args),
    };
    assert_no_leftovers(rt, &id);
    o
}

#[test]
fn lifecycle_create_start_state_delete() {
    let rt = runtime();
    let _g = one_guest();
    let gate = tempfile::tempdir().unwrap();
    let bundle = Bundle::new(&[
        "sh",
        "-c",
        "while [ ! -e /gate/go ]; do sleep 0.1; done; echo finished",
    ])
    .edit(|s| {
        s["mounts"].as_array_mut().unwrap().push(serde_json::json!({
            "destination": "/gate", "type": "bind", "source": gate.path(), "options": ["rbind", "rw"]
        }));
    });
    let id = unique_id("q10life");
    let (o, out, _err) = rt.create(&bundle, &id);
    assert_eq!(code(&o), 0, "create failed: {}", text(&o.stderr));
    let st = rt.state(&id);
    assert_eq!(st["status"], "created");
    assert!(st["pid"].as_i64().unwrap() > 0, "host pid: {st}");
    let o = rt.run(&["start", &id]);
    assert_eq!(code(&o), 0, "start failed: {}", text(&o.stderr));
    assert_eq!(rt.state(&id)["status"], "running");
    std::fs::write(gate.path().join("go"), b"").unwrap();
    rt.wait_status(&id, "stopped", Duration::from_secs(60));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "finished\n");
    let o = rt.run(&["delete", &id]);
    assert_eq!(code(&o), 0, "delete failed: {}", text(&o.stderr));
    assert!(!rt.list_ids().contains(&id));
    assert_no_leftovers(&rt, &id);
}

#[test]
fn exit_codes_pass_through() {
    let rt = runtime();
    let _g = one_guest();
    // A plain exit, and a signal death (128+N) of a forked child reported by the shell.
    let b = Bundle::new(&["sh", "-c", "sh -c 'kill -SEGV $$'; echo child=$?; exit 7"]);
    let o = run(&rt, &b, "q10exit", None);
    assert_eq!(code(&o), 7, "stderr: {}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "child=139\n");
}

#[test]
fn fork_heavy_shell() {
    let rt = runtime();
    let _g = one_guest();
    // 200 forks (command substitutions), each checked, then 20 programs started from the
    // virtio-fs share (fork + exec; on QEMU 10 without the workaround nearly each one crashes).
    let script = "i=0; while [ $i -lt 200 ]; do x=$(echo $i); [ \"$x\" = \"$i\" ] || exit 3; \
                  i=$((i+1)); done; j=0; while [ $j -lt 20 ]; do /bin/true || exit 4; \
                  [ \"$(/bin/echo $j)\" = \"$j\" ] || exit 5; j=$((j+1)); done; \
                  echo forks=$i execs=$((2*j)); cat /proc/cmdline >&2";
    let b = Bundle::new(&["sh", "-c", script]);
    let started = Instant::now();
    let o = run(&rt, &b, "q10fork", None);
    eprintln!(
        "fork-heavy run: {:.1} s (boot included); guest kernel command line: {}",
        started.elapsed().as_secs_f64(),
        text(&o.stderr).trim()
    );
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "forks=200 execs=40\n");
}

#[test]
fn stdio_round_trip_and_separate_stderr() {
    let rt = runtime();
    let _g = one_guest();
    let mut data = vec![0u8; 16 << 20];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut data)
        .unwrap();
    let want = Sha256::digest(&data);
    let b = Bundle::new(&["sh", "-c", "cat; echo to-stderr >&2"]);
    let o = run(&rt, &b, "q10stdio", Some(data));
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    assert_eq!(o.stdout.len(), 16 << 20, "all bytes came back");
    assert_eq!(Sha256::digest(&o.stdout), want, "bytes came back unchanged");
    assert!(
        text(&o.stderr).ends_with("to-stderr\n"),
        "stderr: {:?}",
        text(&o.stderr)
    );
}
