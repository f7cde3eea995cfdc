//! Warm starts (issue 15): with `rootcell pool serve` running, containers take a VM booted
//! ahead of need instead of booting one, and behave as on a cold VM: stdio, exit codes, bind
//! mounts, the lifecycle, cgroups, Docker's run/exec/stop and published ports. A VM serves one
//! container only; the pool refills; killing the server (mid-claim included) or stopping it
//! leaves no VM, process or directory behind, and containers still start (cold).

use rootcell_e2e::docker::{inspect, ok, run_detached, wait_until, DockerDaemon, IMAGE};
use rootcell_e2e::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// Longest a pool may take to have its VMs ready (TCG boots on a loaded 2-core host).
const READY_TIMEOUT: Duration = Duration::from_secs(240);

/// A `rootcell pool serve` of its own (own directory and config), stopped (SIGTERM) on drop.
struct Pool {
    dir: PathBuf,
    server: Option<Child>,
    log: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Pool {
    /// Starts a pool of `count` VMs of 512 MiB and 1 vCPU for `rt` (whose commands then
    /// claim from it) and waits until they are ready.
    fn start(rt: &Runtime, count: usize) -> Pool {
        let tmp = tempfile::Builder::new()
            .prefix("rcpool")
            .tempdir_in("/tmp")
            .unwrap();
        let dir = tmp.path().join("p");
        let config = tmp.path().join("config.json");
        std::fs::write(
            &config,
            json!({"pool": {"vms": [{"memory_mib": 512, "vcpus": 1, "count": count}]}}).to_string(),
        )
        .unwrap();
        let log = tmp.path().join("pool.log");
        let mut pool = Pool {
            dir,
            server: None,
            log,
            _tmp: tmp,
        };
        pool.spawn(rt, &config);
        pool.wait_ready(rt, count);
        pool
    }

    fn spawn(&mut self, rt: &Runtime, config: &Path) {
        let mut c = rt.command(&["--log", self.log.to_str().unwrap(), "pool", "serve"]);
        c.env("ROOTCELL_POOL_DIR", &self.dir)
            .env("ROOTCELL_CONFIG", config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.server = Some(c.spawn().expect("start rootcell pool serve"));
    }

    /// `rootcell pool status` as JSON (`Null` if it fails).
    fn status(&self, rt: &Runtime) -> Value {
        let mut c = rt.command(&["pool", "status"]);
        c.env("ROOTCELL_POOL_DIR", &self.dir).stdin(Stdio::null());
        let o = output_with_timeout(c, None, Duration::from_secs(20));
        serde_json::from_slice(&o.stdout).unwrap_or(Value::Null)
    }

    fn wait_ready(&self, rt: &Runtime, n: usize) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let st = self.status(rt);
            if st["shapes"][0]["ready"].as_u64() == Some(n as u64) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the pool did not get {n} VMs ready within {} s: status {st}; log:\n{}",
                READY_TIMEOUT.as_secs(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn server_pid(&self) -> i32 {
        self.server.as_ref().unwrap().id() as i32
    }

    /// SIGTERM, bounded wait.
    fn stop(&mut self) {
        if let Some(child) = self.server.take() {
            // SAFETY: signalling the server this test started.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let st = wait_with_timeout(child, Duration::from_secs(60));
            assert!(st.success(), "pool serve exited with {st} after SIGTERM");
        }
    }

    /// VM dirs in the pool's directory.
    fn vm_dirs(&self) -> Vec<String> {
        std::fs::read_dir(&self.dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Asserts that nothing of the pool is left: no process, VM dir or mount mentions it.
    fn assert_gone(&self) {
        let needle = self.dir.to_string_lossy().into_owned();
        wait_until(
            "the pool's processes to end",
            Duration::from_secs(30),
            || processes_mentioning(&needle).is_empty(),
        );
        assert_eq!(
            self.vm_dirs(),
            Vec::<String>::new(),
            "pool VM dirs left behind"
        );
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            if let Ok(m) = std::fs::read_to_string(e.path().join("mountinfo")) {
                assert!(
                    !m.contains(&needle),
                    "a mount of the pool is left in {}",
                    e.path().display()
                );
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if let Some(mut c) = self.server.take() {
            // SAFETY: signalling the server this test started.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline && !matches!(c.try_wait(), Ok(Some(_))) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A runtime whose commands claim from `pool` and log to `log`.
fn runtime_for(pool_dir: &Path) -> Runtime {
    Runtime::new().env("ROOTCELL_POOL_DIR", pool_dir.to_str().unwrap())
}

/// The pool VM a container's state records (`None`: it booted cold).
fn pooled_of(rt: &Runtime, id: &str) -> Option<Value> {
    let st: Value =
        serde_json::from_slice(&std::fs::read(rt.root().join(id).join("state.json")).unwrap())
            .unwrap();
    Some(st["pooled"].clone()).filter(|p| !p.is_null())
}

/// `run` of `bundle` as `id` with its log in a file; the output and the log.
fn run_with_log(rt: &Runtime, bundle: &Bundle, id: &str) -> (std::process::Output, String) {
    let log = rt.dir.path().join(format!("{id}.log"));
    let o = rt.run(&[
        "--log",
        log.to_str().unwrap(),
        "run",
        "--bundle",
        bundle.path().to_str().unwrap(),
        id,
    ]);
    (o, std::fs::read_to_string(&log).unwrap_or_default())
}

/// The distinct nice values of the threads of `pid` and of its children (the hypervisor).
fn thread_nices(pid: i32) -> Vec<i64> {
    let mut pids = vec![pid];
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        pids.extend(
            children
                .split_whitespace()
                .filter_map(|c| c.parse::<i32>().ok()),
        );
    }
    let mut nices: Vec<i64> = pids
        .iter()
        .flat_map(|p| {
            std::fs::read_dir(format!("/proc/{p}/task"))
                .into_iter()
                .flatten()
        })
        .flatten()
        .filter_map(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            // Field 19 (nice), counted after the command's closing parenthesis (field 2).
            stat.rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(16)?
                .parse()
                .ok()
        })
        .collect();
    nices.sort_unstable();
    nices.dedup();
    nices
}

#[test]
fn warm_containers_run_like_cold_ones_and_each_vm_serves_one() {
    let rt = Runtime::new();
    let mut pool = Pool::start(&rt, 2);
    let rt = runtime_for(&pool.dir);

    // `run`: stdio, exit code and a bind mount, in a VM that booted before the container.
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("in"), "from-the-host\n").unwrap();
    let bundle = Bundle::new(&["sh", "-c", "cat /data/in; echo to-stderr >&2; echo written > /data/out; exit 7"])
        .edit(|s| {
            s["mounts"].as_array_mut().unwrap().push(json!({
                "destination": "/data", "type": "bind", "source": data.path(), "options": ["rbind", "rw"]
            }));
        });
    let id = unique_id("warm-run");
    let started = Instant::now();
    let (o, log_text) = run_with_log(&rt, &bundle, &id);
    eprintln!("warm run took {} ms", started.elapsed().as_millis());
    assert_eq!(
        code(&o),
        7,
        "exit code of a warm run: {}\nlog:\n{log_text}",
        text(&o.stderr)
    );
    assert_eq!(text(&o.stdout).trim(), "from-the-host");
    assert!(text(&o.stderr).contains("to-stderr"), "{}", text(&o.stderr));
    assert_eq!(
        std::fs::read_to_string(data.path().join("out"))
            .unwrap()
            .trim(),
        "written"
    );
    assert!(
        log_text.contains("from the pool (no boot)"),
        "the claim is not in the log:\n{log_text}"
    );
    assert_no_leftovers(&rt, &id);

    // create/start/delete, with a cgroup: the VM's host processes are the container's.
    let cg = format!("/rootcell-e2e/{}", unique_id("pool"));
    let gate = tempfile::tempdir().unwrap();
    let bundle = Bundle::new(&["sh", "-c", "while [ ! -e /gate/go ]; do sleep 0.1; done; echo done"])
        .edit(|s| {
            s["linux"]["cgroupsPath"] = json!(cg);
            s["mounts"].as_array_mut().unwrap().push(json!({
                "destination": "/gate", "type": "bind", "source": gate.path(), "options": ["rbind", "rw"]
            }));
        });
    let id2 = unique_id("warm-life");
    let (o, out, _) = rt.create(&bundle, &id2);
    assert_eq!(code(&o), 0, "create: {}", text(&o.stderr));
    assert_eq!(rt.state(&id2)["status"], "created");
    let pooled = pooled_of(&rt, &id2).expect("the container took a pool VM");
    let holder = pooled["holder_pid"].as_i64().unwrap();
    // Claimed, the holder names the container on its command line (`--claimed-for
    // <root>/<id>`), so the leftover check (processes_of) would find it left behind.
    let mine = processes_of(&rt.root(), &id2);
    assert!(
        mine.iter()
            .any(|p| p.starts_with(&format!("{holder}: ")) && p.contains(" pool vm ")),
        "the claimed holder {holder} is not among the container's processes: {mine:#?}"
    );
    let cgroups = std::fs::read_to_string(format!("/proc/{holder}/cgroup")).unwrap();
    assert!(
        cgroups.lines().any(|l| l.ends_with(&cg)),
        "the pool VM's holder {holder} is not in the container's cgroup {cg}:\n{cgroups}"
    );
    // The claimed VM runs at normal priority; a ready one (the pool's other VM) is niced, so
    // that a refill's boot yields the CPU to running containers.
    assert_eq!(
        thread_nices(holder as i32),
        vec![0],
        "nice values of the claimed VM's threads"
    );
    let ready_holder = pool
        .vm_dirs()
        .into_iter()
        .filter(|d| *d != pooled["name"].as_str().unwrap())
        .find_map(|d| {
            let dir = pool.dir.join(d);
            dir.join("claim.sock").exists().then(|| {
                std::fs::read_to_string(dir.join("holder.pid"))
                    .ok()?
                    .trim()
                    .parse::<i32>()
                    .ok()
            })?
        });
    if let Some(h) = ready_holder {
        assert_eq!(
            thread_nices(h),
            vec![10],
            "nice values of a ready pool VM's threads"
        );
    }
    assert_eq!(code(&rt.run(&["start", &id2])), 0);
    std::fs::write(gate.path().join("go"), "").unwrap();
    rt.wait_status(&id2, "stopped", Duration::from_secs(60));
    assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), "done");
    assert_eq!(code(&rt.run(&["delete", &id2])), 0);
    assert_no_leftovers(&rt, &id2);
    wait_until(
        "the used VM's holder to end",
        Duration::from_secs(20),
        || !Path::new(&format!("/proc/{holder}")).exists(),
    );
    let vm = pooled["name"].as_str().unwrap().to_string();
    assert!(
        !pool.vm_dirs().contains(&vm),
        "the VM {vm} of a deleted container is still in the pool: {:?}",
        pool.vm_dirs()
    );

    // The pool refills, and never hands out the same VM twice.
    pool.wait_ready(&rt, 2);
    let st = pool.status(&rt);
    assert!(st["shapes"][0]["claims_total"].as_u64() >= Some(2), "{st}");
    let names: Vec<String> = pool
        .log_text()
        .lines()
        .filter(|l| l.contains("pool VM claimed"))
        .map(String::from)
        .collect();
    assert_eq!(
        names.len(),
        2,
        "two claims in the pool's log:\n{}",
        pool.log_text()
    );
    assert_ne!(
        names[0].split("vm=").nth(1),
        names[1].split("vm=").nth(1),
        "{names:?}"
    );

    pool.stop();
    pool.assert_gone();
}

#[test]
fn killing_the_pool_server_mid_claim_loses_no_container_and_leaks_nothing() {
    let rt = Runtime::new();
    let mut pool = Pool::start(&rt, 1);
    let rt = runtime_for(&pool.dir);
    let bundle = Bundle::new(&["echo", "hello"]);
    // A run in flight while the server is killed: it takes the VM, or boots one.
    let id = unique_id("kill-mid");
    let mut c = rt.command(&["run", "--bundle", bundle.path().to_str().unwrap(), &id]);
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = c.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(150));
    // SAFETY: killing the server this test started.
    unsafe { libc::kill(pool.server_pid(), libc::SIGKILL) };
    let _ = pool.server.take().map(|mut s| s.wait());
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        code(&o),
        0,
        "a run while the server died: {}",
        text(&o.stderr)
    );
    assert_eq!(text(&o.stdout).trim(), "hello");
    // More runs: the stale socket means a cold boot, not an error.
    for n in 0..2 {
        let id = unique_id(&format!("after-kill{n}"));
        let o = rt.run(&["run", "--bundle", bundle.path().to_str().unwrap(), &id]);
        assert_eq!(
            code(&o),
            0,
            "run {n} after the server died: {}",
            text(&o.stderr)
        );
        assert_eq!(text(&o.stdout).trim(), "hello");
        assert_no_leftovers(&rt, &id);
    }
    // Its unclaimed VM ended with it.
    pool.assert_gone();
}

#[test]
fn a_dead_pool_vm_a_shape_no_pool_has_and_an_untrusted_socket_mean_cold_starts() {
    let rt = Runtime::new();
    let pool = Pool::start(&rt, 1);
    let rt = runtime_for(&pool.dir);
    let bundle = Bundle::new(&["echo", "hello"]);
    let run_logged = |rt: &Runtime, bundle: &Bundle, what: &str| -> String {
        let id = unique_id(what);
        let (o, log) = run_with_log(rt, bundle, &id);
        assert_eq!(code(&o), 0, "{what}: {}\nlog:\n{log}", text(&o.stderr));
        assert_eq!(text(&o.stdout).trim(), "hello", "{what}");
        assert_no_leftovers(rt, &id);
        log
    };

    // The ready VM's hypervisor dies: the pool drops it and boots another; nobody gets it.
    let dir = pool.dir.to_string_lossy().into_owned();
    let qemu: Vec<i32> = processes_mentioning(&dir)
        .iter()
        .filter(|p| p.contains("qemu-system"))
        .filter_map(|p| p.split(':').next()?.parse().ok())
        .collect();
    assert_eq!(qemu.len(), 1, "one ready VM's QEMU: {qemu:?}");
    let dead = pool.vm_dirs();
    assert_eq!(dead.len(), 1, "one VM dir: {dead:?}");
    // SAFETY: killing the QEMU of this test's pool.
    unsafe { libc::kill(qemu[0], libc::SIGKILL) };
    // With one VM wanted, the server starts another only once it has dropped the dead one;
    // until then the dead one still counts as ready (a QEMU takes tens of ms to die, and its
    // holder some more to notice), and a run would be handed it.
    wait_until(
        "the pool to replace its dead VM",
        Duration::from_secs(30),
        || pool.vm_dirs().iter().any(|d| !dead.contains(d)),
    );
    pool.wait_ready(&rt, 1);
    let log = run_logged(&rt, &bundle, "after-dead-vm");
    assert!(log.contains("from the pool (no boot)"), "{log}");

    // A container that needs more memory than any pooled VM has boots its own.
    let big = Bundle::new(&["echo", "hello"]).edit(|s| {
        s["linux"]["resources"] = json!({"memory": {"limit": 1024_i64 * 1024 * 1024}});
    });
    let log = run_logged(&rt, &big, "no-shape");
    assert!(
        log.contains("the pool has no shape that fits 1088 MiB, 1 vCPU"),
        "{log}"
    );

    // A pool directory others may write to is not trusted.
    let fake = tempfile::Builder::new()
        .prefix("rcfake")
        .tempdir_in("/tmp")
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(fake.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let _listener = std::os::unix::net::UnixListener::bind(fake.path().join("pool.sock")).unwrap();
    let rt2 = runtime_for(fake.path());
    let log = run_logged(&rt2, &bundle, "untrusted");
    assert!(
        log.contains("booting a VM: cannot take one from the pool")
            && log.contains("lets others write"),
        "{log}"
    );
}

/// A pooled VM has one network card: a container whose namespace has two interfaces gives its
/// claimed VM back and boots one of its own, which gets both; the pool ends the VM it gave
/// back and refills, and nothing of it (its tap included) is left in the container's namespace.
#[test]
fn a_container_with_two_interfaces_gives_its_pool_vm_back_and_boots_cold() {
    let rt = Runtime::new();
    let pool = Pool::start(&rt, 1);
    let rt = runtime_for(&pool.dir);
    let container = NetNs::new("rc-two");
    let peer = NetNs::new("rc-twop");
    container.sh(&format!(
        "ip link add eth0 type veth peer name rcp0 netns {p} && ip link add eth1 type veth peer name rcp1 netns {p} \
         && ip addr add 10.218.0.2/24 dev eth0 && ip addr add 10.219.0.2/24 dev eth1 \
         && ip link set eth0 up && ip link set eth1 up",
        p = peer.name()
    ));
    peer.sh("ip link set rcp0 up && ip link set rcp1 up");
    let before = container.sh("ip -o link; tc qdisc show");
    let macs = container.sh("cat /sys/class/net/eth0/address /sys/class/net/eth1/address");
    let bundle = Bundle::new(&[
        "sh",
        "-c",
        "cat /sys/class/net/eth0/address /sys/class/net/eth1/address; ip -o -4 addr show",
    ])
    .edit(|s| {
        let ns = s["linux"]["namespaces"].as_array_mut().unwrap();
        ns.retain(|n| n["type"] != "network");
        ns.push(json!({"type": "network", "path": container.path()}));
    });
    let id = unique_id("two-nics");
    let (o, log) = run_with_log(&rt, &bundle, &id);
    let out = text(&o.stdout);
    assert_eq!(code(&o), 0, "{}\nlog:\n{log}", text(&o.stderr));
    assert!(
        log.contains("does not suit this container: booting a VM instead"),
        "{log}"
    );
    assert!(
        out.starts_with(&macs),
        "the guest's cards:\n{out}\nwant MACs:\n{macs}"
    );
    assert!(
        out.contains("inet 10.218.0.2/24") && out.contains("inet 10.219.0.2/24"),
        "{out}"
    );
    assert_no_leftovers(&rt, &id);
    assert_eq!(
        container.sh("ip -o link; tc qdisc show"),
        before,
        "the pool VM's tap or a tc filter left in the container's namespace"
    );
    // The VM given back is ended, not served to anyone else; the pool boots a new one.
    let st = pool.status(&rt);
    assert_eq!(st["shapes"][0]["claims_total"].as_u64(), Some(1), "{st}");
    pool.wait_ready(&rt, 1);
    assert_eq!(pool.vm_dirs().len(), 1, "VM dirs: {:?}", pool.vm_dirs());
}

/// The directories cgroup `rel` has (or would have) in every mounted hierarchy.
fn host_cgroup_dirs(rel: &str) -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    if base.join("cgroup.procs").exists() {
        return vec![base.join(rel)];
    }
    std::fs::read_dir(base)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("cgroup.procs").exists() && !p.is_symlink())
        .map(|p| p.join(rel))
        .collect()
}

/// Removes the cgroup directories a failed test left (best effort, once it is over).
struct CgroupCleanup(Vec<PathBuf>);

impl Drop for CgroupCleanup {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir(d);
        }
    }
}

