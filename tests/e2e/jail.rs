//! A jailed VMM (issue 16): for a running container on QEMU, the QEMU process runs as an
//! unprivileged uid/gid from rootcell's reserved range, with no capabilities and no way to
//! regain them, under its own seccomp filter, in a mount namespace whose root is not the
//! host's and holds only what it needs, and still in the container's host cgroup; the
//! virtio-fs and vsock back-end threads run under seccomp with the capabilities designed for
//! them; the container works. Real guest. The built-in VMM's threads get the same checks
//! where it runs (hardware KVM: the nested lane's L1).

use rootcell_e2e::*;
use std::collections::BTreeSet;
use std::time::Duration;

/// rootcell's reserved range for jailed VMMs (runtime/src/jail/mod.rs).
const UID_BASE: u64 = 0x7e00_0000;
const UID_RANGE: u64 = 1 << 22;

/// The children of `pid` whose command name starts with `prefix`.
fn children_named(pid: i32, prefix: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let comm = &stat[stat.find('(').unwrap() + 1..close];
        let ppid: i32 = stat[close + 2..]
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if ppid == pid && comm.starts_with(prefix) {
            out.push(p);
        }
    }
    out
}

fn status_field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in status:\n{status}"))
        .trim()
        .to_string()
}

/// fd number → (what it names, its metadata), for the fd directory `dir`.
fn fd_table(dir: &std::path::Path) -> std::collections::BTreeMap<u32, (String, std::fs::Metadata)> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_str()?.parse().ok()?;
            let t = std::fs::read_link(e.path()).ok()?;
            let meta = std::fs::metadata(e.path()).ok()?;
            Some((n, (t.to_string_lossy().into_owned(), meta)))
        })
        .collect()
}

/// What each fd of a table names.
fn targets(
    table: &std::collections::BTreeMap<u32, (String, std::fs::Metadata)>,
) -> std::collections::BTreeMap<u32, String> {
    table.iter().map(|(n, (t, _))| (*n, t.clone())).collect()
}

