//! A pooled VM's own process (`rootcell pool vm`, started by the server): boots the VM with an
//! empty share and a spare tap, each in namespaces of its own, waits to be claimed, then keeps
//! the VM for the container that claimed it until that container (or the VM) ends.
//!
//! Unclaimed, it ends its VM when the server ends, so a server killed with SIGKILL leaves
//! nothing behind; claimed, it no longer depends on the server at all.

use super::{
    Handover, HolderReply, HolderRequest, Shape, CARD_MTU, CLAIM_SOCKET, POOL_NICE, TAP_NAME,
};
use crate::hypervisor::{NetCard, Vm, VmConfig};
use crate::pidfd::Pidfd;
use crate::{paths, share};
use anyhow::{anyhow, bail, Context, Result};
use rootcell_protocol::net::MacAddr;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering::SeqCst};
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// Arguments of `rootcell pool vm`.
#[derive(Debug, Clone)]
pub struct HolderArgs {
    /// The VM's name in the pool.
    pub name: String,
    /// Its run dir (created here).
    pub run_dir: PathBuf,
    /// Its shape.
    pub shape: Shape,
    /// The server's pid: unclaimed, the VM ends when the server does.
    pub server_pid: i32,
}

/// What a holder tells the server on its stdout, one JSON line each.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HolderNews {
    /// Booted and waiting for a claim.
    Ready,
    /// Claimed by the sandbox with this pid.
    Claimed(i32),
    /// Could not boot.
    Failed(String),
}

/// Bytes of blank room the server leaves at the end of a holder's command line
/// (`--claimed-for <spaces>`) for the state dir of the container that claims it: Docker's is
/// about 95 (`/run/docker/runtime-runc/moby/<64 hex>`).
pub const CLAIM_ROOM: usize = 256;

/// A pooled VM's fate, decided once: claimed by a container, or ended with the pool.
const UNCLAIMED: u8 = 0;
const CLAIMED: u8 = 1;
const ENDING: u8 = 2;

/// Events of the holder's main loop.
enum Ev {
    VmStopped(i32),
    ServerGone,
    Signal(i32),
    Conn(UnixStream),
    ClaimantGone,
}

/// Runs the holder; returns its exit status.
pub fn main(args: HolderArgs) -> i32 {
    let news = |n: HolderNews| {
        let mut line = serde_json::to_vec(&n).unwrap_or_default();
        line.push(b'\n');
        // The server may be gone; the VM's fate does not depend on this line.
        let mut out = std::io::stdout();
        let _ = out.write_all(&line).and_then(|()| out.flush());
    };
    let status = match run(&args, &news) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(vm = args.name, "{e:#}");
            news(HolderNews::Failed(format!("{e:#}")));
            1
        }
    };
    // Whatever happened, the VM's directory goes with it.
    remove_dir(&args.run_dir);
    status
}

/// Removes the VM's directory (idempotent). The share is mounted only in this process's
/// namespace; detached first all the same.
fn remove_dir(run_dir: &Path) {
    let share_dir = run_dir.join(paths::SHARE_DIR);
    let _ = nix::mount::umount2(&share_dir, nix::mount::MntFlags::MNT_DETACH);
    let _ = share::remove_run_dir(run_dir);
}

