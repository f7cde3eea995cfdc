//! `rootcell pool serve`: keeps the configured number of VMs of each shape booted and
//! unclaimed, hands them out on its socket, and refills after each claim.

use super::holder::HolderNews;
use super::{
    BootKey, PoolConfig, ServerReply, ServerRequest, Shape, ShapeStatus, Status, CLAIM_SOCKET,
    SERVER_SOCKET,
};
use crate::commands::Global;
use crate::pidfd::Pidfd;
use anyhow::{bail, Context, Result};
use std::io::BufRead;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a VM handed out may wait for its claimant before it is ended (the claimant died
/// between asking and claiming): it is offered to no one else.
const HANDOUT_TIMEOUT: Duration = Duration::from_secs(15);
/// Boots of one shape that fail in a row before the server stops refilling it.
const MAX_FAILED_IN_A_ROW: u32 = 3;
/// How long unclaimed VMs get to end on shutdown before they are killed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Booting,
    Ready,
    /// Handed to a claimant at this instant, not yet claimed.
    HandedOut(Instant),
    Claimed,
}

#[derive(Debug)]
struct Slot {
    name: String,
    shape: usize,
    holder: Pidfd,
    run_dir: PathBuf,
    state: SlotState,
}

#[derive(Debug, Default)]
struct ShapeCounters {
    claims_total: u64,
    failed_boots: u64,
    failed_in_a_row: u32,
}

struct Pool {
    config: PoolConfig,
    slots: Vec<Slot>,
    counters: Vec<ShapeCounters>,
    next: u64,
    stopping: bool,
}

struct Server {
    pool: Mutex<Pool>,
    changed: Condvar,
    key: BootKey,
    dir: PathBuf,
    global: Global,
    /// The path this binary was started from, as the holders' `argv[0]` (for `ps` only).
    exe_name: std::ffi::OsString,
}

/// Runs the pool server until SIGTERM or SIGINT; returns the exit status.
pub fn serve(g: &Global) -> Result<i32> {
    let config = crate::hypervisor::select::config_from_env()?
        .pool
        .filter(|p| !p.vms.is_empty())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no pool is configured: add \"pool\": {{\"vms\": [{{\"memory_mib\": 512, \"vcpus\": 1, \"count\": 2}}]}} to {}",
                crate::hypervisor::select::config_path_from_env().0.display()
            )
        })?;
    for (i, v) in config.vms.iter().enumerate() {
        if v.memory_mib < 64 || v.vcpus == 0 || v.count == 0 {
            bail!("pool.vms[{i}]: memory_mib must be at least 64, vcpus and count at least 1 (got {v:?})");
        }
    }
    let dir = super::dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    super::check_trusted(&dir)?;
    let sock = dir.join(SERVER_SOCKET);
    if UnixStream::connect(&sock).is_ok() {
        bail!(
            "a pool server already serves {}; stop it first (rootcell pool status shows its pid)",
            sock.display()
        );
    }
    remove_stale(&dir);
    let _ = std::fs::remove_file(&sock);

    let mut signals = nix::sys::signal::SigSet::empty();
    for s in [nix::sys::signal::SIGTERM, nix::sys::signal::SIGINT] {
        signals.add(s);
    }
    signals.thread_block().context("cannot block signals")?;

    let (key, _) = BootKey::current()?;
    let listener = UnixListener::bind(&sock)
        .with_context(|| format!("cannot listen on {}", sock.display()))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
    tracing::info!(socket = %sock.display(), backend = key.backend, "VM pool serving: {}", config.vms.iter().map(|v| format!("{} x ({} MiB, {} vCPU)", v.count, v.memory_mib, v.vcpus)).collect::<Vec<_>>().join(", "));
    let counters = config
        .vms
        .iter()
        .map(|_| ShapeCounters::default())
        .collect();
    let server = Arc::new(Server {
        pool: Mutex::new(Pool {
            config,
            slots: Vec::new(),
            counters,
            next: 1,
            stopping: false,
        }),
        changed: Condvar::new(),
        key,
        dir: dir.clone(),
        global: g.clone(),
        exe_name: std::env::current_exe()
            .map(|p| p.into_os_string())
            .unwrap_or_else(|_| "rootcell".into()),
    });
    let s = server.clone();
    std::thread::spawn(move || refill(&s));
    let s = server.clone();
    std::thread::spawn(move || {
        for c in listener.incoming().flatten() {
            let s = s.clone();
            std::thread::spawn(move || answer(&s, c));
        }
    });
    let sig = signals.wait().context("cannot wait for signals")?;
    tracing::info!(signal = ?sig, "stopping the VM pool");
    let _ = std::fs::remove_file(&sock);
    shutdown(&server);
    Ok(0)
}