/// Asserts that fd directories `a` and `b` list the same table (a few tries: a request the
/// guest makes meanwhile may open or close an fd between the two readings).
fn assert_same_table(a: &std::path::Path, b: &std::path::Path, what: &str) {
    let mut last = (Default::default(), Default::default());
    for _ in 0..10 {
        last = (targets(&fd_table(a)), targets(&fd_table(b)));
        if last.0 == last.1 {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} differ:\n{:?}\n{:?}", last.0, last.1);
}

/// The ids of a `Uid:` or `Gid:` line of /proc/PID/status (real, effective, saved, fs).
fn status_ids(status: &str, name: &str) -> Vec<String> {
    status_field(status, name)
        .split_whitespace()
        .map(String::from)
        .collect()
}

fn listing(dir: &str) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// The mount points of a thread's mount namespace (`/proc/.../mountinfo` under `dir`), with
/// that file's text for messages.
fn mount_points(dir: &std::path::Path) -> (Vec<String>, String) {
    let mountinfo = std::fs::read_to_string(dir.join("mountinfo")).unwrap();
    let points = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(String::from)
        .collect();
    (points, mountinfo)
}

#[test]
fn qemu_runs_unprivileged_without_capabilities_in_its_own_root() {
    let rt = Runtime::new().env("ROOTCELL_HYPERVISOR", "qemu");
    let id = unique_id("jail");
    let cgroup = format!("/{id}");
    let b = Bundle::new(&["sleep", "120"]).edit(|s| {
        s["linux"]["cgroupsPath"] = serde_json::json!(cgroup);
    });
    let (o, _, _) = rt.create(&b, &id);
    assert_eq!(code(&o), 0, "create: {}", text(&o.stderr));
    let o = rt.run(&["start", &id]);
    assert_eq!(code(&o), 0, "start: {}", text(&o.stderr));
    let sandbox = rt.wait_status(&id, "running", Duration::from_secs(60))["pid"]
        .as_i64()
        .unwrap() as i32;
    let qemus = children_named(sandbox, "qemu");
    assert_eq!(
        qemus.len(),
        1,
        "QEMU children of sandbox {sandbox}: {qemus:?}"
    );
    let q = qemus[0];
    let status = std::fs::read_to_string(format!("/proc/{q}/status")).unwrap();

    // An identity of its own: uid = gid = base + pid, every one of real/effective/saved/fs.
    let want = (UID_BASE + q as u64).to_string();
    for field in ["Uid", "Gid"] {
        let ids: Vec<String> = status_field(&status, field)
            .split_whitespace()
            .map(String::from)
            .collect();
        assert_eq!(ids, vec![want.clone(); 4], "{field}:\n{status}");
    }
    let id_num: u64 = want.parse().unwrap();
    assert!((UID_BASE..UID_BASE + UID_RANGE).contains(&id_num));
    assert_eq!(status_field(&status, "Groups"), "", "{status}");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            status_field(&status, caps),
            "0000000000000000",
            "{caps}:\n{status}"
        );
    }
    assert_eq!(status_field(&status, "NoNewPrivs"), "1", "{status}");
    assert_eq!(status_field(&status, "Seccomp"), "2", "{status}");

    // Its root is not the host's: other namespaces, and only what QEMU needs is there.
    for ns in ["mnt", "net", "ipc"] {
        let mine = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let its = std::fs::read_link(format!("/proc/{q}/ns/{ns}")).unwrap();
        assert_ne!(mine, its, "QEMU shares our {ns} namespace");
    }
    let root = format!("/proc/{q}/root");
    let top = listing(&root);
    assert_ne!(top, listing("/"), "QEMU's root lists like the host's");
    for absent in ["root", "home", "proc", "sys", "run", "tmp", "var", "work"] {
        assert!(!top.contains(absent), "/{absent} in QEMU's root: {top:?}");
    }
    assert_eq!(
        listing(&format!("{root}/vm")),
        BTreeSet::from(["kernel".to_string(), "initrd".to_string()])
    );
    assert_eq!(
        listing(&format!("{root}/etc")),
        BTreeSet::from(["ld.so.cache".to_string()])
    );
    // Read-only: even root cannot write there through QEMU's view.
    let probe = std::fs::write(format!("{root}/probe"), b"x");
    assert!(probe.is_err(), "QEMU's root is writable");

    // Still in the container's host cgroup (memory is joined at once, cpu after create).
    let cgroups = std::fs::read_to_string(format!("/proc/{q}/cgroup")).unwrap();
    // A cgroup v2 host (the nested lane's L1) has the one unified line.
    let v2 = !cgroups.lines().any(|l| !l.starts_with("0::"));
    if v2 {
        assert!(
            cgroups.lines().any(|l| l == format!("0::{cgroup}")),
            "QEMU not in {cgroup}:\n{cgroups}"
        );
    }
    for controller in ["memory", "cpu"].into_iter().filter(|_| !v2) {
        assert!(
            cgroups.lines().any(|l| l
                .split(':')
                .nth(1)
                .is_some_and(|c| c.split(',').any(|c| c == controller))
                && l.ends_with(&cgroup)),
            "QEMU not in {cgroup} for {controller}:\n{cgroups}"
        );
    }

    // The device back ends, threads of the sandbox: every thread serving virtio-fs or vsock
    // runs under seccomp, virtio-fs with exactly the ownership capabilities, vsock with none;
    // the sandbox's other threads are not affected.
    let fs_caps = format!(
        "{:016x}",
        [0u32, 1, 2, 3, 4, 6, 7, 27, 31]
            .iter()
            .fold(0u64, |m, c| m | 1 << c)
    );
    let mut backends = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{sandbox}/task"))
        .unwrap()
        .flatten()
    {
        let dir = t.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let Ok(st) = std::fs::read_to_string(dir.join("status")) else {
            continue;
        };
        let (seccomp, eff, prm, bnd) = (
            status_field(&st, "Seccomp"),
            status_field(&st, "CapEff"),
            status_field(&st, "CapPrm"),
            status_field(&st, "CapBnd"),
        );
        let comm = comm.trim().to_string();
        match comm.as_str() {
            "rootcell-fs" | "rootcell-fs-vho" | "rootcell-fs-sto" | "vsock-vhost-use"
            | "rootcell-vsock" | "vring_worker" => {
                assert_eq!(seccomp, "2", "{comm}:\n{st}");
                assert_eq!(eff, prm, "{comm}:\n{st}");
                assert_eq!(eff, bnd, "{comm}:\n{st}");
                assert_eq!(status_field(&st, "NoNewPrivs"), "1", "{comm}");
                backends.push((comm, eff));
            }
            _ => assert_eq!(
                seccomp, "0",
                "the sandbox's {comm} thread is not a back end"
            ),
        }
    }
    backends.sort();
    // None of them runs as root: the fs threads share one unprivileged uid and gid of the
    // reserved range (base + the id of their serving thread, rootcell-fs), the vsock threads
    // another (base + vsock-vhost-user's); real, effective, saved and fs ids alike, no groups.
    let backend_ids = backend_thread_ids(sandbox);
    for (owner, want_caps) in [
        ("rootcell-fs", &fs_caps),
        ("vsock-vhost-use", &"0".repeat(16)),
    ] {
        let owner_tid = backend_ids
            .iter()
            .find(|t| t.comm == owner)
            .unwrap_or_else(|| panic!("no {owner} thread"))
            .tid;
        let want = (UID_BASE + owner_tid).to_string();
        let group: Vec<_> = backend_ids
            .iter()
            .filter(|t| &t.caps == want_caps)
            .collect();
        assert!(group.len() >= 2, "{owner}'s threads: {backend_ids:?}");
        for t in group {
            assert_eq!(t.uid, vec![want.clone(); 4], "{t:?}");
            assert_eq!(t.gid, vec![want.clone(); 4], "{t:?}");
            assert_eq!(t.groups, "", "{t:?}");
        }
    }
    let zero = "0".repeat(16);
    let mut want = vec![
        ("rootcell-fs".to_string(), fs_caps.clone()),
        ("rootcell-fs-vho".to_string(), fs_caps.clone()),
        ("rootcell-fs-sto".to_string(), fs_caps.clone()),
        ("rootcell-vsock".to_string(), zero.clone()),
        ("vring_worker".to_string(), zero.clone()),
        ("vring_worker".to_string(), fs_caps.clone()),
        ("vsock-vhost-use".to_string(), zero.clone()),
    ];
    want.sort();
    assert_eq!(backends, want, "back-end threads (name, CapEff)");

    // The virtio-fs threads serve from a mount namespace of their own whose root holds the
    // share and the process's fd directory (the passthrough's xattr calls name
    // /proc/self/fd/N), nothing of the host's; `..` stays there, and the only mounts are
    // those, all nodev.
    let sandbox_ns = std::fs::read_link(format!("/proc/{sandbox}/ns/mnt")).unwrap();
    let mut fs_threads = 0;
    for t in std::fs::read_dir(format!("/proc/{sandbox}/task"))
        .unwrap()
        .flatten()
    {
        let dir = t.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let st = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let is_fs = match comm.trim() {
            "rootcell-fs" | "rootcell-fs-vho" | "rootcell-fs-sto" => true,
            "vring_worker" => status_field(&st, "CapEff") == fs_caps,
            _ => false,
        };
        let is_vsock = match comm.trim() {
            "vsock-vhost-use" | "rootcell-vsock" => true,
            "vring_worker" => status_field(&st, "CapEff") == "0".repeat(16),
            _ => false,
        };
        let ns = std::fs::read_link(dir.join("ns/mnt")).unwrap();
        let root = dir.join("root");
        if is_vsock {
            // The vsock back end's root holds the path down to its socket directory (it
            // connects guest connections to `<uds>_<port>` there), read-only, and nothing else.
            assert_ne!(ns, sandbox_ns, "{comm} in the sandbox's mount namespace");
            let (points, mountinfo) = mount_points(&dir);
            assert_eq!(points.len(), 2, "{comm}'s mounts:\n{mountinfo}");
            let sockdir = points.iter().find(|p| p.as_str() != "/").unwrap();
            assert_eq!(listing(root.to_str().unwrap()).len(), 1, "{comm}'s root");
            let socks = listing(&format!("{}{sockdir}", root.display()));
            assert!(
                socks.iter().any(|s| s.starts_with("vsock")),
                "{comm}'s socket directory {sockdir} holds {socks:?}"
            );
            assert!(
                mountinfo.lines().all(|l| l
                    .split(' ')
                    .nth(5)
                    .is_some_and(|o| o.split(',').any(|o| o == "ro"))),
                "{comm}: a writable mount:\n{mountinfo}"
            );
            continue;
        }
        if !is_fs {
            assert_eq!(ns, sandbox_ns, "{comm} left the sandbox's mount namespace");
            continue;
        }
        fs_threads += 1;
        assert_ne!(
            ns, sandbox_ns,
            "{comm} serves from the sandbox's mount namespace"
        );
        let top = listing(root.to_str().unwrap());
        assert_eq!(
            top,
            BTreeSet::from(["share".to_string(), "proc".to_string()]),
            "{comm}'s root"
        );
        assert_eq!(
            listing(root.join("..").to_str().unwrap()),
            top,
            "{comm}: .."
        );
        assert_eq!(
            listing(root.join("proc").to_str().unwrap()),
            BTreeSet::from(["self".to_string()])
        );
        assert_eq!(
            listing(root.join("proc/self").to_str().unwrap()),
            BTreeSet::from(["fd".to_string(), "mountinfo".to_string()])
        );
        let share = listing(root.join("share").to_str().unwrap());
        assert!(share.contains("rootfs"), "{comm}'s share: {share:?}");
        assert_eq!(
            listing(root.join("share/rootfs").to_str().unwrap()),
            listing(b.rootfs().to_str().unwrap()),
            "{comm}: the share's rootfs is the bundle's"
        );
        let mountinfo = std::fs::read_to_string(dir.join("mountinfo")).unwrap();
        for l in mountinfo.lines() {
            let point = l.split(' ').nth(4).unwrap_or_default();
            assert!(
                ["/", "/proc/self/fd", "/proc/self/mountinfo", "/share"].contains(&point)
                    || point.starts_with("/share/"),
                "{comm} has a mount beside the share:\n{mountinfo}"
            );
            // Per-mount options (field 6): the share's binds are nodev.
            let opts = l.split(' ').nth(5).unwrap_or_default();
            assert!(
                opts.split(',').any(|o| o == "nodev"),
                "{comm}: not nodev: {l}"
            );
        }
    }
    assert_eq!(fs_threads, 4, "virtio-fs threads found");

    // A device node in the share opens nothing on the host: the back end's mounts are nodev.
    // (Made from the host side, as an image's /dev entries are; the guest never gets this
    // far, its own kernel opens device nodes locally.)
    let node = b.rootfs().join("hostnull");
    let made = std::process::Command::new("mknod")
        .args([node.to_str().unwrap(), "c", "1", "3"])
        .status()
        .unwrap();
    assert!(made.success(), "mknod");
    let fs_tid = std::fs::read_dir(format!("/proc/{sandbox}/task"))
        .unwrap()
        .flatten()
        .find(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "rootcell-fs")
        })
        .expect("rootcell-fs thread")
        .path();
    let opened = std::fs::OpenOptions::new()
        .write(true)
        .open(fs_tid.join("root/share/rootfs/hostnull"));
    assert_eq!(
        opened.map(|_| ()).map_err(|e| e.raw_os_error()),
        Err(Some(libc::EACCES)),
        "a device node in the share opened a host device"
    );
    std::fs::remove_file(&node).unwrap();

    // What a subverted virtio-fs thread could reopen through /proc/self/fd (it must hold that
    // directory: the passthrough reopens its inodes through it, and its xattr calls name
    // /proc/self/fd/N): the fs threads have an fd table of their own, and their root's
    // /proc/self/fd is that table, so it lists no directory and no regular host file outside
    // the share at all (not the sandbox's logs, not the caller's stdio files); the rest is
    // sockets, eventfds, memfds (guest RAM) and /dev/null.
    let run = run_dir(&rt.root(), &id);
    let state = rt.root().join(&id);
    let fs_dir = fs_tid.clone();
    let fs_table = fd_table(&fs_dir.join("fd"));
    assert_same_table(
        &fs_dir.join("root/proc/self/fd"),
        &fs_dir.join("fd"),
        "the fs root's /proc/self/fd and the fs threads' own table",
    );
    let sandbox_fd = std::path::PathBuf::from(format!("/proc/{sandbox}/fd"));
    let sandbox_table = fd_table(&sandbox_fd);
    assert_ne!(
        targets(&fs_table),
        targets(&sandbox_table),
        "the fs threads share the sandbox's fd table"
    );
    // Every fs thread (its daemon's and vring threads too) serves from that one table.
    for t in std::fs::read_dir(format!("/proc/{sandbox}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim().starts_with("rootcell-fs") {
            assert_same_table(
                &t.path().join("fd"),
                &fs_dir.join("fd"),
                &format!("{}'s fd table and rootcell-fs's", comm.trim()),
            );
        }
    }
    let mut share_inodes = 0;
    for (fd, (t, meta)) in &fs_table {
        // Paths as the fs threads' root names them: the share at /share.
        let in_share = t == "/share" || t.starts_with("/share/");
        share_inodes += usize::from(in_share);
        // The passthrough's own handles on its fd directory and mount table.
        if ["/proc/self/fd", "/proc/self/mountinfo"].contains(&t.as_str()) {
            continue;
        }
        if meta.is_dir() || (meta.is_file() && !t.starts_with("/memfd:")) {
            assert!(
                in_share,
                "the virtio-fs threads hold host file {t} (fd {fd}) outside the share"
            );
        }
    }
    assert!(share_inodes > 0, "no share inode in {fs_table:?}");
    // The sandbox's own table (root's main threads, not reachable from the back ends) holds
    // no directory outside the share, and no host file but its two logs and the stdio files
    // the caller gave the container.
    for (t, meta) in sandbox_table.values() {
        let target = std::path::Path::new(t);
        let in_share = target.starts_with(run.join("share"));
        if meta.is_dir() {
            assert!(
                in_share,
                "the sandbox holds directory {t} outside the share"
            );
        } else if meta.is_file() && !t.starts_with("/memfd:") {
            let stdio = target
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{id}.std")));
            assert!(
                in_share
                    || stdio
                    || [state.join("sandbox.log"), state.join("console.log")]
                        .iter()
                        .any(|p| p == target),
                "the sandbox holds host file {t} outside the share"
            );
        }
    }

    // The vsock back end's socket directory (the run dir) is root's, readable by its gid's
    // group only (nobody else has that gid), writable by root alone.
    let vsock_gid = backend_ids
        .iter()
        .find(|t| t.comm == "vsock-vhost-use")
        .unwrap()
        .gid[0]
        .clone();
    let sockdir = std::fs::metadata(&run).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (sockdir.uid(), sockdir.gid().to_string()),
        (0, vsock_gid),
        "the run dir's owner and group"
    );
    assert_eq!(sockdir.mode() & 0o777, 0o750, "the run dir's mode");

    // And the container works through it.
    ownership_passes_through(&rt, &id, &b);

    let o = rt.run(&["delete", "--force", &id]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    assert_no_leftovers(&rt, &id);
}

