//! Relays an OOM kill inside the guest to the container's host memory cgroup.
//!
//! containerd's runc shim learns of OOM kills only from the kernel, through the memory cgroup of
//! the container's pid (ours): the `memory.oom_control` eventfd on cgroup v1, the `oom_kill`
//! count in `memory.events` on v2. A kill inside the VM is invisible there, so the sandbox makes
//! the host kernel perform a real one in that cgroup, on a process that exists only for it:
//!
//! 1. a forked child joins the cgroup, and a second one that the OOM killer does not choose (a
//!    keeper, `oom_score_adj` -1000 where root may lower it); every other process of the cgroup (the sandbox, the VMM)
//!    moves to a sibling "holding" cgroup, so the OOM killer has no other choice and nothing of
//!    the VM ever waits on, or is killed by, the lowered limit (charges stay where they were);
//! 2. the limit is set just above the usage, with swap off for the cgroup (so the reclaim that
//!    precedes an OOM cannot push the VM's memory out to swap);
//! 3. the child touches memory until the cgroup's OOM killer kills it;
//! 4. the limit and swap setting are restored, the processes move back, the holding cgroup goes,
//!    and the keeper exits.
//!
//! The keeper is there because the cgroup must never be empty while the container lives: on
//! cgroup v2 containerd's runc shim stops watching a cgroup's `memory.events` for good once it
//! finds the cgroup unpopulated after a wake-up (containerd/cgroups' `waitForEvents`), so
//! between the child's death and the processes' return it could read the count before the kill
//! and then stop, and report neither this OOM kill nor any later one (Docker 26 with containerd
//! 1.7 in the nested lane's L1 once got no `oom` event).
//!
//! A failure on the way undoes what was done, in reverse order; if the limit cannot be restored
//! the processes stay in the holding cgroup rather than under a limit the VM would hit.

use crate::cgroup::{relative, CGROUP_ROOT};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Room above the usage for the child: reached at once, as nothing else charges the cgroup.
const HEADROOM: u64 = 4 << 20;
/// How long the child may take to be killed (a loaded host included).
const KILL_TIMEOUT: Duration = Duration::from_secs(20);
/// Suffix of the holding cgroup's name, next to the container's.
pub const HOLDING_SUFFIX: &str = ".oom-relay";

/// The control files of one memory cgroup.
struct MemoryCgroup {
    dir: PathBuf,
    limit: &'static str,
    usage: &'static str,
    /// The file and the value that keep the cgroup's reclaim from swapping.
    no_swap: (&'static str, &'static str),
}

impl MemoryCgroup {
    /// The memory cgroup of `cgroups_path` (cgroupfs or systemd form) under `root`: v2, or v1's memory
    /// hierarchy.
    fn find(root: &Path, cgroups_path: &str) -> Option<Self> {
        let rel = relative(cgroups_path)?;
        let v2 = root.join(&rel);
        if v2.join("memory.events").exists() && v2.join("memory.max").exists() {
            return Some(Self {
                dir: v2,
                limit: "memory.max",
                usage: "memory.current",
                no_swap: ("memory.swap.max", "0"),
            });
        }
        let v1 = root.join("memory").join(rel);
        v1.join("memory.oom_control").exists().then_some(Self {
            dir: v1,
            limit: "memory.limit_in_bytes",
            usage: "memory.usage_in_bytes",
            no_swap: ("memory.swappiness", "0"),
        })
    }

    /// The sibling cgroup the other processes wait in.
    fn holding_dir(&self) -> PathBuf {
        let mut name = self.dir.file_name().unwrap_or_default().to_os_string();
        name.push(HOLDING_SUFFIX);
        self.dir.with_file_name(name)
    }

    fn read(&self, file: &str) -> Result<String> {
        read_trimmed(&self.dir.join(file))
    }

    fn write(&self, file: &str, value: &str) -> Result<()> {
        write_value(&self.dir.join(file), value)
    }