#[test]
fn a_pool_vm_that_dies_during_the_claim_means_a_cold_boot_and_leaks_nothing() {
    let rt = Runtime::new();
    let mut pool = Pool::start(&rt, 1);
    let rt = runtime_for(&pool.dir);

    // The one ready VM, and the process whose death is the VM's: its QEMU, or with the
    // built-in VMM its holder (the VMM runs in it).
    let dirs = pool.vm_dirs();
    assert_eq!(dirs.len(), 1, "one VM dir: {dirs:?}");
    let vm_dir = pool.dir.join(&dirs[0]);
    let needle = vm_dir.to_string_lossy().into_owned();
    let holder: i32 = std::fs::read_to_string(vm_dir.join("holder.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let qemu: Vec<i32> = processes_mentioning(&needle)
        .iter()
        .filter(|p| p.contains("qemu-system"))
        .filter_map(|p| p.split(':').next()?.parse().ok())
        .collect();
    let victim = qemu.first().copied().unwrap_or(holder);

    // A createRuntime hook kills it: on a warm start the hooks run after the claim and before
    // the container is handed to the guest. The hook waits (bounded) until the process is
    // reaped, so the VM is certainly dead before the create goes on.
    let marks = tempfile::tempdir().unwrap();
    let ran = marks.path().join("hook-ran");
    let kill = format!(
        "echo ran >> {ran}; kill -9 {victim}; i=0; while [ -e /proc/{victim} ] && [ $i -lt 500 ]; do sleep 0.01; i=$((i+1)); done",
        ran = ran.display()
    );
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("in"), "from-the-host\n").unwrap();
    let id = unique_id("dies-mid-claim");
    let rel = format!("rootcell-e2e-{id}");
    let cgroup_dirs = host_cgroup_dirs(&rel);
    let bundle = Bundle::new(&["sh", "-c", "cat /data/in; echo written > /data/out; exit 5"])
        .edit(|s| {
            s["hooks"] = json!({"createRuntime": [{"path": "/bin/sh", "args": ["sh", "-c", kill]}]});
            s["linux"]["cgroupsPath"] = json!(format!("/{rel}"));
            s["mounts"].as_array_mut().unwrap().push(json!({
                "destination": "/data", "type": "bind", "source": data.path(), "options": ["rbind", "rw"]
            }));
        });
    let _cleanup = CgroupCleanup(cgroup_dirs.clone());
    let (o, log) = run_with_log(&rt, &bundle, &id);
    assert_eq!(
        code(&o),
        5,
        "a run whose pool VM died mid-claim: {}\nlog:\n{log}",
        text(&o.stderr)
    );
    assert_eq!(text(&o.stdout).trim(), "from-the-host", "log:\n{log}");
    assert_eq!(
        std::fs::read_to_string(data.path().join("out"))
            .unwrap()
            .trim(),
        "written"
    );
    assert!(
        !Path::new(&format!("/proc/{victim}")).exists(),
        "the hook did not kill pid {victim}"
    );
    assert!(
        log.contains("from the pool (no boot)") && log.contains("cold fallback"),
        "the claim and the cold fallback are not in the log:\n{log}"
    );
    for l in log.lines().filter(|l| l.contains("cold fallback")) {
        eprintln!("{l}");
    }
    assert_eq!(
        std::fs::read_to_string(&ran).unwrap().lines().count(),
        1,
        "the createRuntime hook runs once, not again for the cold VM"
    );

    // Nothing is left of the container, of its cgroup or of the dead VM.
    assert_no_leftovers(&rt, &id);
    let left: Vec<&PathBuf> = cgroup_dirs.iter().filter(|d| d.exists()).collect();
    assert!(left.is_empty(), "cgroups left behind: {left:?}");
    wait_until(
        "the dead VM's processes to end",
        Duration::from_secs(20),
        || {
            processes_mentioning(&needle).is_empty()
                && !Path::new(&format!("/proc/{holder}")).exists()
        },
    );
    assert!(
        !vm_dir.exists(),
        "the dead VM's dir is left: {}",
        vm_dir.display()
    );
    let taps: Vec<String> = std::fs::read_dir("/sys/class/net")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("rctap"))
        .collect();
    assert!(
        taps.is_empty(),
        "taps left in the host's namespace: {taps:?}"
    );

    // The pool goes on: it refills, and the next container takes a VM from it.
    pool.wait_ready(&rt, 1);
    let id = unique_id("after-mid-claim");
    let (o, log) = run_with_log(&rt, &Bundle::new(&["echo", "hello"]), &id);
    assert_eq!(code(&o), 0, "{}\nlog:\n{log}", text(&o.stderr));
    assert_eq!(text(&o.stdout).trim(), "hello");
    assert!(log.contains("from the pool (no boot)"), "{log}");
    assert_no_leftovers(&rt, &id);
    pool.stop();
    pool.assert_gone();
}