fn run(args: &HolderArgs, news: &dyn Fn(HolderNews)) -> Result<()> {
    // Single-threaded still: namespaces first, and the signals every thread must not take.
    share::isolate_mounts()?;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .context("cannot create the VM's network namespace")?;
    let mut signals = nix::sys::signal::SigSet::empty();
    for s in [
        nix::sys::signal::SIGTERM,
        nix::sys::signal::SIGINT,
        nix::sys::signal::SIGHUP,
    ] {
        signals.add(s);
    }
    signals.thread_block().context("cannot block signals")?;
    // Before any thread or the hypervisor exists: they inherit it.
    set_nice(0, POOL_NICE);
    let server = Pidfd::open(args.server_pid, 0)
        .with_context(|| format!("the pool server (pid {}) is gone", args.server_pid))?;
    let _ = std::fs::write(
        args.run_dir.join("holder.pid"),
        std::process::id().to_string(),
    );

    let share_dir = args.run_dir.join(paths::SHARE_DIR);
    share::build_empty(&share_dir)?;
    let tap = rootcell_net::spare_tap(TAP_NAME).context("cannot make the VM's tap")?;
    let card_mac = random_mac();
    let opened = crate::hypervisor::open()?;
    let hv_name = opened.hypervisor.name();
    let cfg = VmConfig {
        kernel: opened.images.kernel.clone(),
        initrd: opened.images.initrd.clone(),
        memory_mib: args.shape.memory_mib,
        vcpus: args.shape.vcpus,
        cmdline: crate::sandbox::kernel_cmdline(),
        console_log: args.run_dir.join("console.log"),
        hypervisor_log: args.run_dir.join(format!("{hv_name}.log")),
        socket_dir: args.run_dir.clone(),
        // Named for the pool (its VM dir): no container has it yet.
        owner: args.run_dir.clone(),
        vsock_uds: args.run_dir.join(paths::VSOCK_UDS),
        guest_cid: crate::sandbox::GUEST_CID,
        share_dir: share_dir.clone(),
        share_tag: rootcell_protocol::SHARE_TAG.to_string(),
        nets: vec![NetCard {
            tap_fd: tap.as_raw_fd(),
            mac: card_mac,
            mtu: CARD_MTU,
        }],
    };
    tracing::info!(vm = args.name, hypervisor = hv_name, shape = %args.shape, "booting a pool VM");
    let started = std::time::Instant::now();
    let vm: Arc<dyn Vm> = Arc::from(opened.hypervisor.start(&cfg)?);
    // The hypervisor holds the tap now.
    drop(tap);
    let result = serve(args, &cfg, &vm, server, card_mac, started, news, &signals);
    vm.kill();
    // While the hypervisor dies (tens of ms: its memory is freed), its directory goes: nothing
    // in it is used any more (sockets and logs may go while open; the share is detached
    // lazily). The claimant waits for this process's end, so it waits for the longer of the
    // two, not their sum.
    remove_dir(&args.run_dir);
    // Killed: nothing to wait for but the hypervisor's exit itself.
    vm.finish(Duration::ZERO);
    result
}

/// Waits for the agent, then for a claim, then for the end of the VM or of its claimant.
#[allow(clippy::too_many_arguments)]
fn serve(
    args: &HolderArgs,
    cfg: &VmConfig,
    vm: &Arc<dyn Vm>,
    server: Pidfd,
    card_mac: MacAddr,
    started: std::time::Instant,
    news: &dyn Fn(HolderNews),
    signals: &nix::sys::signal::SigSet,
) -> Result<()> {
    // Watched from the start: a server or a signal that ends the pool while the VM still boots
    // ends the boot too (the wait for the agent sees the VM stop).
    let fate = Arc::new(AtomicU8::new(UNCLAIMED));
    let (tx, rx) = mpsc::channel();
    let t = tx.clone();
    let (v, f) = (vm.clone(), fate.clone());
    std::thread::spawn(move || {
        server.wait(None);
        // Unless it was claimed first, the VM is nobody's now.
        if f.compare_exchange(UNCLAIMED, ENDING, SeqCst, SeqCst)
            .is_ok()
        {
            v.kill();
        }
        let _ = t.send(Ev::ServerGone);
    });
    let t = tx.clone();
    let set = *signals;
    let v = vm.clone();
    std::thread::spawn(move || loop {
        if let Ok(sig) = set.wait() {
            v.kill();
            let _ = t.send(Ev::Signal(sig as i32));
        }
    });
    if let Err(e) = crate::sandbox::await_agent(vm, cfg) {
        if let Ok(Ev::ServerGone | Ev::Signal(_)) = rx.recv_timeout(Duration::from_secs(1)) {
            tracing::info!(vm = args.name, "the pool is stopping: boot abandoned");
            return Ok(());
        }
        return Err(e);
    }
    tracing::info!(
        vm = args.name,
        boot_ms = started.elapsed().as_millis() as u64,
        "pool VM ready"
    );
    let ready_since = super::now_secs();
    let claim_path = args.run_dir.join(CLAIM_SOCKET);
    let listener = UnixListener::bind(&claim_path)
        .with_context(|| format!("cannot listen on {}", claim_path.display()))?;
    std::fs::set_permissions(&claim_path, std::fs::Permissions::from_mode(0o600))?;

    let t = tx.clone();
    let v = vm.clone();
    std::thread::spawn(move || {
        let st = v.wait_stopped();
        let _ = t.send(Ev::VmStopped(st));
    });
    let t = tx.clone();
    std::thread::spawn(move || {
        for c in listener.incoming().flatten() {
            if t.send(Ev::Conn(c)).is_err() {
                return;
            }
        }
    });
    news(HolderNews::Ready);

    // Unclaimed.
    let (conn, claimant) = loop {
        match rx.recv() {
            Ok(Ev::Conn(c)) => match accept_claim(args, c, card_mac, ready_since, vm, &fate) {
                Ok(claimed) => break claimed,
                Err(e) => tracing::warn!(vm = args.name, "refused a claim: {e:#}"),
            },
            Ok(Ev::VmStopped(st)) => bail!("the VM stopped before it was claimed (hypervisor status {st}); last console lines:\n{}", crate::sandbox::tail_lines(&cfg.console_log, 10)),
            Ok(Ev::ServerGone) => {
                tracing::info!(vm = args.name, "the pool server is gone: ending the unclaimed VM");
                return Ok(());
            }
            Ok(Ev::Signal(sig)) => {
                tracing::info!(vm = args.name, sig, "ending the unclaimed VM");
                return Ok(());
            }
            Ok(Ev::ClaimantGone) | Err(_) => return Ok(()),
        }
    };
    let _ = std::fs::remove_file(&claim_path);
    news(HolderNews::Claimed(claimant.pid()));
    tracing::info!(vm = args.name, claimant = claimant.pid(), "claimed");

    // Claimed: the VM is the claimant's until it or the VM ends.
    let t = tx.clone();
    std::thread::spawn(move || {
        claimant.wait(None);
        let _ = t.send(Ev::ClaimantGone);
    });
    let t = tx.clone();
    let v = vm.clone();
    std::thread::spawn(move || {
        serve_claimant(conn, &*v);
        let _ = t.send(Ev::ClaimantGone);
    });
    drop(tx);
    loop {
        match rx.recv() {
            Ok(Ev::VmStopped(_)) | Ok(Ev::ClaimantGone) | Err(_) => return Ok(()),
            Ok(Ev::Signal(sig)) => {
                tracing::warn!(vm = args.name, sig, "signalled: ending the claimed VM");
                return Ok(());
            }
            // Late connections find no claim to make; the server no longer matters.
            Ok(Ev::Conn(_)) | Ok(Ev::ServerGone) => {}
        }
    }
}

