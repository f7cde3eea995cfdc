//! stdio crosses the VM boundary unchanged: binary data, separate stderr, stdin EOF.

use rootcell_e2e::*;
use sha2::{Digest, Sha256};
use std::io::Read;

#[test]
fn hundred_mib_of_random_bytes_round_trip() {
    let rt = Runtime::new();
    let mut data = vec![0u8; 100 << 20];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut data)
        .unwrap();
    let want = Sha256::digest(&data);
    let b = Bundle::new(&["cat"]);
    let id = unique_id("big");
    let started = std::time::Instant::now();
    let o = rt.run_with_input(&["run", "--bundle", b.path().to_str().unwrap(), &id], data);
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    assert_eq!(o.stdout.len(), 100 << 20, "all bytes came back");
    assert_eq!(Sha256::digest(&o.stdout), want, "bytes came back unchanged");
    eprintln!("100 MiB through stdin and stdout in {secs:.1} s (boot included)");
    assert_no_leftovers(&rt, &id);
}

#[test]
fn stderr_only_write_stays_on_stderr() {
    let rt = Runtime::new();
    let b = Bundle::new(&["sh", "-c", "echo to-stderr >&2"]);
    let id = unique_id("err");
    let o = rt.run(&["run", "--bundle", b.path().to_str().unwrap(), &id]);
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "");
    assert!(
        text(&o.stderr).ends_with("to-stderr\n"),
        "stderr: {:?}",
        text(&o.stderr)
    );
}

#[test]
fn stdin_eof_reaches_the_process() {
    let rt = Runtime::new();
    let b = Bundle::new(&["sh", "-c", "wc -c; echo after-eof"]);
    let id = unique_id("eof");
    let o = rt.run_with_input(
        &["run", "--bundle", b.path().to_str().unwrap(), &id],
        b"12345".to_vec(),
    );
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    assert_eq!(
        text(&o.stdout).split_whitespace().collect::<Vec<_>>(),
        ["5", "after-eof"]
    );
}

#[test]
fn terminal_is_a_pty_of_the_containers_own_devpts() {
    // Under runc, `docker run -t ... tty` prints /dev/pts/0: the pty comes from the container's
    // devpts instance and the container's /dev/console is that same pty.
    let rt = Runtime::new();
    let b = Bundle::new(&[
        "sh",
        "-c",
        "tty; ls -1 /dev/pts; stat -L -c '%t:%T' /dev/console \"$(tty)\"",
    ])
    .edit(|s| s["process"]["terminal"] = serde_json::json!(true));
    let id = unique_id("tty");
    let o = rt.run(&["run", "--bundle", b.path().to_str().unwrap(), &id]);
    assert_eq!(code(&o), 0, "run: {}", text(&o.stderr));
    let out = text(&o.stdout).replace('\r', "");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines.get(..3),
        Some(&["/dev/pts/0", "0", "ptmx"][..]),
        "tty names an entry of the container's /dev/pts; output: {out:?}"
    );
    assert!(
        lines.len() == 5 && lines[3] == lines[4],
        "/dev/console is the terminal's pty; output: {out:?}"
    );
    assert_no_leftovers(&rt, &id);

    // `exec -t` gets a pty of the container's devpts too (runc: /dev/pts/N there).
    let b = Bundle::new(&["sleep", "1000"]);
    let id = unique_id("tty-exec");
    let (o, _, _) = rt.create(&b, &id);
    assert_eq!(code(&o), 0, "create: {}", text(&o.stderr));
    assert_eq!(code(&rt.run(&["start", &id])), 0);
    let o = rt.run(&["exec", "-t", &id, "sh", "-c", "tty; ls -1 /dev/pts"]);
    assert_eq!(code(&o), 0, "exec -t: {}", text(&o.stderr));
    assert_eq!(
        text(&o.stdout).replace('\r', ""),
        "/dev/pts/0\n0\nptmx\n",
        "exec -t terminal"
    );
    let d = rt.run(&["delete", "--force", &id]);
    assert_eq!(code(&d), 0, "delete --force: {}", text(&d.stderr));
    assert_no_leftovers(&rt, &id);
}