/// Keeps every shape at its count, booting at most `parallel_boots` at once.
fn refill(s: &Arc<Server>) {
    let mut pool = s.pool.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if pool.stopping {
            return;
        }
        let parallel = pool.config.parallel_boots.unwrap_or(1).max(1);
        let booting = pool
            .slots
            .iter()
            .filter(|x| x.state == SlotState::Booting)
            .count();
        let mut start = None;
        if booting < parallel {
            for (i, v) in pool.config.vms.iter().enumerate() {
                let have = pool
                    .slots
                    .iter()
                    .filter(|x| {
                        x.shape == i && matches!(x.state, SlotState::Booting | SlotState::Ready)
                    })
                    .count();
                if have < v.count && pool.counters[i].failed_in_a_row < MAX_FAILED_IN_A_ROW {
                    start = Some(i);
                    break;
                }
            }
        }
        // VMs handed out but never claimed are of no use to anyone.
        for slot in &pool.slots {
            if let SlotState::HandedOut(at) = slot.state {
                if at.elapsed() > HANDOUT_TIMEOUT {
                    tracing::warn!(
                        vm = slot.name,
                        "handed out but not claimed in time: ending it"
                    );
                    let _ = slot.holder.signal(libc::SIGTERM);
                }
            }
        }
        match start {
            Some(i) => {
                let n = pool.next;
                pool.next += 1;
                let shape = Shape {
                    memory_mib: pool.config.vms[i].memory_mib,
                    vcpus: pool.config.vms[i].vcpus,
                };
                match spawn_holder(s, &format!("vm-{n}"), shape, i) {
                    Ok(slot) => pool.slots.push(slot),
                    Err(e) => {
                        tracing::error!("cannot start a pool VM: {e:#}");
                        pool.counters[i].failed_boots += 1;
                        pool.counters[i].failed_in_a_row += 1;
                    }
                }
            }
            None => {
                pool = s
                    .changed
                    .wait_timeout(pool, Duration::from_secs(1))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
    }
}

/// Starts a holder and the thread that follows its news.
fn spawn_holder(s: &Arc<Server>, name: &str, shape: Shape, index: usize) -> Result<Slot> {
    let run_dir = s.dir.join(name);
    let _ = crate::share::remove_run_dir(&run_dir);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    // Holders run the very binary the server runs, even once its path has been replaced or
    // removed (a rebuild or an upgrade under a running pool): /proc/self/exe names that file
    // itself, not its path, and the child opens it before its exec, while it is still a copy
    // of this process. A new binary serves after a restart of the pool.
    let mut cmd = Command::new("/proc/self/exe");
    std::os::unix::process::CommandExt::arg0(&mut cmd, &s.exe_name);
    cmd.args(s.global.args())
        .args(["pool", "vm", "--name", name, "--run-dir"])
        .arg(&run_dir)
        .args(["--memory-mib", &shape.memory_mib.to_string()])
        .args(["--vcpus", &shape.vcpus.to_string()])
        .args(["--server-pid", &std::process::id().to_string()])
        // Last: the room a claim fills in place (see `holder::name_claimant`).
        .args(["--claimed-for", &" ".repeat(super::holder::CLAIM_ROOM)])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    // Nobody waits for a pool VM's boot, and it runs at nice 10 (see POOL_NICE): on a busy host
    // it may take far longer than a container's own boot may. Unless the user bounded boots.
    if std::env::var_os("ROOTCELL_BOOT_TIMEOUT").is_none() {
        cmd.env(
            "ROOTCELL_BOOT_TIMEOUT",
            super::POOL_BOOT_TIMEOUT.as_secs().to_string(),
        );
    }
    // Its own process group: a Ctrl-C meant for the server must not reach claimed VMs.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child: Child = cmd.spawn().context("cannot start rootcell pool vm")?;
    let pid = child.id() as i32;
    let holder = Pidfd::open(pid, 0).context("cannot watch the pool VM's process")?;
    let out = child.stdout.take();
    let s2 = s.clone();
    let name2 = name.to_string();
    std::thread::spawn(move || {
        let mut booted = false;
        if let Some(out) = out {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<HolderNews>(&line) {
                    Ok(HolderNews::Ready) => {
                        booted = true;
                        set_state(&s2, &name2, SlotState::Ready);
                    }
                    Ok(HolderNews::Claimed(by)) => {
                        tracing::info!(vm = name2, sandbox = by, "pool VM claimed");
                        set_state(&s2, &name2, SlotState::Claimed);
                    }
                    Ok(HolderNews::Failed(e)) => {
                        tracing::error!(vm = name2, "pool VM failed: {e}")
                    }
                    Err(_) => {}
                }
            }
        }
        let status = child.wait().ok();
        let mut pool = s2.pool.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = pool.slots.iter().position(|x| x.name == name2) {
            let slot = pool.slots.remove(i);
            let stopping = pool.stopping;
            let c = &mut pool.counters[slot.shape];
            if booted {
                c.failed_in_a_row = 0;
            } else if !stopping {
                c.failed_boots += 1;
                c.failed_in_a_row += 1;
                tracing::error!(vm = name2, ?status, "pool VM ended before it was ready");
            }
            tracing::debug!(vm = name2, ?status, "pool VM process ended");
        }
        s2.changed.notify_all();
    });
    tracing::info!(vm = name, holder = pid, shape = %shape, "booting pool VM");
    Ok(Slot {
        name: name.to_string(),
        shape: index,
        holder,
        run_dir,
        state: SlotState::Booting,
    })
}