    /// Lowers the limit to usage + `headroom` with swap off; returns what to restore.
    fn lower_limit(&self, headroom: u64) -> Result<Saved> {
        let limit = self.read(self.limit)?;
        // Absent when the kernel has no swap accounting: then there is nothing to turn off.
        let swap = self.read(self.no_swap.0).ok();
        if swap.is_some() {
            self.write(self.no_swap.0, self.no_swap.1)?;
        }
        let saved = Saved { limit, swap };
        let lowered = self
            .read(self.usage)
            .and_then(|u| u.parse::<u64>().context("memory usage is not a number"))
            .and_then(|usage| self.write(self.limit, &(usage + headroom).to_string()));
        if let Err(e) = lowered {
            self.restore(&saved)?;
            return Err(e);
        }
        Ok(saved)
    }

    /// Puts back what [`MemoryCgroup::lower_limit`] changed (the limit first).
    fn restore(&self, saved: &Saved) -> Result<()> {
        self.write(self.limit, &saved.limit)?;
        if let Some(swap) = &saved.swap {
            self.write(self.no_swap.0, swap)?;
        }
        Ok(())
    }
}

/// The settings [`MemoryCgroup::lower_limit`] changed.
struct Saved {
    limit: String,
    swap: Option<String>,
}

fn read_trimmed(p: &Path) -> Result<String> {
    Ok(std::fs::read_to_string(p)
        .with_context(|| format!("cannot read {}", p.display()))?
        .trim()
        .to_string())
}

fn write_value(p: &Path, value: &str) -> Result<()> {
    std::fs::write(p, value).with_context(|| format!("cannot write {value} to {}", p.display()))
}

fn procs(dir: &Path) -> Result<Vec<u32>> {
    Ok(read_trimmed(&dir.join("cgroup.procs"))?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect())
}

/// Moves every process of `from` except those in `keep` to `to`; a process that exits meanwhile
/// is fine.
fn move_all(from: &Path, to: &Path, keep: &[u32]) -> Result<()> {
    // A process forked while we move lands in `from` too: go round until it is empty.
    for _ in 0..10 {
        let left: Vec<u32> = procs(from)?
            .into_iter()
            .filter(|p| !keep.contains(p))
            .collect();
        if left.is_empty() {
            return Ok(());
        }
        for pid in left {
            match std::fs::write(to.join("cgroup.procs"), pid.to_string()) {
                Err(e) if e.raw_os_error() != Some(libc::ESRCH) => {
                    return Err(e)
                        .with_context(|| format!("cannot move pid {pid} to {}", to.display()))
                }
                _ => {}
            }
        }
    }
    bail!("processes kept appearing in {}", from.display())
}

/// The holding cgroup; dropping it moves its processes back and removes it, unless `keep`.
struct Holding<'a> {
    home: &'a Path,
    dir: PathBuf,
    keep: bool,
}