#[test]
fn the_pool_refills_after_its_binary_is_replaced() {
    // The server runs a copy of the binary, which is then replaced as a rebuild or an upgrade
    // replaces it (a new file under the same name; the old one is unlinked).
    let bin_dir = tempfile::Builder::new()
        .prefix("rcbin")
        .tempdir_in("/tmp")
        .unwrap();
    let copy = bin_dir.path().join("rootcell");
    std::fs::copy(&artifacts().bin, &copy).unwrap();
    let mut server_rt = Runtime::new();
    server_rt.art.bin = copy.clone();
    let mut pool = Pool::start(&server_rt, 1);
    std::fs::remove_file(&copy).unwrap();
    std::fs::copy(&artifacts().bin, &copy).unwrap();

    // A claim makes the server start a holder for the refill.
    let rt = runtime_for(&pool.dir);
    let bundle = Bundle::new(&["echo", "hello"]);
    for n in 0..2 {
        let id = unique_id(&format!("replaced{n}"));
        let (o, log) = run_with_log(&rt, &bundle, &id);
        assert_eq!(code(&o), 0, "run {n}: {}\nlog:\n{log}", text(&o.stderr));
        assert_eq!(text(&o.stdout).trim(), "hello");
        assert!(
            log.contains("from the pool (no boot)"),
            "run {n} after the binary was replaced did not take a pool VM:\nlog:\n{log}\npool log:\n{}",
            pool.log_text()
        );
        assert_no_leftovers(&rt, &id);
        // The refill: ready, or failed (which the old server did at once, every time).
        let mut st = Value::Null;
        wait_until("the pool's refill", READY_TIMEOUT, || {
            st = pool.status(&server_rt);
            st["shapes"][0]["ready"] == 1 || st["shapes"][0]["failed_boots"] != 0
        });
        assert_eq!(
            st["shapes"][0]["failed_boots"],
            0,
            "refills failed after the binary was replaced: {st}\npool log:\n{}",
            pool.log_text()
        );
    }
    pool.stop();
    pool.assert_gone();
}

