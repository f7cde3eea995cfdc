//! Runs the real `rootcell` binary: error paths must print one clear line, log it as JSON when
//! asked, and leave nothing behind. The boot-failure test boots a real guest (QEMU) with an init
//! that never answers, so it needs the guest kernel; it says so and returns early without one.

use rootcell_e2e::run_dir;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn rootcell(root: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rootcell"));
    c.arg("--root").arg(root).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run rootcell")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// A bundle with an empty rootfs and `config` as config.json.
fn bundle(dir: &Path, config: &str) -> PathBuf {
    let b = dir.join("bundle");
    std::fs::create_dir_all(b.join("rootfs")).unwrap();
    std::fs::write(b.join("config.json"), config).unwrap();
    b
}

const CONFIG: &str = r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"user":{"uid":0,"gid":0},"args":["true"],"cwd":"/"},"linux":{"namespaces":[{"type":"network"}]}}"#;

/// Nothing for `id` under `root` and no run dir for it.
fn assert_clean(root: &Path, id: &str) {
    assert!(!root.join(id).exists(), "state dir of {id} left behind");
    let leftovers: Vec<_> = std::fs::read_dir(root)
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    assert!(!run_dir(root, id).exists(), "run dir of {id} left behind");
}

#[test]
fn bad_input_fails_clearly_and_leaves_nothing() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let b = bundle(t.path(), CONFIG);
    let b_str = b.to_str().unwrap();
    type Case<'a> = (Vec<&'a str>, &'a str, Vec<(&'a str, &'a str)>);
    let cases: Vec<Case> = vec![
        (
            vec!["create", "--bundle", "/nonexistent-bundle", "c1"],
            "/nonexistent-bundle",
            vec![],
        ),
        (
            vec!["create", "--bundle", b_str, "bad/id"],
            "invalid container id",
            vec![],
        ),
        (
            vec!["create", "--bundle", b_str, "c1"],
            "guest kernel not found at /nonexistent/bzImage",
            vec![("ROOTCELL_KERNEL", "/nonexistent/bzImage")],
        ),
        (
            vec!["create", "--bundle", b_str, "c1"],
            "QEMU not found",
            vec![
                ("ROOTCELL_KERNEL", "/bin/sh"),
                ("ROOTCELL_INITRD", "/bin/sh"),
                ("ROOTCELL_QEMU", "/nonexistent/qemu"),
            ],
        ),
    ];
    for (args, want, env) in cases {
        let o = rootcell(&root, &args, &env);
        assert!(!o.status.success(), "{args:?} succeeded");
        let e = stderr(&o);
        assert!(
            e.starts_with("rootcell: ") && e.contains(want),
            "{args:?}: {e}"
        );
        assert_eq!(e.lines().count(), 1, "one line expected: {e}");
        assert_clean(&root, "c1");
    }

    let bad_json = bundle(&t.path().join("j"), "{ not json");
    let o = rootcell(
        &root,
        &["create", "-b", bad_json.to_str().unwrap(), "c2"],
        &[],
    );
    assert!(
        stderr(&o).contains("config.json") && stderr(&o).contains("invalid"),
        "{}",
        stderr(&o)
    );
    let no_root = bundle(
        &t.path().join("r"),
        &CONFIG.replace("\"rootfs\"", "\"missing\""),
    );
    let o = rootcell(
        &root,
        &["create", "-b", no_root.to_str().unwrap(), "c2"],
        &[],
    );
    assert!(stderr(&o).contains("root.path"), "{}", stderr(&o));
    let hooks = bundle(
        &t.path().join("h"),
        &CONFIG.replace(
            "\"root\"",
            "\"hooks\":{\"createContainer\":[{\"path\":\"/bin/true\"}]},\"root\"",
        ),
    );
    let o = rootcell(&root, &["create", "-b", hooks.to_str().unwrap(), "c2"], &[]);
    assert!(
        stderr(&o).contains("hooks.createContainer"),
        "{}",
        stderr(&o)
    );
    assert_clean(&root, "c2");
}

#[test]
fn unknown_containers() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    for args in [
        vec!["state", "nope"],
        vec!["start", "nope"],
        vec!["kill", "nope", "KILL"],
        vec!["delete", "nope"],
    ] {
        let o = rootcell(&root, &args, &[]);
        assert!(!o.status.success());
        assert!(
            stderr(&o).contains("container nope does not exist"),
            "{args:?}: {}",
            stderr(&o)
        );
    }
    assert!(rootcell(&root, &["delete", "--force", "nope"], &[])
        .status
        .success());
    let o = rootcell(&root, &["kill", "nope", "NOTASIGNAL"], &[]);
    assert!(stderr(&o).contains("invalid signal"), "{}", stderr(&o));
    let o = rootcell(&root, &["list", "--format", "json"], &[]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "[]");
}

#[test]
fn errors_are_logged_as_runc_json() {
    let t = tempfile::tempdir().unwrap();
    let log = t.path().join("log.json");
    let o = rootcell(
        &t.path().join("root"),
        &[
            "--log",
            log.to_str().unwrap(),
            "--log-format",
            "json",
            "state",
            "ghost",
        ],
        &[],
    );
    assert!(!o.status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["level"], "error");
    assert_eq!(last["msg"], "container ghost does not exist");
    assert!(last["time"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn guest_that_never_answers_is_reported_and_cleaned_up() {
    let test = "guest_that_never_answers_is_reported_and_cleaned_up";
    let Some(kernel) = rootcell_test_support::require_bzimage(test) else {
        return;
    };
    let tools = Path::new("/bin/busybox").is_file()
        && Command::new("cpio").arg("--version").output().is_ok();
    let how = "install busybox-static and cpio (scripts/install-deps.sh)";
    if !rootcell_test_support::require(test, tools, "busybox or cpio missing", how) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    // An init that prints a marker and sleeps: the agent never answers.
    let stage = t.path().join("stage");
    std::fs::create_dir_all(stage.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", stage.join("bin/busybox")).unwrap();
    std::fs::write(
        stage.join("init"),
        "#!/bin/busybox sh\n/bin/busybox echo no-agent-here\n/bin/busybox sleep 600\n",
    )
    .unwrap();
    let initrd = t.path().join("initrd.cpio.gz");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "chmod +x init && find . | cpio -o -H newc --quiet | gzip > {}",
            initrd.display()
        ))
        .current_dir(&stage)
        .status()
        .unwrap();
    assert!(st.success());
    let root = t.path().join("root");
    let b = bundle(t.path(), CONFIG);
    let env = [
        ("ROOTCELL_KERNEL", kernel.to_str().unwrap()),
        ("ROOTCELL_INITRD", initrd.to_str().unwrap()),
        ("ROOTCELL_BOOT_TIMEOUT", "30"),
    ];
    let pid_file = t.path().join("pid");
    let o = rootcell(
        &root,
        &[
            "create",
            "-b",
            b.to_str().unwrap(),
            "--pid-file",
            pid_file.to_str().unwrap(),
            "boot1",
        ],
        &env,
    );
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("did not come up within 30 s") && e.contains("no-agent-here"),
        "{e}"
    );
    assert!(!pid_file.exists());
    assert_clean(&root, "boot1");
    let qemu = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "pgrep -f '[q]emu-system.*{}' | wc -l",
            initrd.display()
        ))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&qemu.stdout).trim(),
        "0",
        "a QEMU survived"
    );
}
