//! End to end: a real Linux guest under QEMU mounts the share served by `serve_vhost_user`.
//!
//! Needs QEMU, a guest kernel and root, found and required as `rootcell-test-support` says
//! (missing: a failure under scripts/test.sh, SKIPPED in a bare `cargo test`).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rootcell_fs::{serve_vhost_user, FsConfig};

/// Bound on one guest run (boot, test script, reboot) under TCG.
const GUEST_TIMEOUT: Duration = Duration::from_secs(180);
/// One guest at a time: the machine has two cores shared by every test.
static QEMU_LOCK: Mutex<()> = Mutex::new(());

/// The guest's /init: exercises the share and reports on the serial console.
const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev 2>/dev/null
[ -c /dev/console ] || exec >/dev/ttyS0 2>&1
echo "RC-BEGIN"
if mount -t virtiofs rootcell /mnt; then echo "RC-MOUNT ok"; else echo "RC-MOUNT fail"; fi
echo "RC-READ $(cat /mnt/from-host.txt)"
if echo "written by the guest" > /mnt/from-guest.txt && chown 4242:4242 /mnt/from-guest.txt; then
  echo "RC-WRITE ok"
else
  echo "RC-WRITE fail"
fi
echo "RC-OWNER $(stat -c %u:%g /mnt/from-guest.txt 2>/dev/null)"
if mkdir /mnt/guest-dir 2>/dev/null; then echo "RC-MKDIR ok"; else echo "RC-MKDIR fail"; fi
# Escape attempts: none of these may show the host file outside the share.
for p in /mnt/../outside/secret.txt /mnt/../../outside/secret.txt /mnt/rel-link /mnt/abs-link \
         /mnt/dir-link/secret.txt /mnt/../../etc/shadow; do
  echo "RC-ESCAPE $p: $(cat $p 2>&1 | head -c 200)"
done
echo "RC-LS $(ls /mnt | tr '\n' ' ')"
echo "RC-BIND-READ $(cat /mnt/bind/inside-bind.txt 2>&1)"
if echo "guest in bind" > /mnt/bind/guest-bind.txt; then echo "RC-BIND-WRITE ok"; else echo "RC-BIND-WRITE fail"; fi
umount /mnt
echo "RC-END"
reboot -f
"#;

/// Kills QEMU on every path out of the test.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Packs a busybox initramfs with [`INIT_SCRIPT`] as /init into `out` (cpio newc, gzip).
fn build_initramfs(work: &Path, out: &Path) {
    let stage = work.join("initramfs");
    for dir in ["bin", "dev", "proc", "sys", "mnt", "outside"] {
        std::fs::create_dir_all(stage.join(dir)).unwrap();
    }
    // A decoy at the guest path the relative symlink points to: reading it proves symlinks are
    // resolved in the guest's view, not on the host.
    std::fs::write(stage.join("outside/secret.txt"), "GUEST-DECOY\n").unwrap();
    std::fs::copy("/bin/busybox", stage.join("bin/busybox"))
        .expect("busybox-static at /bin/busybox");
    let init = stage.join("init");
    std::fs::write(&init, INIT_SCRIPT).unwrap();
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // The kernel opens /dev/console for init before anything is mounted.
    let status = Command::new("mknod")
        .args(["-m", "600"])
        .arg(stage.join("dev/console"))
        .args(["c", "5", "1"])
        .status()
        .unwrap();
    assert!(status.success(), "mknod dev/console");
    let script = format!(
        "cd '{}' && find . | cpio -o -H newc -R 0:0 --quiet | gzip -1 > '{}'",
        stage.display(),
        out.display()
    );
    let status = Command::new("sh").arg("-c").arg(script).status().unwrap();
    assert!(status.success(), "packing the initramfs");
}

/// Host-side layout: the share plus a secret next to it that the guest must never read, and a
/// directory bind-mounted into the share (as the runtime does for OCI bind mounts).
struct HostDirs {
    // Field order is drop order: unmount before the temporary directory is removed.
    _bind: BindMount,
    _root: tempfile::TempDir,
    share: PathBuf,
    work: PathBuf,
    bind_src: PathBuf,
}

/// A bind mount that is detached on drop, so no test path leaves a mount behind.
struct BindMount(PathBuf);