/// The Docker daemon of this binary, whose rootcell claims from [`docker_pool`] (the env
/// reaches the runtime through dockerd, containerd and the shim).
fn docker_pool() -> &'static (Pool, &'static DockerDaemon) {
    static P: std::sync::OnceLock<(Pool, &'static DockerDaemon)> = std::sync::OnceLock::new();
    P.get_or_init(|| {
        let rt = Box::leak(Box::new(Runtime::new()));
        let pool = Pool::start(rt, 2);
        std::env::set_var("ROOTCELL_POOL_DIR", &pool.dir);
        DOCKER_POOL_SERVER.store(pool.server_pid(), std::sync::atomic::Ordering::SeqCst);
        let _ = DOCKER_POOL_TMP.set(pool._tmp.path().to_path_buf());
        // SAFETY: registering a plain extern "C" function to run at process exit, once (before
        // the daemon's own, so it runs after the daemon has stopped its containers).
        unsafe { libc::atexit(stop_docker_pool) };
        (pool, rootcell_e2e::docker::daemon())
    })
}

/// The server of [`docker_pool`], which as a static is never dropped.
static DOCKER_POOL_SERVER: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
/// Its temporary directory (config, log, pool dir), removed at exit for the same reason.
static DOCKER_POOL_TMP: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

extern "C" fn stop_docker_pool() {
    let pid = DOCKER_POOL_SERVER.load(std::sync::atomic::Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: signalling the server this process started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut status = 0;
        let reaped = |status: &mut i32| {
            // SAFETY: reaping our own child, without blocking.
            unsafe { libc::waitpid(pid, status, libc::WNOHANG) != 0 }
        };
        while Instant::now() < deadline && !reaped(&mut status) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    if let Some(dir) = DOCKER_POOL_TMP.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn docker_run_exec_stop_ports_and_inginious_on_warm_vms() {
    let (pool, d) = docker_pool();
    let rt = Runtime::new();
    let before = pool.status(&rt)["shapes"][0]["claims_total"]
        .as_u64()
        .unwrap_or(0);
    let started = Instant::now();
    let o = rootcell_e2e::docker::run_rm(d, &[], &["sh", "-c", "echo warm-docker; exit 3"]);
    eprintln!(
        "warm docker run --rm took {} ms",
        started.elapsed().as_millis()
    );
    assert_eq!(code(&o), 3, "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout).trim(), "warm-docker");

    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let id = run_detached(
        d,
        &["-p", &format!("{port}:8080")],
        "mkdir -p /tmp/www && echo warm-http > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www",
    );
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut body = String::new();
    wait_until(
        "the published port to answer",
        Duration::from_secs(60),
        || {
            use std::io::{Read, Write};
            let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            else {
                return false;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = write!(s, "GET / HTTP/1.0\r\n\r\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            body = out
                .split("\r\n\r\n")
                .nth(1)
                .unwrap_or_default()
                .trim()
                .to_string();
            !body.is_empty()
        },
    );
    assert_eq!(body, "warm-http");
    assert_eq!(
        ok(d, &["exec", &id, "cat", "/tmp/www/index.html"]).trim(),
        "warm-http"
    );
    ok(d, &["stop", "-t", "2", &id]);
    assert_eq!(inspect(d, &id, "{{.State.Running}}"), "false");
    ok(d, &["rm", &id]);
    let after = pool.status(&rt)["shapes"][0]["claims_total"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(
        after - before,
        2,
        "both Docker containers took pool VMs:\n{}",
        pool.log_text()
    );
    let _ = IMAGE;
    inginious_grades_need_root_and_run_student_on_warm_vms();
}

/// INGInious' daemon has no bridge (`"bridge": "none"`), and a dockerd started so deletes the
/// host's docker0, which the Docker test's daemon uses: it runs after that test, in the same
/// test function.
fn inginious_grades_need_root_and_run_student_on_warm_vms() {
    let (pool, _) = docker_pool();
    let rt = Runtime::new();
    let before = pool.status(&rt)["shapes"][0]["claims_total"]
        .as_u64()
        .unwrap_or(0);
    pool.wait_ready(&rt, 2);
    let g = rootcell_e2e::inginious::Grading::start(
        json!({"path": artifacts().bin, "runtimeArgs": ["--guest-privileged"]}),
    );
    let (_, results) = g.submit(&["need_root", "run_student"], Duration::from_secs(300));
    for j in &results {
        assert_eq!(
            j.result(),
            "success",
            "{} on warm VMs:\n{}",
            j.0["task"],
            j.summary()
        );
    }
    let nr = results.iter().find(|j| j.0["task"] == "need_root").unwrap();
    for k in [
        "root",
        "mount_tmpfs",
        "dummy_interface",
        "ip_forward",
        "hostname",
    ] {
        assert_eq!(
            nr.custom(k),
            "ok",
            "need_root check {k} on a warm VM: {}",
            nr.summary()
        );
    }
    // The guest's clock was set at the claim, not at the (earlier) boot.
    let (t0, t1) = nr.host_window();
    let date: f64 = nr
        .custom("date")
        .as_str()
        .unwrap_or("0")
        .parse()
        .unwrap_or(0.0);
    assert!(
        date >= t0 - 5.0 && date <= t1 + 5.0,
        "the grading script's date {date} is outside {t0}..{t1}"
    );
    let rs = results
        .iter()
        .find(|j| j.0["task"] == "run_student")
        .unwrap();
    let w = rs.custom("as_worker");
    assert!(
        w["stdout"] == "hello from the grader:4242\n" && w["code"] == 3,
        "run_student on warm VMs: {w}"
    );
    drop(g);
    let after = pool.status(&rt)["shapes"][0]["claims_total"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        after - before >= 2,
        "the grading containers took no pool VMs ({before} -> {after}):\n{}",
        pool.log_text()
    );
}