/// Ownership passes through the unprivileged virtio-fs back end: a user's file is the user's
/// on the host; root writes into a directory only root may write to, and chowns; the user
/// cannot write there (the guest's kernel says so).
fn ownership_passes_through(rt: &Runtime, id: &str, b: &Bundle) {
    use std::os::unix::fs::MetadataExt;
    let o = rt.run(&[
        "exec",
        id,
        "sh",
        "-c",
        "mkdir -m 777 /open && mkdir -m 700 /rootonly && echo r > /rootonly/f \
         && echo c > /rootonly/c && chown 4242:4243 /rootonly/c && echo jailed-ok",
    ]);
    assert_eq!(text(&o.stdout).trim(), "jailed-ok", "{}", text(&o.stderr));
    let o = rt.run(&[
        "exec",
        "--user",
        "1000:1000",
        id,
        "sh",
        "-c",
        "echo u > /open/u; echo x > /rootonly/x; echo done",
    ]);
    assert_eq!(text(&o.stdout).trim(), "done", "{}", text(&o.stderr));
    let owner = |p: &str| {
        std::fs::metadata(b.rootfs().join(p))
            .map(|m| (m.uid(), m.gid()))
            .map_err(|e| e.kind())
    };
    assert_eq!(owner("open/u"), Ok((1000, 1000)), "a user's file");
    assert_eq!(owner("rootonly"), Ok((0, 0)), "root's directory");
    assert_eq!(owner("rootonly/f"), Ok((0, 0)), "root's file");
    assert_eq!(owner("rootonly/c"), Ok((4242, 4243)), "a chowned file");
    assert_eq!(
        owner("rootonly/x"),
        Err(std::io::ErrorKind::NotFound),
        "a user wrote into root's directory"
    );
}