/// Checks a claim and answers it; returns the connection (kept for pause requests) and the
/// claimant.
fn accept_claim(
    args: &HolderArgs,
    mut c: UnixStream,
    card_mac: MacAddr,
    ready_since: u64,
    vm: &Arc<dyn Vm>,
    fate: &AtomicU8,
) -> Result<(UnixStream, Pidfd)> {
    let path = args.run_dir.join(CLAIM_SOCKET);
    let _ = c.set_read_timeout(Some(crate::timeouts::QUICK));
    let req: HolderRequest =
        super::recv(&mut c, &path)?.ok_or_else(|| anyhow!("the claimant closed the connection"))?;
    let HolderRequest::Claim { pid, owner } = req else {
        bail!("expected a claim, got {req:?}");
    };
    let cred = nix::sys::socket::getsockopt(&c, nix::sys::socket::sockopt::PeerCredentials)
        .context("cannot read the claimant's credentials")?;
    if cred.pid() != pid || cred.uid() != nix::unistd::geteuid().as_raw() {
        let msg = format!(
            "claim for pid {pid} from pid {} uid {}",
            cred.pid(),
            cred.uid()
        );
        let _ = super::send(&mut c, &path, &HolderReply::Error(msg.clone()));
        bail!(msg);
    }
    let claimant = Pidfd::open(pid, 0).context("cannot watch the claimant")?;
    let me = std::process::id() as i32;
    let start = |p: i32| crate::state::proc_stat(p).map(|s| s.0).unwrap_or(0);
    let vm_pid = vm.pid().unwrap_or(me);
    let h = Handover {
        name: args.name.clone(),
        holder_pid: me,
        holder_pid_start: start(me),
        vm_pid,
        vm_pid_start: start(vm_pid),
        run_dir: args.run_dir.clone(),
        shape: args.shape,
        card_mac,
        netns: PathBuf::from(format!("/proc/{me}/ns/net")),
        ready_since,
    };
    // Claimed from here on, unless the server's end came first (then the VM is being ended).
    if fate
        .compare_exchange(UNCLAIMED, CLAIMED, SeqCst, SeqCst)
        .is_err()
        || vm.try_stopped().is_some()
    {
        let msg = "the pool is stopping and this VM with it".to_string();
        let _ = super::send(&mut c, &path, &HolderReply::Error(msg.clone()));
        bail!(msg);
    }
    // The container's now: it runs at the priority of everything else (threads are niced one
    // by one; the hypervisor's threads so far, and those it starts later inherit from them).
    for pid in [me, vm_pid] {
        renice_all(pid, 0);
    }
    // Named before the claimant hears of it: once its `create` returns, `ps` shows whose VM
    // this is.
    if let Some(owner) = owner {
        if let Err(e) = name_claimant(&owner) {
            tracing::warn!(vm = args.name, owner = %owner.display(), "cannot name the container on the holder's command line: {e}");
        }
    }
    super::send(&mut c, &path, &HolderReply::Claimed(h))?;
    let _ = c.set_read_timeout(None);
    Ok((c, claimant))
}