impl<'a> Holding<'a> {
    fn create(cg: &'a MemoryCgroup) -> Result<Self> {
        let dir = cg.holding_dir();
        match std::fs::create_dir(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(e).with_context(|| format!("cannot create {}", dir.display()))
            }
            _ => {}
        }
        Ok(Self {
            home: &cg.dir,
            dir,
            keep: false,
        })
    }
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        if self.keep {
            tracing::error!(
                holding = %self.dir.display(),
                "the VM's processes stay in the holding cgroup: their own limit could not be restored"
            );
            return;
        }
        if let Err(e) = move_all(&self.dir, self.home, &[]) {
            tracing::error!("cannot move the VM's processes back: {e:#}");
            return;
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Least time between two relays into one cgroup. The guest says when an OOM kill happened, and
/// a compromised guest can say it as often as it likes: each relay forks a process that the
/// host kernel OOM-kills, with the cgroup's processes moved and its limit lowered meanwhile.
/// Kills closer together than this are relayed as one (Docker's `OOMKilled` and its `oom` event
/// need one), so a flood of events costs the host at most one relay a second.
const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// When each cgroup last had a relay (the sandbox serves one container; a map keeps it right
/// if it ever serves more).
static LAST_RELAY: std::sync::Mutex<Vec<(String, Instant)>> = std::sync::Mutex::new(Vec::new());

/// Whether a relay into `key` may run at `now`; records it if so. Otherwise returns how long
/// ago the last one ran.
fn admit(last: &mut Vec<(String, Instant)>, key: &str, now: Instant) -> Result<(), Duration> {
    match last.iter_mut().find(|(k, _)| k == key) {
        Some((_, at)) if now.saturating_duration_since(*at) < MIN_INTERVAL => {
            Err(now.saturating_duration_since(*at))
        }
        Some((_, at)) => {
            *at = now;
            Ok(())
        }
        None => {
            last.push((key.to_string(), now));
            Ok(())
        }
    }
}

/// Makes the kernel OOM-kill one sacrificial process in the memory cgroup of `cgroups_path`,
/// at most once per `MIN_INTERVAL` (a kill reported sooner is covered by the last relay).
pub fn relay(cgroups_path: &str) -> Result<()> {
    let admitted = {
        let mut last = LAST_RELAY.lock().unwrap_or_else(|e| e.into_inner());
        admit(&mut last, cgroups_path, Instant::now())
    };
    if let Err(ago) = admitted {
        tracing::info!(
            cgroup = cgroups_path,
            "OOM kill coalesced with the relay {} ms ago",
            ago.as_millis()
        );
        return Ok(());
    }
    let Some(cg) = MemoryCgroup::find(Path::new(CGROUP_ROOT), cgroups_path) else {
        bail!("no memory cgroup for {cgroups_path:?}");
    };
    relay_in(&cg)
}

fn relay_in(cg: &MemoryCgroup) -> Result<()> {
    // Dropped last (after `holding` has moved the processes back): the cgroup is never empty.
    let keeper = Helper::spawn(Role::Keeper)?;
    write_value(&cg.dir.join("cgroup.procs"), &keeper.pid.to_string())?;
    let child = Helper::spawn(Role::Sacrifice)?;
    write_value(&cg.dir.join("cgroup.procs"), &child.pid.to_string())?;
    let mut holding = Holding::create(cg)?;
    move_all(
        &cg.dir,
        &holding.dir,
        &[child.pid as u32, keeper.pid as u32],
    )?;
    let saved = cg.lower_limit(HEADROOM)?;
    // The child never needs more than all the cgroup's charges could be (all reclaimable) plus
    // the headroom; the bound keeps a cgroup whose limit does not work from being exhausted.
    let bound = cg.read(cg.usage)?.parse::<u64>().unwrap_or(0) + 2 * HEADROOM;
    let killed = child
        .go(bound)
        .and_then(|()| child.wait_killed(KILL_TIMEOUT));
    if let Err(e) = cg.restore(&saved) {
        holding.keep = true;
        return Err(e.context("cannot restore the memory limit after the OOM relay"));
    }
    killed
}

/// What a [`Helper`] child is for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    /// Allocates, when told, until it is killed: the OOM killer's first choice.
    Sacrifice,
    /// Waits, never chosen by the OOM killer, until its pipe closes: keeps the cgroup populated.
    Keeper,
}

/// A forked child of the relay (see [`Role`]); killed and reaped when dropped.
struct Helper {
    pid: libc::pid_t,
    go: libc::c_int,
}

