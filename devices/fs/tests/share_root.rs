//! The vhost-user back end with `Jail::share_root`: its threads' root holds the share (and
//! the process's fd directory) and their mount namespace nothing else, yet a mount attached inside the (shared) share
//! afterwards, in the caller's namespace, reaches them, and so does its removal. Checked from
//! outside through `/proc/self/task/<tid>/{root,mountinfo,ns/mnt}`, what the kernel resolves
//! for that thread.
//!
//! Needs root (mount namespaces), as `rootcell-test-support` says.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rootcell_fs::{serve_vhost_user_confined, FsConfig, Jail};

fn sys(what: &str, rc: libc::c_int) {
    assert!(rc == 0, "{what}: {}", std::io::Error::last_os_error());
}

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).unwrap()
}

fn mount(src: Option<&str>, dst: &Path, fstype: Option<&str>, flags: libc::c_ulong) {
    let src = src.map(|s| CString::new(s).unwrap());
    let fstype = fstype.map(|s| CString::new(s).unwrap());
    // SAFETY: mount(2) with NUL-terminated strings or null.
    let rc = unsafe {
        libc::mount(
            src.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            c(dst).as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            std::ptr::null(),
        )
    };
    sys(&format!("mount on {}", dst.display()), rc);
}

fn umount(dst: &Path) {
    // SAFETY: umount2(2) with a NUL-terminated path.
    sys("umount", unsafe {
        libc::umount2(c(dst).as_ptr(), libc::MNT_DETACH)
    });
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// The tid of this process's thread named `comm`.
fn thread_named(comm: &str) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        for e in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let name = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            if name.trim_end() == comm {
                return e.file_name().to_str().unwrap().parse().unwrap();
            }
        }
        assert!(Instant::now() < deadline, "no thread named {comm}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Mount points of thread `tid`'s namespace, as seen from its root, sorted.
fn mount_points(tid: u32) -> Vec<String> {
    let mut points: Vec<String> =
        std::fs::read_to_string(format!("/proc/self/task/{tid}/mountinfo"))
            .unwrap()
            .lines()
            .map(|l| l.split(' ').nth(4).unwrap().to_owned())
            .collect();
    points.sort();
    points
}

/// Polls `cond` for up to 5 s.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn back_end_threads_see_only_the_share_and_later_attachments() {
    if !rootcell_test_support::require_root("back_end_threads_see_only_the_share") {
        return;
    }
    // A thread of its own with a private namespace, laid out like a sandbox's: the share a
    // tmpfs, shared, beside a canary it must not see.
    std::thread::spawn(|| {
        // SAFETY: unshare(2) of this thread's fs context and mount namespace.
        sys("unshare", unsafe {
            libc::unshare(libc::CLONE_FS | libc::CLONE_NEWNS)
        });
        mount(None, Path::new("/"), None, libc::MS_REC | libc::MS_PRIVATE);
        let tmp = tempfile::tempdir().unwrap();
        let share: PathBuf = tmp.path().join("share");
        std::fs::create_dir(&share).unwrap();
        std::fs::write(tmp.path().join("canary"), b"outside").unwrap();
        mount(Some("tmpfs"), &share, Some("tmpfs"), 0);
        std::fs::write(share.join("hello"), b"inside").unwrap();
        std::fs::create_dir_all(share.join(".rootcell/c")).unwrap();
        mount(None, &share, None, libc::MS_REC | libc::MS_SHARED);
        let my_ns = std::fs::read_link("/proc/thread-self/ns/mnt").unwrap();

        let socket = tmp.path().join("fs.sock");
        // What the namespace costs at start: the same back end started without it first.
        let plain = Instant::now();
        let h = rootcell_fs::serve_vhost_user(
            &tmp.path().join("plain.sock"),
            FsConfig {
                shared_dir: share.clone(),
                read_only: false,
            },
        )
        .expect("plain back end starts");
        let plain = plain.elapsed();
        h.stop();
        h.wait().expect("plain back end ends");
        let started = Instant::now();
        let handle = serve_vhost_user_confined(
            &socket,
            FsConfig {
                shared_dir: share.clone(),
                read_only: false,
            },
            Jail {
                share_root: true,
                own_fd_table: true,
                relay: Vec::new(),
                confine: None,
            },
        )
        .expect("back end starts");
        eprintln!(
            "start: {:?} with the share root, {plain:?} without",
            started.elapsed()
        );
        let tid = thread_named("rootcell-fs");
        let root = PathBuf::from(format!("/proc/self/task/{tid}/root"));

        // Its root holds the share and the process's fd directory (the passthrough's xattr
        // calls name `/proc/self/fd/<fd>`), nothing of the host; `..` stays there.
        let root_names: BTreeSet<String> = ["share", "proc"].map(String::from).into();
        assert_eq!(names(&root), root_names);
        assert_eq!(names(&root.join("..")), root_names);
        assert_eq!(names(&root.join("proc")), ["self".to_string()].into());
        assert_eq!(
            names(&root.join("proc/self")),
            ["fd", "mountinfo"].map(String::from).into()
        );
        let share_names: BTreeSet<String> = ["hello", ".rootcell"].map(String::from).into();
        assert_eq!(names(&root.join("share")), share_names);
        assert_eq!(std::fs::read(root.join("share/hello")).unwrap(), b"inside");
        assert!(
            std::fs::write(root.join("probe"), b"x").is_err(),
            "the back end's root is writable"
        );
        // Its own namespace, holding just those.
        let its_ns = std::fs::read_link(format!("/proc/self/task/{tid}/ns/mnt")).unwrap();
        assert_ne!(its_ns, my_ns, "back end has a mount namespace of its own");
        let base = ["/", "/proc/self/fd", "/proc/self/mountinfo", "/share"];
        assert_eq!(mount_points(tid), base);

        // A mount attached in the share later (as a container joining the VM is) arrives.
        let late = share.join(".rootcell/c/x");
        std::fs::create_dir(&late).unwrap();
        mount(Some("tmpfs"), &late, Some("tmpfs"), 0);
        std::fs::write(late.join("marker"), b"late").unwrap();
        eventually("late mount reaches the back end", || {
            std::fs::read(root.join("share/.rootcell/c/x/marker")).is_ok_and(|b| b == b"late")
        });
        let with_late = mount_points(tid);
        let mut want: Vec<String> = base.iter().map(|s| s.to_string()).collect();
        want.push("/share/.rootcell/c/x".into());
        want.sort();
        assert_eq!(with_late, want);
        // Its removal too.
        umount(&late);
        eventually("late unmount reaches the back end", || {
            !root.join("share/.rootcell/c/x/marker").exists()
        });
        assert_eq!(mount_points(tid), base);
        // Nothing of the back end's namespace came back to ours.
        let ours = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
        assert_eq!(
            ours.lines()
                .filter(|l| l.split(' ').nth(4) == share.to_str())
                .count(),
            1,
            "the back end's bind of the share stayed in its namespace"
        );

        handle.stop();
        handle.wait().expect("back end ends cleanly");
        assert!(!socket.exists(), "socket file removed");
        umount(&share);
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e));
}

