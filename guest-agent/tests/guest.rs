//! Boots the static agent as /init of a real guest (QEMU TCG) with the project's vhost-user
//! vsock and virtio-fs backends, and runs a container over the wire protocol end to end.
//!
//! Needs: the static agent (see the build command in the report/README), the guest kernel and
//! QEMU (found by `rootcell-test-support`), root.

use rootcell_protocol::{
    recv, send, AgentMessage, Event, HostMessage, Request, Response, StdioSpec, Stream, StreamHello,
};
use serde_json::json;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn static_agent() -> PathBuf {
    if let Ok(a) = std::env::var("ROOTCELL_AGENT_STATIC") {
        return a.into();
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let p = manifest.join("../target-agent/x86_64-unknown-linux-gnu/release/rootcell-agent");
    assert!(
        p.exists(),
        "static agent missing at {} (set ROOTCELL_AGENT_STATIC)",
        p.display()
    );
    p
}

struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Connects to a guest port through the hybrid vsock socket (`CONNECT n` -> `OK m`).
fn connect(uds: &Path, port: u32, deadline: Instant) -> UnixStream {
    loop {
        if let Ok(mut s) = UnixStream::connect(uds) {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            if s.write_all(format!("CONNECT {port}\n").as_bytes()).is_ok() {
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while let Ok(1) = s.read(&mut b) {
                    if b[0] == b'\n' {
                        break;
                    }
                    line.push(b[0]);
                }
                if line.starts_with(b"OK ") {
                    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                    return s;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "guest agent did not accept on port {port}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn request(
    control: &mut UnixStream,
    id: u64,
    request: Request,
    events: &mut Vec<Event>,
) -> Response {
    send(control, &HostMessage { id, request }).unwrap();
    loop {
        match recv::<_, AgentMessage>(control)
            .unwrap()
            .expect("agent closed control")
        {
            AgentMessage::Response { id: got, result } if got == id => return result,
            AgentMessage::Response { id: got, .. } => panic!("response for {got}, expected {id}"),
            AgentMessage::Event { event } => events.push(event),
        }
    }
}

#[test]
#[ignore = "boots a QEMU TCG guest (~10-30 s); needs the static agent build and the guest kernel"]
fn container_runs_in_a_real_guest() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let initrd = t.join("initrd.cpio.gz");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/build-initramfs.sh");
    assert!(Command::new("bash")
        .arg(script)
        .arg(static_agent())
        .arg(&initrd)
        .status()
        .unwrap()
        .success());

    let share = t.join("share");
    let rootfs = share.join("rootfs");
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    for a in [
        "sh", "cat", "echo", "hostname", "id", "ls", "head", "mount", "grep",
    ] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(a)).unwrap();
    }
    std::fs::create_dir_all(share.join("data")).unwrap();
    std::fs::write(share.join("data/msg"), "from the host\n").unwrap();

    let vsock_uds = t.join("vsock.sock");
    let _vsock = rootcell_vsock::serve_vhost_user(
        &t.join("vsock.vhost.sock"),
        rootcell_vsock::VsockConfig::new(&vsock_uds),
    )
    .unwrap();
    let _fs = rootcell_fs::serve_vhost_user(
        &t.join("fs.vhost.sock"),
        rootcell_fs::FsConfig {
            shared_dir: share.clone(),
            read_only: false,
        },
    )
    .unwrap();
    let console = t.join("console.log");
    let mut qemu = Qemu(
        Command::new(rootcell_test_support::qemu().expect("qemu-system-x86_64 is not installed"))
            .args([
                "-M",
                "microvm,acpi=off,x-option-roms=off,rtc=off,memory-backend=mem",
                "-accel",
                "tcg",
                "-cpu",
                "max",
            ])
            .args([
                "-smp",
                "1",
                "-m",
                "256M",
                "-object",
                "memory-backend-memfd,id=mem,size=256M,share=on",
            ])
            .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(rootcell_test_support::bzimage().expect("no guest kernel: run scripts/build.sh"))
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", "console=ttyS0 reboot=t panic=-1 quiet"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=vsock,path={}",
                t.join("vsock.vhost.sock").display()
            ))
            .args(["-device", "vhost-user-vsock-device,chardev=vsock"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=fs,path={}",
                t.join("fs.vhost.sock").display()
            ))
            .args(["-device", "vhost-user-fs-device,chardev=fs,tag=rootcell"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let booted = Instant::now();
    let deadline = booted + Duration::from_secs(120);
    let mut control = connect(&vsock_uds, rootcell_protocol::CONTROL_PORT, deadline);
    let mut events = Vec::new();
    let hello = request(
        &mut control,
        1,
        Request::Hello {
            version: rootcell_protocol::PROTOCOL_VERSION,
        },
        &mut events,
    );
    eprintln!(
        "agent answered {hello:?} {:?} after boot start",
        booted.elapsed()
    );

    let mut stdout = connect(&vsock_uds, rootcell_protocol::STREAM_PORT, deadline);
    send(
        &mut stdout,
        &StreamHello {
            container: "g1".into(),
            process: "init".into(),
            stream: Stream::Stdout,
        },
    )
    .unwrap();
    let mut stderr = connect(&vsock_uds, rootcell_protocol::STREAM_PORT, deadline);
    send(
        &mut stderr,
        &StreamHello {
            container: "g1".into(),
            process: "init".into(),
            stream: Stream::Stderr,
        },
    )
    .unwrap();
    let spec = serde_json::from_value(json!({
        "ociVersion": "1.0.2",
        "root": {"path": "/run/rootcell/share/rootfs"},
        "hostname": "guestcell",
        "process": {"args": ["sh", "-c", "hostname; id -u; cat /data/msg; echo hi > /tmp/x && cat /tmp/x; cat /proc/self/cgroup; ls /sys/fs/cgroup | grep -c procs; exit 4"],
                    "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["ro", "nosuid", "noexec", "nodev"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"},
            {"destination": "/data", "type": "bind", "source": "/run/rootcell/share/data", "options": ["rbind", "ro"]},
        ],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}],
                  "maskedPaths": ["/proc/kcore"], "readonlyPaths": ["/proc/sys"]}
    }))
    .unwrap();
    let stdio = StdioSpec {
        stdout: true,
        stderr: true,
        ..Default::default()
    };
    let created = request(
        &mut control,
        2,
        Request::Create {
            container_id: "g1".into(),
            spec: Box::new(spec),
            stdio,
            privileged: false,
        },
        &mut events,
    );
    assert!(matches!(created, Response::Created { .. }), "{created:?}");
    let started = Instant::now();
    assert_eq!(
        request(&mut control, 3, Request::Start, &mut events),
        Response::Ok
    );
    let mut out = String::new();
    stdout.read_to_string(&mut out).unwrap();
    let mut err = String::new();
    stderr.read_to_string(&mut err).unwrap();
    while !events.iter().any(|e| matches!(e, Event::Exit { .. })) {
        match recv::<_, AgentMessage>(&mut control).unwrap().unwrap() {
            AgentMessage::Event { event } => events.push(event),
            other => panic!("{other:?}"),
        }
    }
    eprintln!("container ran in {:?}", started.elapsed());
    assert_eq!(
        events,
        vec![Event::Exit {
            process: "init".into(),
            status: 4
        }],
        "stderr: {err}"
    );
    assert_eq!(
        out, "guestcell\n0\nfrom the host\nhi\n0::/\n1\n",
        "stderr: {err}"
    );

    assert_eq!(
        request(&mut control, 4, Request::Shutdown, &mut events),
        Response::Ok
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while qemu.0.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "QEMU did not exit after Shutdown"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(log.contains("rootcell-agent: ready"), "{log}");
}