/// One back-end thread's identity, as `/proc/<pid>/task/<tid>/status` shows it.
#[derive(Debug)]
struct ThreadIds {
    tid: u64,
    comm: String,
    uid: Vec<String>,
    gid: Vec<String>,
    groups: String,
    caps: String,
}

/// The identities of the sandbox's back-end threads (those under seccomp).
fn backend_thread_ids(sandbox: i32) -> Vec<ThreadIds> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{sandbox}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(st) = std::fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        if status_field(&st, "Seccomp") != "2" {
            continue;
        }
        let ids = |f: &str| status_ids(&st, f);
        out.push(ThreadIds {
            tid: t.file_name().to_string_lossy().parse().unwrap(),
            comm: status_field(&st, "Name"),
            uid: ids("Uid"),
            gid: ids("Gid"),
            groups: status_field(&st, "Groups"),
            caps: status_field(&st, "CapEff"),
        });
    }
    out
}

/// The built-in VMM runs in a process of its own (`rootcell builtin-vmm`, a child of the
/// sandbox), and the sandbox holds no thread of it. In that process every thread is jailed:
/// each vCPU and virtio-net thread runs as an unprivileged uid/gid of its own from the reserved
/// range (base + thread id), without capabilities, under seccomp with no_new_privs, in a mount
/// namespace whose root is empty (so does the thread relaying the virtio-fs thread's log
/// lines); the vsock thread has no capabilities and a root holding only its socket directory;
/// the virtio-fs thread keeps the ownership capabilities, a root holding only the share and an
/// fd table of its own holding nothing of the process's; the process's control threads (its
/// main thread and the one waiting for the VM's end) run as base + the process's pid, without
/// capabilities, under seccomp, in an empty root. The container works. Needs hardware KVM:
/// runs in the nested lane's L1, skipped elsewhere.
#[test]
fn builtin_vmm_threads_run_unprivileged_in_roots_of_their_own() {
    if !hardware_kvm() {
        eprintln!(
            "SKIPPED builtin_vmm_threads_run_unprivileged_in_roots_of_their_own: no hardware KVM \
             here (the nested lane runs it in L1)"
        );
        return;
    }
    let rt = Runtime::new().env("ROOTCELL_HYPERVISOR", "builtin");
    let id = unique_id("jailb");
    let b = Bundle::new(&["sleep", "120"]);
    let (o, _, _) = rt.create(&b, &id);
    assert_eq!(code(&o), 0, "create: {}", text(&o.stderr));
    let o = rt.run(&["start", &id]);
    assert_eq!(code(&o), 0, "start: {}", text(&o.stderr));
    let sandbox = rt.wait_status(&id, "running", Duration::from_secs(120))["pid"]
        .as_i64()
        .unwrap() as i32;
    assert!(
        children_named(sandbox, "qemu").is_empty(),
        "a QEMU under the built-in backend"
    );
    let sandbox_ns = std::fs::read_link(format!("/proc/{sandbox}/ns/mnt")).unwrap();
    let vmms = children_named(sandbox, "builtin-vmm");
    assert_eq!(vmms.len(), 1, "VMM processes under sandbox {sandbox}");
    let vmm = vmms[0];
    let cmdline = std::fs::read_to_string(format!("/proc/{vmm}/cmdline")).unwrap();
    assert!(cmdline.contains("builtin-vmm"), "{cmdline:?}");
    // The sandbox holds no part of the VM: none of its threads is a vCPU or a device's.
    for t in std::fs::read_dir(format!("/proc/{sandbox}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let comm = comm.trim();
        assert!(
            !(comm.starts_with("vcpu") || comm.ends_with("-io")),
            "sandbox {sandbox} holds VMM thread {comm}"
        );
    }
    let zero = "0".repeat(16);
    let fs_caps = format!(
        "{:016x}",
        [0u32, 1, 2, 3, 4, 6, 7, 27, 31]
            .iter()
            .fold(0u64, |m, c| m | 1 << c)
    );
    let (mut vcpus, mut vsock, mut fs, mut control) = (0, 0, 0, 0);
    for t in std::fs::read_dir(format!("/proc/{vmm}/task"))
        .unwrap()
        .flatten()
    {
        let dir = t.path();
        let tid: u64 = t.file_name().to_string_lossy().parse().unwrap();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let comm = comm.trim();
        let Ok(st) = std::fs::read_to_string(dir.join("status")) else {
            continue;
        };
        let ids = |f: &str| status_ids(&st, f);
        let kind = if comm.starts_with("vcpu") || comm == "net-io" || comm == "fs-log-relay" {
            "unprivileged"
        } else if comm == "vsock-io" || comm == "virtiofs-io" {
            comm
        } else {
            "control"
        };
        // No thread of the VMM process is root.
        assert!(ids("Uid").iter().all(|u| u != "0"), "{comm}:\n{st}");
        assert!(ids("Gid").iter().all(|g| g != "0"), "{comm}:\n{st}");
        // Every VMM thread: seccomp, no_new_privs, a mount namespace of its own.
        assert_eq!(status_field(&st, "Seccomp"), "2", "{comm}:\n{st}");
        assert_eq!(status_field(&st, "NoNewPrivs"), "1", "{comm}:\n{st}");
        let ns = std::fs::read_link(dir.join("ns/mnt")).unwrap();
        assert_ne!(ns, sandbox_ns, "{comm} is in the sandbox's mount namespace");
        let root = dir.join("root");
        let top = listing(root.to_str().unwrap());
        assert_ne!(top, listing("/"), "{comm}'s root lists like the host's");
        // Uid and gid `id` (all four), no groups, no capabilities, nothing in its root.
        let nobody_in_an_empty_root = |id: u64| {
            let want = id.to_string();
            assert_eq!(ids("Uid"), vec![want.clone(); 4], "{comm}:\n{st}");
            assert_eq!(ids("Gid"), vec![want; 4], "{comm}:\n{st}");
            assert_eq!(status_field(&st, "Groups"), "", "{comm}");
            for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
                assert_eq!(status_field(&st, caps), zero, "{comm} {caps}:\n{st}");
            }
            assert!(top.is_empty(), "{comm}'s root holds {top:?}");
        };
        match kind {
            "unprivileged" => {
                assert!((UID_BASE..UID_BASE + UID_RANGE).contains(&(UID_BASE + tid)));
                nobody_in_an_empty_root(UID_BASE + tid);
                if comm.starts_with("vcpu") {
                    vcpus += 1;
                }
            }
            "control" => {
                // The process's own threads: base + its pid, nothing else.
                nobody_in_an_empty_root(UID_BASE + vmm as u64);
                control += 1;
            }
            "vsock-io" => {
                // Its own unprivileged uid without capabilities; the socket directory is its.
                let want = (UID_BASE + tid).to_string();
                assert_eq!(ids("Uid"), vec![want.clone(); 4], "{comm}:\n{st}");
                assert_eq!(ids("Gid"), vec![want.clone(); 4], "{comm}:\n{st}");
                for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
                    assert_eq!(status_field(&st, caps), zero, "{comm} {caps}:\n{st}");
                }
                // Its root: the path down to the socket directory, and nothing else.
                let (points, mountinfo) = mount_points(&dir);
                assert_eq!(points.len(), 2, "{comm}'s mounts:\n{mountinfo}");
                let sockdir = points.iter().find(|p| p.as_str() != "/").unwrap();
                assert_eq!(top.len(), 1, "{comm}'s root holds {top:?}");
                let socks = listing(&format!("{}{sockdir}", root.display()));
                assert!(
                    socks.iter().any(|s| s.starts_with("vsock")),
                    "{comm}'s socket directory {sockdir} holds {socks:?}"
                );
                vsock += 1;
            }
            _ => {
                // Its own unprivileged uid, keeping exactly the ownership capabilities.
                let want = (UID_BASE + tid).to_string();
                assert_eq!(ids("Uid"), vec![want.clone(); 4], "{comm}:\n{st}");
                assert_eq!(ids("Gid"), vec![want.clone(); 4], "{comm}:\n{st}");
                for caps in ["CapPrm", "CapEff", "CapBnd"] {
                    assert_eq!(status_field(&st, caps), fs_caps, "{comm} {caps}:\n{st}");
                }
                assert_eq!(
                    top,
                    BTreeSet::from(["share".to_string(), "proc".to_string()]),
                    "{comm}'s root"
                );
                // Its fd table is its own, and its root's /proc/self/fd (through which the
                // passthrough reopens inodes) is that table: it holds nothing of the process's
                // (the logs, the console, the control socket, the vsock socket, the taps, the
                // KVM fds, guest RAM), only the share's inodes, the passthrough's handles,
                // its eventfds and epoll, the pipe its log lines go through, and /dev/null
                // where the process's fds were.
                assert_same_table(
                    &dir.join("root/proc/self/fd"),
                    &dir.join("fd"),
                    "the fs root's /proc/self/fd and the fs thread's own table",
                );
                let table = fd_table(&dir.join("fd"));
                let process = fd_table(std::path::Path::new(&format!("/proc/{vmm}/fd")));
                assert_ne!(
                    targets(&table),
                    targets(&process),
                    "{comm} shares the process's fds"
                );
                let mut share_inodes = 0;
                for (fd, (t, _)) in &table {
                    let in_share = t == "/share" || t.starts_with("/share/");
                    share_inodes += usize::from(in_share);
                    let allowed = in_share
                        || ["/dev/null", "/proc/self/fd", "/proc/self/mountinfo"]
                            .contains(&t.as_str())
                        || ["anon_inode:[eventfd]", "anon_inode:[eventpoll]"].contains(&t.as_str())
                        || t.starts_with("pipe:");
                    assert!(allowed, "{comm} holds fd {fd} = {t}: {:?}", targets(&table));
                }
                assert!(share_inodes > 0, "no share inode in {:?}", targets(&table));
                fs += 1;
            }
        }
    }
    assert!(vcpus >= 1, "no vCPU thread found in VMM process {vmm}");
    assert_eq!((vsock, fs), (1, 1), "vsock and virtio-fs threads found");
    assert_eq!(control, 2, "control threads of VMM process {vmm}");

    ownership_passes_through(&rt, &id, &b);
    let o = rt.run(&["delete", "--force", &id]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    assert_no_leftovers(&rt, &id);
    // Gone, or dead and waiting for init to reap it (it was the killed sandbox's child).
    let state = std::fs::read_to_string(format!("/proc/{vmm}/stat"))
        .ok()
        .and_then(|s| s[s.rfind(')')? + 2..].chars().next());
    assert!(
        matches!(state, None | Some('Z') | Some('X')),
        "VMM process {vmm} outlived its container (state {state:?})"
    );
}