/// FUSE requests served from the pivoted root (the device opened between the two steps, as
/// the back end does; FUSE_INIT, which opens the root again, after the pivot): lookups and
/// reads reach the share's files, `..` from the root stays in it.
#[test]
fn requests_are_served_from_the_share_root() {
    if !rootcell_test_support::require_root("requests_are_served_from_the_share_root") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let share = tmp.path().join("share");
    std::fs::create_dir_all(share.join("dir")).unwrap();
    std::fs::write(share.join("dir/hello"), b"inside").unwrap();
    std::fs::write(tmp.path().join("canary"), b"outside").unwrap();
    let hello_path = c(&share.join("dir/hello"));
    // SAFETY: setxattr(2) with NUL-terminated strings and a 5-byte value.
    sys("setxattr", unsafe {
        libc::setxattr(
            hello_path.as_ptr(),
            c"trusted.rc".as_ptr(),
            b"value".as_ptr().cast(),
            5,
            0,
        )
    });
    std::thread::spawn(move || {
        rootcell_fs::share_root::enter(&share).unwrap();
        let device = rootcell_fs::FsDevice::new(&FsConfig {
            shared_dir: rootcell_fs::share_root::SHARE_PATH.into(),
            read_only: false,
        })
        .unwrap();
        rootcell_fs::share_root::pivot().unwrap();
        let mut client = rootcell_fs::test_driver::Client::with_device(device).expect("FUSE_INIT");
        let dir = client.lookup(1, b"dir").expect("lookup dir");
        let hello = client.lookup(dir.nodeid, b"hello").expect("lookup hello");
        assert_eq!(hello.attr.size, 6);
        // Extended attributes: the passthrough reaches them by the path /proc/self/fd/<fd>.
        const GETXATTR: u32 = 22;
        let mut arg = 64u32.to_ne_bytes().to_vec();
        arg.extend(0u32.to_ne_bytes());
        arg.extend(b"trusted.rc\0");
        assert_eq!(
            client.call(GETXATTR, hello.nodeid, &arg),
            rootcell_fs::test_driver::Reply::Fuse(0, b"value".to_vec()),
            "GETXATTR from the share root"
        );
        const SETXATTR: u32 = 21;
        let mut arg = 3u32.to_ne_bytes().to_vec();
        arg.extend(0u32.to_ne_bytes());
        arg.extend(b"trusted.new\0new");
        assert_eq!(
            client.call(SETXATTR, hello.nodeid, &arg),
            rootcell_fs::test_driver::Reply::Fuse(0, Vec::new()),
            "SETXATTR from the share root"
        );
        let mut arg = 64u32.to_ne_bytes().to_vec();
        arg.extend(0u32.to_ne_bytes());
        arg.extend(b"trusted.new\0");
        assert_eq!(
            client.call(GETXATTR, hello.nodeid, &arg),
            rootcell_fs::test_driver::Reply::Fuse(0, b"new".to_vec()),
        );
        let up = client.lookup(1, b"..").expect("lookup ..");
        assert_eq!(
            client.lookup(up.nodeid, b"canary").map(|e| e.nodeid),
            Err(libc::ENOENT)
        );
        assert!(client.lookup(up.nodeid, b"dir").is_ok());
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e));
}
