//! End to end: a real guest kernel under QEMU TCG, our vhost-user vsock backend, and a static
//! guest `/init` running an AF_VSOCK echo server. QEMU and the kernel are found and required as
//! `rootcell-test-support` says (missing: a failure under scripts/test.sh, SKIPPED otherwise).

use std::fs;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rootcell_vsock::{serve_vhost_user, VsockConfig};

const TRANSFER: usize = 100 * 1024 * 1024;

/// Removes the scratch directory on every path.
struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Kills QEMU on every path.
struct QemuGuard(Child);
impl Drop for QemuGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl QemuGuard {
    fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

/// One newc cpio entry.
fn newc_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        data.len() as u32,
        0,
        0,
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while out.len() & 3 != 0 {
        out.push(0);
    }
    out.extend_from_slice(data);
    while out.len() & 3 != 0 {
        out.push(0);
    }
}

/// Builds the guest init and packs it with /dev/console into a gzipped newc initramfs.
fn build_initramfs(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/vsock_echo.rs");
    let init = dir.join("init");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let status = Command::new(rustc)
        .args([
            "--edition",
            "2021",
            "-O",
            "-C",
            "target-feature=+crt-static",
            "-o",
        ])
        .arg(&init)
        .arg(&src)
        .status()
        .expect("running rustc");
    assert!(status.success(), "building the guest init failed");
    let init_bytes = fs::read(&init).unwrap();
    let mut cpio = Vec::new();
    newc_entry(&mut cpio, 1, "dev", 0o040755, (0, 0), &[]);
    newc_entry(&mut cpio, 2, "dev/console", 0o020600, (5, 1), &[]);
    newc_entry(&mut cpio, 3, "init", 0o100755, (0, 0), &init_bytes);
    newc_entry(&mut cpio, 0, "TRAILER!!!", 0, (0, 0), &[]);
    let raw = dir.join("initramfs.cpio");
    fs::write(&raw, &cpio).unwrap();
    let gz = dir.join("initramfs.cpio.gz");
    let out = fs::File::create(&gz).unwrap();
    let status = Command::new("gzip")
        .args(["-1", "-c"])
        .arg(&raw)
        .stdout(out)
        .status()
        .expect("running gzip");
    assert!(status.success(), "gzip failed");
    gz
}

/// SHA-256 computed by a `sha256sum` child: full speed even when this test is built without
/// optimisations (the sha2 crate in a debug build would dominate the measured time).
struct Sha256Pipe(Child);
impl Sha256Pipe {
    fn new() -> Self {
        Sha256Pipe(
            Command::new("sha256sum")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("running sha256sum"),
        )
    }
    fn update(&mut self, data: &[u8]) {
        self.0.stdin.as_mut().unwrap().write_all(data).unwrap();
    }
    fn finish(mut self) -> String {
        drop(self.0.stdin.take());
        let mut out = String::new();
        self.0
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        self.0.wait().unwrap();
        out.split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    }
}

/// Hybrid handshake; `Ok(None)` when the device closed the socket (guest refused the port).
fn hybrid_connect(uds: &Path, port: u32) -> std::io::Result<Option<(UnixStream, String)>> {
    let mut s = UnixStream::connect(uds)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte)? {
            0 => return Ok(None),
            _ if byte[0] == b'\n' => break,
            _ => line.push(byte[0]),
        }
    }
    Ok(Some((s, String::from_utf8_lossy(&line).into_owned())))
}

/// CPU seconds (user + system) of a process or thread from its `stat` file.
fn cpu_seconds(stat_path: &Path) -> f64 {
    let stat = fs::read_to_string(stat_path).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks as f64 / 100.0
}

/// CPU use of this test process per thread name, to see where transfer time goes.
fn thread_cpu() -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = Vec::new();
    for e in fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        let secs = cpu_seconds(&e.path().join("stat"));
        let name = name.trim().to_string();
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, s)) => *s += secs,
            None => out.push((name, secs)),
        }
    }
    out
}

fn console_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