impl Helper {
    /// Forks the child and waits until it has set its OOM score (first choice, or never).
    fn spawn(role: Role) -> Result<Self> {
        let (ready_r, ready_w) = pipe()?;
        let (go_r, go_w) = match pipe() {
            Ok(p) => p,
            Err(e) => {
                close(&[ready_r, ready_w]);
                return Err(e);
            }
        };
        // SAFETY: the child only makes raw system calls (no allocation, no locks) and _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: in the child of fork, with the pipe ends it uses open.
            unsafe { helper_child(role, ready_w, go_r) }
        }
        close(&[ready_w, go_r]);
        if pid < 0 {
            close(&[ready_r, go_w]);
            return Err(std::io::Error::last_os_error()).context("fork");
        }
        let child = Self { pid, go: go_w };
        let mut b = 0u8;
        // SAFETY: reading one byte into a local from a pipe we own.
        let n = unsafe { libc::read(ready_r, (&mut b as *mut u8).cast(), 1) };
        close(&[ready_r]);
        if n != 1 {
            bail!("the OOM relay's {role:?} child did not start");
        }
        Ok(child)
    }

    /// Lets the child touch up to `bound` bytes.
    fn go(&self, bound: u64) -> Result<()> {
        let b = bound.to_ne_bytes();
        // SAFETY: writing 8 bytes from a local to a pipe we own.
        if unsafe { libc::write(self.go, b.as_ptr().cast(), b.len()) } != b.len() as isize {
            return Err(std::io::Error::last_os_error())
                .context("cannot start the OOM relay child");
        }
        Ok(())
    }

    /// Waits for the child to die of SIGKILL (the OOM killer's signal).
    fn wait_killed(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut status = 0;
            // SAFETY: waiting for our own child.
            let r = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
            if r == self.pid {
                if libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL {
                    return Ok(());
                }
                bail!("the OOM relay child ended without being OOM-killed (status {status:#x})");
            }
            if r < 0 {
                return Err(std::io::Error::last_os_error()).context("waitpid");
            }
            if Instant::now() > deadline {
                bail!("the OOM relay child was not OOM-killed within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        close(&[self.go]);
        // SAFETY: our child; reaped right after (an error if wait_killed reaped it already).
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

fn pipe() -> Result<(libc::c_int, libc::c_int)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe");
    }
    Ok((fds[0], fds[1]))
}

fn close(fds: &[libc::c_int]) {
    for fd in fds {
        // SAFETY: closing fds we own, once.
        unsafe { libc::close(*fd) };
    }
}

/// The child: dies with its parent, sets its OOM score (the sacrifice volunteers for the OOM
/// killer, the keeper is exempt from it), reports ready; the keeper then waits until its pipe
/// closes, the sacrifice waits for the bound and touches memory 1 MiB at a time up to it.
unsafe fn helper_child(role: Role, ready: libc::c_int, go: libc::c_int) -> ! {
    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    // The names the kernel log and ps give them.
    let (name, score): (&std::ffi::CStr, &[u8]) = match role {
        Role::Sacrifice => (c"rootcell-oom", b"1000"),
        Role::Keeper => (c"rootcell-oom-kp", b"-1000"),
    };
    libc::prctl(libc::PR_SET_NAME, name.as_ptr());
    let fd = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY);
    let set =
        fd >= 0 && libc::write(fd, score.as_ptr().cast(), score.len()) == score.len() as isize;
    // Lowering the score needs CAP_SYS_RESOURCE, which some hosts' root lacks: the keeper then
    // keeps the sandbox's, and the sacrifice (score 1000, and all the memory it touches) is
    // still the one the OOM killer picks.
    if !set && role == Role::Sacrifice {
        libc::_exit(2);
    }
    if fd >= 0 {
        libc::close(fd);
    }
    libc::write(ready, b"r".as_ptr().cast(), 1);
    let mut bound = [0u8; 8];
    if role == Role::Keeper {
        // Until the parent closes the pipe (or kills it).
        while libc::read(go, bound.as_mut_ptr().cast(), 8) > 0 {}
        libc::_exit(0);
    }
    if libc::read(go, bound.as_mut_ptr().cast(), 8) != 8 {
        libc::_exit(3);
    }
    const CHUNK: usize = 1 << 20;
    let chunks = u64::from_ne_bytes(bound).div_ceil(CHUNK as u64);
    for _ in 0..chunks {
        if !touch_new_memory(CHUNK) {
            libc::_exit(4);
        }
    }
    libc::_exit(5);
}

/// Maps `len` bytes of anonymous memory and writes to every page (raw system calls only).
unsafe fn touch_new_memory(len: usize) -> bool {
    let p = libc::mmap(
        std::ptr::null_mut(),
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
        0,
    );
    if p == libc::MAP_FAILED {
        return false;
    }
    libc::memset(p, 1, len);
    true
}

#[cfg(test)]
mod tests;