impl BindMount {
    fn new(src: &Path, target: &Path) -> Self {
        let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        let (src_c, target_c) = (c(src), c(target));
        // SAFETY: valid NUL-terminated paths; a plain MS_BIND mount with no data.
        let rc = unsafe {
            libc::mount(
                src_c.as_ptr(),
                target_c.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "bind mount: {}", std::io::Error::last_os_error());
        BindMount(target.to_owned())
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        let target = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: unmounting the mount this guard made.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

fn host_dirs() -> HostDirs {
    let root = tempfile::tempdir().unwrap();
    let share = root.path().join("share");
    let outside = root.path().join("outside");
    let work = root.path().join("work");
    for dir in [&share, &outside, &work] {
        std::fs::create_dir(dir).unwrap();
    }
    std::fs::write(outside.join("secret.txt"), "HOST-SECRET-DO-NOT-LEAK\n").unwrap();
    std::fs::write(share.join("from-host.txt"), "hello from the host\n").unwrap();
    std::os::unix::fs::symlink("../outside/secret.txt", share.join("rel-link")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret.txt"), share.join("abs-link")).unwrap();
    std::os::unix::fs::symlink(&outside, share.join("dir-link")).unwrap();
    let bind_src = root.path().join("bind-src");
    std::fs::create_dir(&bind_src).unwrap();
    std::fs::write(bind_src.join("inside-bind.txt"), "from a bind mount\n").unwrap();
    std::fs::create_dir(share.join("bind")).unwrap();
    let bind = BindMount::new(&bind_src, &share.join("bind"));
    HostDirs {
        _bind: bind,
        _root: root,
        share,
        work,
        bind_src,
    }
}

/// Boots the guest against a backend for `dirs.share`; returns (console text, wall time).
fn boot_guest(dirs: &HostDirs, read_only: bool) -> Option<(String, Duration)> {
    let test = "qemu_virtiofs";
    let qemu = rootcell_test_support::require_qemu(test)?;
    let kernel = rootcell_test_support::require_bzimage(test)?;
    let _one_at_a_time = QEMU_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let initrd = dirs.work.join("initrd.cpio.gz");
    build_initramfs(&dirs.work, &initrd);
    let socket = dirs.work.join("fs.vhost.sock");
    let console = dirs.work.join("console.log");
    let backend = serve_vhost_user(
        &socket,
        FsConfig {
            shared_dir: dirs.share.clone(),
            read_only,
        },
    )
    .unwrap();

    let start = Instant::now();
    let child = Command::new(qemu)
        .args([
            "-M",
            "microvm,acpi=off,x-option-roms=off,rtc=off,memory-backend=mem",
        ])
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "256M"])
        .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 reboot=t panic=-1 quiet"])
        .arg("-chardev")
        .arg(format!("socket,id=fs,path={}", socket.display()))
        .args(["-device", "vhost-user-fs-device,chardev=fs,tag=rootcell"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting qemu");
    let mut qemu = KillOnDrop(child);
    let status = loop {
        if let Some(status) = qemu.0.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > GUEST_TIMEOUT {
            let text = std::fs::read_to_string(&console).unwrap_or_default();
            panic!("guest did not finish within {GUEST_TIMEOUT:?}; console:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let elapsed = start.elapsed();
    let mut stderr = String::new();
    if let Some(mut pipe) = qemu.0.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(
        status.success(),
        "qemu failed: {status}\nstderr: {stderr}\nconsole:\n{text}"
    );

    // QEMU is gone, so the backend sees the disconnect and finishes by itself.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(backend.wait());
    });
    let outcome = done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("backend did not finish after QEMU exited");
    assert!(outcome.is_ok(), "backend outcome: {outcome:?}");
    assert!(
        !socket.exists(),
        "the socket file is removed when the backend ends"
    );
    eprintln!("guest run (read_only={read_only}) took {elapsed:?} wall clock; console:\n{text}");
    Some((text, elapsed))
}

fn line_of<'a>(console: &'a str, tag: &str) -> &'a str {
    console
        .lines()
        .find(|l| l.starts_with(tag))
        .unwrap_or_else(|| panic!("no {tag} line on the console:\n{console}"))
        .trim_end()
}

fn assert_no_escape(console: &str) {
    assert!(
        !console.contains("HOST-SECRET"),
        "guest read a host file outside the share:\n{console}"
    );
    let escapes = console
        .lines()
        .filter(|l| l.starts_with("RC-ESCAPE"))
        .count();
    assert_eq!(escapes, 6, "all escape attempts ran:\n{console}");
}

#[test]
fn guest_reads_writes_and_chowns_through_virtiofs() {
    if !rootcell_test_support::require_root("guest_reads_writes_and_chowns_through_virtiofs") {
        return;
    }
    let dirs = host_dirs();
    let Some((console, _)) = boot_guest(&dirs, false) else {
        return;
    };
    assert!(console.contains("RC-END"), "script finished:\n{console}");
    assert_eq!(line_of(&console, "RC-MOUNT"), "RC-MOUNT ok");
    assert_eq!(line_of(&console, "RC-READ"), "RC-READ hello from the host");
    assert_eq!(line_of(&console, "RC-WRITE"), "RC-WRITE ok");
    assert_eq!(line_of(&console, "RC-OWNER"), "RC-OWNER 4242:4242");
    assert_eq!(line_of(&console, "RC-MKDIR"), "RC-MKDIR ok");
    assert_no_escape(&console);

    let written = dirs.share.join("from-guest.txt");
    assert_eq!(
        std::fs::read_to_string(&written).unwrap(),
        "written by the guest\n"
    );
    let meta = std::fs::metadata(&written).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (4242, 4242),
        "guest chown shows on the host"
    );
    assert!(dirs.share.join("guest-dir").is_dir());
    assert_eq!(line_of(&console, "RC-BIND-WRITE"), "RC-BIND-WRITE ok");
    let in_bind = std::fs::read_to_string(dirs.bind_src.join("guest-bind.txt")).unwrap();
    assert_eq!(
        in_bind, "guest in bind\n",
        "writes under a bind mount reach its source"
    );
}

#[test]
fn read_only_share_refuses_guest_writes() {
    if !rootcell_test_support::require_root("read_only_share_refuses_guest_writes") {
        return;
    }
    let dirs = host_dirs();
    let Some((console, _)) = boot_guest(&dirs, true) else {
        return;
    };
    assert!(console.contains("RC-END"), "script finished:\n{console}");
    assert_eq!(line_of(&console, "RC-MOUNT"), "RC-MOUNT ok");
    assert_eq!(line_of(&console, "RC-READ"), "RC-READ hello from the host");
    assert_eq!(line_of(&console, "RC-WRITE"), "RC-WRITE fail");
    assert_eq!(line_of(&console, "RC-MKDIR"), "RC-MKDIR fail");
    assert!(
        console.contains("Read-only file system"),
        "the guest sees EROFS:\n{console}"
    );
    assert_no_escape(&console);
    assert!(!dirs.share.join("from-guest.txt").exists());
    assert!(!dirs.share.join("guest-dir").exists());
    assert_eq!(line_of(&console, "RC-BIND-WRITE"), "RC-BIND-WRITE fail");
    assert!(!dirs.bind_src.join("guest-bind.txt").exists());
}