fn set_state(s: &Server, name: &str, state: SlotState) {
    let mut pool = s.pool.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(slot) = pool.slots.iter_mut().find(|x| x.name == name) {
        // A VM handed out stays so until it is claimed.
        if !(state == SlotState::Ready && matches!(slot.state, SlotState::HandedOut(_))) {
            slot.state = state;
        }
    }
    s.changed.notify_all();
}

/// Answers one connection's request.
fn answer(s: &Server, mut c: UnixStream) {
    let path = s.dir.join(SERVER_SOCKET);
    let _ = c.set_read_timeout(Some(crate::timeouts::QUICK));
    let reply = match super::recv::<ServerRequest>(&mut c, &path) {
        Ok(Some(ServerRequest::Take { key, need })) => take(s, &key, need),
        Ok(Some(ServerRequest::Status)) => ServerReply::Status(status(s)),
        Ok(None) => return,
        Err(e) => ServerReply::None {
            reason: e.to_string(),
        },
    };
    let _ = super::send(&mut c, &path, &reply);
}

/// Hands out the smallest ready VM that fits.
fn take(s: &Server, key: &BootKey, need: Shape) -> ServerReply {
    if *key != s.key {
        return ServerReply::None {
            reason: format!(
                "the pool's VMs boot differently ({} {} {}, kernel command line {:?}); restart the pool after changing the guest images or settings",
                s.key.backend,
                s.key.kernel.display(),
                s.key.initrd.display(),
                s.key.cmdline
            ),
        };
    }
    let mut pool = s.pool.lock().unwrap_or_else(|e| e.into_inner());
    let shapes: Vec<Shape> = pool
        .config
        .vms
        .iter()
        .map(|v| Shape {
            memory_mib: v.memory_mib,
            vcpus: v.vcpus,
        })
        .collect();
    let best = pool
        .slots
        .iter_mut()
        .filter(|x| x.state == SlotState::Ready && shapes[x.shape].fits(&need))
        .min_by_key(|x| shapes[x.shape].memory_mib);
    let Some(slot) = best else {
        let reason = if shapes.iter().any(|sh| sh.fits(&need)) {
            format!("no VM of a shape that fits ({need}) is ready yet")
        } else {
            format!("the pool has no shape that fits {need}")
        };
        return ServerReply::None { reason };
    };
    slot.state = SlotState::HandedOut(Instant::now());
    let reply = ServerReply::Vm {
        name: slot.name.clone(),
        socket: slot.run_dir.join(CLAIM_SOCKET),
    };
    let i = slot.shape;
    pool.counters[i].claims_total += 1;
    s.changed.notify_all();
    reply
}

fn status(s: &Server) -> Status {
    let pool = s.pool.lock().unwrap_or_else(|e| e.into_inner());
    let count = |i: usize, f: &dyn Fn(SlotState) -> bool| {
        pool.slots
            .iter()
            .filter(|x| x.shape == i && f(x.state))
            .count()
    };
    Status {
        pid: std::process::id(),
        backend: s.key.backend.clone(),
        shapes: pool
            .config
            .vms
            .iter()
            .enumerate()
            .map(|(i, v)| ShapeStatus {
                memory_mib: v.memory_mib,
                vcpus: v.vcpus,
                target: v.count,
                ready: count(i, &|st| st == SlotState::Ready),
                booting: count(i, &|st| st == SlotState::Booting),
                claimed: count(i, &|st| {
                    matches!(st, SlotState::Claimed | SlotState::HandedOut(_))
                }),
                claims_total: pool.counters[i].claims_total,
                failed_boots: pool.counters[i].failed_boots,
            })
            .collect(),
    }
}

/// Ends every unclaimed VM (claimed ones belong to their containers) and waits for them.
fn shutdown(s: &Server) {
    let mut pool = s.pool.lock().unwrap_or_else(|e| e.into_inner());
    pool.stopping = true;
    let unclaimed: Vec<(Pidfd, PathBuf)> = pool
        .slots
        .iter()
        .filter(|x| x.state != SlotState::Claimed)
        .filter_map(|x| {
            let _ = x.holder.signal(libc::SIGTERM);
            Pidfd::open(x.holder.pid(), 0)
                .ok()
                .map(|p| (p, x.run_dir.clone()))
        })
        .collect();
    drop(pool);
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    for (p, run_dir) in unclaimed {
        let left = deadline.saturating_duration_since(Instant::now());
        if !p.wait(Some(left)) {
            tracing::warn!(holder = p.pid(), "pool VM did not end in time: killing it");
            let _ = p.signal(libc::SIGKILL);
            p.wait(Some(Duration::from_secs(5)));
        }
        let _ = crate::share::remove_run_dir(&run_dir);
    }
}

/// Removes run dirs of VMs whose holder is gone (a server or holder killed with SIGKILL).
fn remove_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if !p.is_dir() {
            continue;
        }
        let alive = std::fs::read_to_string(p.join("holder.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .is_some_and(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.contains("pool\0vm\0"))
            });
        if !alive {
            tracing::info!(dir = %p.display(), "removing a stale pool VM dir");
            let _ = crate::share::remove_run_dir(&p);
        }
    }
}