#[test]
fn echo_100mib_through_qemu_guest() {
    let test = "echo_100mib_through_qemu_guest";
    let Some(kernel) = rootcell_test_support::require_bzimage(test) else {
        return;
    };
    let Some(qemu) = rootcell_test_support::require_qemu(test) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("rootcell-vsock-e2e-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let _dir_guard = TempDir(dir.clone());
    let initrd = build_initramfs(&dir);

    let uds = dir.join("vsock.sock");
    let vhost_sock = dir.join("vsock.vhost.sock");
    let console = dir.join("console.log");
    // Guest-initiated connections to host port 5000 land here.
    let host_listener = UnixListener::bind(dir.join("vsock.sock_5000")).unwrap();

    let handle = serve_vhost_user(
        &vhost_sock,
        VsockConfig {
            guest_cid: 3,
            uds_path: uds.clone(),
        },
    )
    .expect("starting the backend");

    let child = Command::new(&qemu)
        .args([
            "-M",
            "microvm,acpi=off,x-option-roms=off,rtc=off,memory-backend=mem",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-smp",
            "1",
            "-m",
            "256M",
            "-object",
            "memory-backend-memfd,id=mem,size=256M,share=on",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 reboot=t panic=-1 quiet"])
        .arg("-chardev")
        .arg(format!("socket,id=vsock,path={}", vhost_sock.display()))
        .args(["-device", "vhost-user-vsock-device,chardev=vsock"])
        .stdin(Stdio::null())
        .spawn()
        .expect("starting qemu");
    let mut qemu = QemuGuard(child);
    let boot_start = Instant::now();

    // Guest -> host: the guest greets host port 5000 as soon as it is up.
    host_listener.set_nonblocking(true).unwrap();
    let greeter = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            match host_listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    let mut msg = String::new();
                    s.read_to_string(&mut msg).unwrap();
                    s.write_all(b"hello from host").unwrap();
                    return Some(msg);
                }
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(_) => return None,
            }
        }
    });

    // Host -> guest: retry until the guest's echo server listens (RST closes our socket).
    let deadline = Instant::now() + Duration::from_secs(90);
    let (stream, ok_line) = loop {
        if let Some(c) = hybrid_connect(&uds, 1024).expect("hybrid connect") {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "guest echo server never answered; console:\n{}",
            console_tail(&console)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    println!("connected after {:?}: {ok_line:?}", boot_start.elapsed());
    assert!(
        ok_line.starts_with("OK "),
        "unexpected handshake reply {ok_line:?}"
    );

    // 100 MiB of random bytes, half-close, read the echo back concurrently.
    let qemu_stat = PathBuf::from(format!("/proc/{}/stat", qemu.0.id()));
    let qemu_cpu_before = cpu_seconds(&qemu_stat);
    let start = Instant::now();
    let mut writer_stream = stream.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut urandom = fs::File::open("/dev/urandom").unwrap();
        let mut hasher = Sha256Pipe::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut sent = 0;
        while sent < TRANSFER {
            let n = buf.len().min(TRANSFER - sent);
            urandom.read_exact(&mut buf[..n]).unwrap();
            hasher.update(&buf[..n]);
            writer_stream
                .write_all(&buf[..n])
                .expect("writing to the guest");
            sent += n;
        }
        writer_stream.shutdown(Shutdown::Write).unwrap();
        hasher.finish()
    });
    let mut reader = stream;
    reader
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let mut hasher = Sha256Pipe::new();
    let mut received = 0usize;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(n) => n,
            Err(e) => panic!(
                "reading the echo after {received} bytes: {e}; console:\n{}",
                console_tail(&console)
            ),
        };
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        received += n;
    }
    let elapsed = start.elapsed();
    let sent_hash = writer.join().unwrap();
    assert_eq!(received, TRANSFER, "echo length");
    assert_eq!(hasher.finish(), sent_hash, "echo content differs");
    println!(
        "CPU during transfer: qemu {:.1}s; this process by thread: {:?}",
        cpu_seconds(&qemu_stat) - qemu_cpu_before,
        thread_cpu()
    );
    let mib_s = (2.0 * TRANSFER as f64 / (1024.0 * 1024.0)) / elapsed.as_secs_f64();
    println!(
        "echoed 100 MiB each way in {elapsed:?}: {mib_s:.1} MiB/s total ({:.1} MiB/s per direction)",
        mib_s / 2.0
    );

    // A port without a listener: the device closes our socket, no OK line.
    let refused = hybrid_connect(&uds, 4444).expect("hybrid connect to 4444");
    assert!(
        refused.is_none(),
        "connect to a closed port got {refused:?}"
    );

    let greeting = greeter.join().unwrap();
    assert_eq!(greeting.as_deref(), Some("hello from guest\n"));

    // Many concurrent connections, each with its own small echo.
    let mut workers = Vec::new();
    for i in 0..8u8 {
        let uds = uds.clone();
        workers.push(std::thread::spawn(move || {
            let (mut s, _) = hybrid_connect(&uds, 1024).unwrap().expect("connect");
            let msg = vec![i; 100_000];
            s.write_all(&msg).unwrap();
            s.shutdown(Shutdown::Write).unwrap();
            let mut back = Vec::new();
            s.read_to_end(&mut back).unwrap();
            assert_eq!(back, msg);
        }));
    }
    for w in workers {
        w.join().unwrap();
    }

    // Idle connections must not make the device spin.
    let (idle, _) = hybrid_connect(&uds, 1024).unwrap().expect("connect");
    let worker_cpu = || {
        thread_cpu()
            .into_iter()
            .filter(|(n, _)| n == "vring_worker")
            .map(|(_, s)| s)
            .sum::<f64>()
    };
    let before = worker_cpu();
    std::thread::sleep(Duration::from_secs(2));
    let spent = worker_cpu() - before;
    assert!(spent < 0.2, "device worker used {spent}s CPU while idle");
    drop(idle);

    // Ask the guest to reboot: QEMU exits and the backend sees the VMM disconnect.
    let _ = hybrid_connect(&uds, 1025);
    assert!(
        qemu.wait_exit(Duration::from_secs(30)),
        "QEMU did not exit; console:\n{}",
        console_tail(&console)
    );
    handle.wait().expect("backend outcome after VMM exit");
    assert!(!uds.exists(), "hybrid socket left behind");
    assert!(!vhost_sock.exists(), "vhost-user socket left behind");
    println!("guest console:\n{}", console_tail(&console));
}