/// Writes `owner` (the claiming container's state dir) into the blank room at the end of this
/// process's command line (`--claimed-for <spaces>`, [`CLAIM_ROOM`]), in place: the holder keeps
/// that container's VM from now on, and `ps` (an admin, the tests' leftover check) must tell
/// whose it is. Through /proc/self/mem, at the place /proc/self/stat gives for the arguments'
/// end; the arguments cannot grow (PR_SET_MM could move them, but needs CAP_SYS_RESOURCE, which
/// some hosts' root lacks). The VMM process under the holder keeps the pool VM's name (its
/// command line is QEMU's own), and dies with the holder.
fn name_claimant(owner: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the command name, from the third (state) on; arg_end is the 49th.
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or_else(|| bad("no command name in /proc/self/stat"))?;
    let arg_end: u64 = rest
        .split_whitespace()
        .nth(49 - 3)
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| bad("no arg_end in /proc/self/stat"))?;
    let room = CLAIM_ROOM as u64;
    // NUL, the room, NUL: only a command line that ends in the room is written.
    let at = arg_end
        .checked_sub(room + 2)
        .ok_or_else(|| bad("command line too short"))?;
    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/proc/self/mem")?;
    let mut now = vec![0u8; CLAIM_ROOM + 2];
    mem.read_exact_at(&mut now, at)?;
    if now[0] != 0 || now[CLAIM_ROOM + 1] != 0 || now[1..=CLAIM_ROOM].iter().any(|&b| b != b' ') {
        return Err(bad("the command line does not end in blank room"));
    }
    mem.write_all_at(&fill_room(owner.as_os_str().as_encoded_bytes()), at + 1)
}

/// `owner` in [`CLAIM_ROOM`] bytes, padded with spaces (no NUL: it stays one argument); one
/// too long keeps its end (the id) after `...`.
pub(crate) fn fill_room(owner: &[u8]) -> Vec<u8> {
    let mut text = if owner.len() > CLAIM_ROOM {
        let mut t = b"...".to_vec();
        t.extend_from_slice(&owner[owner.len() - (CLAIM_ROOM - 3)..]);
        t
    } else {
        owner.to_vec()
    };
    // A NUL would split the argument (a path holds none; a stray one becomes a space).
    for b in &mut text {
        if *b == 0 {
            *b = b' ';
        }
    }
    text.resize(CLAIM_ROOM, b' ');
    text
}

/// Answers the claimant's requests until it closes the connection.
fn serve_claimant(mut c: UnixStream, vm: &dyn Vm) {
    let path = Path::new("claimant");
    while let Ok(Some(req)) = super::recv::<HolderRequest>(&mut c, path) {
        let reply = match req {
            HolderRequest::Pause(p) => match vm.set_paused(p) {
                Ok(()) => HolderReply::Ok,
                Err(e) => HolderReply::Error(e.to_string()),
            },
            HolderRequest::Claim { .. } => HolderReply::Error("already claimed".into()),
        };
        if super::send(&mut c, path, &reply).is_err() {
            return;
        }
    }
}

/// A locally administered unicast MAC (the guest's until the container's replaces it).
fn random_mac() -> MacAddr {
    let mut b = [0u8; 6];
    let _ = getrandom(&mut b);
    b[0] = (b[0] & 0xfc) | 0x02;
    MacAddr(b)
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

/// Sets the nice value of thread `tid` (0: the calling thread); logged if it fails.
fn set_nice(tid: i32, nice: i32) {
    // SAFETY: setpriority(2) only changes a scheduling attribute of the given thread.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if r != 0 {
        tracing::warn!(
            tid,
            nice,
            "cannot set the nice value: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Sets the nice value of every thread of process `pid`.
fn renice_all(pid: i32, nice: i32) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for tid in tasks
        .flatten()
        .filter_map(|t| t.file_name().to_str()?.parse().ok())
    {
        set_nice(tid, nice);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_claimants_name_fills_the_room_and_keeps_its_id_when_too_long() {
        let short = fill_room(b"/run/docker/runtime-runc/moby/0123");
        assert_eq!(short.len(), CLAIM_ROOM);
        assert!(short.starts_with(b"/run/docker/runtime-runc/moby/0123 "));
        assert!(short[35..].iter().all(|&b| b == b' '));
        let long = [b"/r".repeat(200), b"/the-id".to_vec()].concat();
        let filled = fill_room(&long);
        assert_eq!(filled.len(), CLAIM_ROOM);
        assert!(filled.starts_with(b"...") && filled.ends_with(b"/the-id"));
        assert!(!fill_room(b"a\0b").contains(&0));
    }
}
