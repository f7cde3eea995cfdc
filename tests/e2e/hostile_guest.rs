//! Root in a real guest tries to reach host files outside the share: `..` from the share's
//! root and from a volume's root (with the share mounted again by hand, as root in the guest
//! may), symlinks in the rootfs pointing at host paths (absolute and relative, made on the host
//! and in the guest), a device node opened through the share, a search of the whole share for
//! the canary's text. Two canaries sit on the host next to what is shared: one in the bundle
//! beside `rootfs`, one beside a volume's source directory. Neither may be read (content never
//! in the output, atime unchanged), written or listed.

use rootcell_e2e::*;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

const SECRET: &str = "host-canary-5c1b7e0d: a guest must never see this";

/// A canary file at `path`, its atime set before its mtime so that under `relatime` (how the
/// host's file systems are mounted) any read moves it. Returns (atime, mtime, ctime).
fn plant(path: &Path) -> (i64, i64, i64) {
    std::fs::write(path, SECRET).unwrap();
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let times = [
        libc::timespec {
            tv_sec: 946_684_800, // 2000-01-01
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
    ];
    // SAFETY: utimensat with a valid path and two timespecs.
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) };
    assert_eq!(rc, 0);
    stamp(path)
}

fn stamp(path: &Path) -> (i64, i64, i64) {
    let m = std::fs::metadata(path).unwrap();
    (m.atime(), m.mtime(), m.ctime())
}

/// What root in the guest tries; every attempt prints what it got (the test looks for the
/// canary's text in all of it). ESC_* are filled in by the test.
const SCRIPT: &str = r#"
cat_all() { for p in "$@"; do echo "TRY $p"; cat "$p" 2>&1 | head -c 300; echo; done; }
mkdir -p /mnt/share
if mount -t virtiofs rootcell /mnt/share; then echo MOUNTED; else echo "NOT MOUNTED"; fi
echo LS-BEGIN; ls -a /mnt/share /mnt/share/.. /mnt/share/../.. /mnt/share/rootfs/.. 2>&1; echo LS-END
cat_all /mnt/share/../canary /mnt/share/rootfs/../canary /mnt/share/../../canary \
    /mnt/share/../BUNDLE_NAME/canary /mnt/share/rootfs/../../BUNDLE_NAME/canary \
    /mnt/share/VOL_ENTRY/../canary /mnt/share/VOL_ENTRY/../../canary /data/../canary \
    /abs-escape /rel-escape /dir-escape/canary
echo LS-BEGIN; ls -a /mnt/share/VOL_ENTRY/.. /data/.. /dir-escape/ 2>&1; echo LS-END
# Links made in the guest, through the share.
ln -s ESC_ABS /mnt/share/rootfs/guest-abs && ln -s ESC_REL /mnt/share/rootfs/guest-rel
cat_all /guest-abs /guest-rel /mnt/share/rootfs/guest-abs /mnt/share/rootfs/guest-rel
# A device node in the rootfs, opened through the share: the guest's /dev/zero, not the host's.
mknod /mnt/share/rootfs/zero-node c 1 5 && head -c 4 /mnt/share/rootfs/zero-node | od -An -c
# The whole share, every file: the canary's text is nowhere in it.
if grep -r -l "host-canary-5c1b7e0d" /mnt/share 2>/dev/null; then echo "FOUND IN SHARE"; fi
echo SEARCHED
"#;

#[test]
fn root_in_the_guest_cannot_reach_host_files_beside_the_share() {
    let rt = Runtime::new();
    let b = Bundle::new(&["sh", "-c", "true"]);
    let bundle_canary = b.path().join("canary");
    let vol_parent = tempfile::Builder::new()
        .prefix("rootcell-vol-")
        .tempdir()
        .unwrap();
    let vol = vol_parent.path().join("vol");
    std::fs::create_dir(&vol).unwrap();
    std::fs::write(vol.join("file"), "volume file\n").unwrap();
    let vol_canary = vol_parent.path().join("canary");
    // Host-made symlinks in the rootfs: to the canary's absolute path, a relative climb of
    // more `..` than the rootfs is deep, and a directory link to the bundle.
    let rootfs = b.rootfs();
    std::os::unix::fs::symlink(&bundle_canary, rootfs.join("abs-escape")).unwrap();
    let depth = rootfs.components().count();
    let climb = "../".repeat(depth + 2);
    let rel = format!(
        "{climb}{}",
        bundle_canary.strip_prefix("/").unwrap().display()
    );
    std::os::unix::fs::symlink(&rel, rootfs.join("rel-escape")).unwrap();
    std::os::unix::fs::symlink(b.path(), rootfs.join("dir-escape")).unwrap();

    let vol_entry = std::fs::canonicalize(&vol).unwrap();
    let vol_entry = vol_entry
        .strip_prefix("/")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let bundle_name = b.path().file_name().unwrap().to_str().unwrap().to_string();
    let script = SCRIPT
        .replace("VOL_ENTRY", &vol_entry)
        .replace("BUNDLE_NAME", &bundle_name)
        .replace("ESC_ABS", vol_canary.to_str().unwrap())
        .replace(
            "ESC_REL",
            &format!("{climb}{}", vol_canary.strip_prefix("/").unwrap().display()),
        );
    let b = b.edit(|s| {
        s["process"]["args"] = serde_json::json!(["sh", "-c", script]);
        s["mounts"].as_array_mut().unwrap().push(serde_json::json!({
            "destination": "/data", "type": "bind", "source": vol, "options": ["rbind", "rw"]
        }));
    });
    // Planted last: the bundle's own setup above must not count as a touch.
    let bundle_before = plant(&bundle_canary);
    let vol_before = plant(&vol_canary);

    let id = unique_id("hostile");
    let o = rt.run(&[
        "--guest-privileged",
        "run",
        "--bundle",
        b.path().to_str().unwrap(),
        &id,
    ]);
    let out = text(&o.stdout) + &text(&o.stderr);
    eprintln!("what root in the guest tried and got:\n{out}");
    assert_eq!(code(&o), 0, "{out}");
    assert!(
        out.contains("MOUNTED\n"),
        "root could not mount the share again: {out}"
    );
    assert!(
        out.contains("SEARCHED"),
        "the script did not run to its end: {out}"
    );
    assert!(out.contains("TRY /abs-escape"), "{out}");
    assert!(
        !out.contains(SECRET),
        "the guest read a host canary:\n{out}"
    );
    assert!(!out.contains("FOUND IN SHARE"), "{out}");
    // No directory listing shows a canary's name (nor the bundle's config.json).
    for listing in out.split("LS-BEGIN").skip(1) {
        let listing = listing.split("LS-END").next().unwrap();
        assert!(
            !listing.contains("canary"),
            "a listing showed a canary:\n{listing}"
        );
        assert!(
            !listing.contains("config.json"),
            "a listing showed the bundle:\n{listing}"
        );
    }
    // The guest's own /dev/zero answered through the node (zeros), and nothing else broke.
    assert!(out.contains(r"\0  \0  \0  \0"), "device node: {out}");
    assert_eq!(
        stamp(&bundle_canary),
        bundle_before,
        "the bundle's canary was touched"
    );
    assert_eq!(
        stamp(&vol_canary),
        vol_before,
        "the volume's canary was touched"
    );
    // Nothing the guest made landed beside the share on the host.
    let mut beside: Vec<_> = std::fs::read_dir(vol_parent.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    beside.sort();
    assert_eq!(beside, ["canary", "vol"]);
    assert_no_leftovers(&rt, &id);
}
