//! Relays an OOM kill inside the guest to the container's host cgroup.
//!
//! containerd's runc shim learns of OOM only from the kernel, through the memory cgroup of the
//! container's pid (ours): the `memory.oom_control` eventfd on cgroup v1, the `oom_kill` count in
//! `memory.events` on v2. An OOM kill inside the VM is invisible there. So when the agent reports
//! one, the sandbox makes the host kernel see a real one in the same cgroup: a forked child that
//! marks itself the OOM killer's first choice (`oom_score_adj` 1000) allocates while the cgroup's
//! limit is held just above its usage, and is killed by the memory cgroup's OOM killer. The limit
//! is restored right after. Docker then reports the container as OOMKilled, as with runc.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Headroom above the current usage while the child allocates: small enough for the child to
/// reach it at once, large enough that the VMM's own allocations meanwhile rarely wait.
const HEADROOM: u64 = 8 << 20;
/// How long the child may take to be killed.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// The files of one memory cgroup.
struct MemoryCgroup {
    dir: PathBuf,
    limit: &'static str,
    usage: &'static str,
}

impl MemoryCgroup {
    /// The memory cgroup of `cgroups_path` (cgroupfs form), v2 or v1.
    fn find(root: &Path, cgroups_path: &str) -> Option<Self> {
        let rel = cgroups_path.trim_start_matches('/');
        if rel.is_empty() || rel.contains(':') || rel.split('/').any(|c| c == "..") {
            return None;
        }
        let v2 = root.join(rel);
        if v2.join("memory.events").exists() {
            return Some(Self { dir: v2, limit: "memory.max", usage: "memory.current" });
        }
        let v1 = root.join("memory").join(rel);
        v1.join("memory.oom_control").exists().then_some(Self {
            dir: v1,
            limit: "memory.limit_in_bytes",
            usage: "memory.usage_in_bytes",
        })
    }

    fn read(&self, file: &str) -> Result<String> {
        let p = self.dir.join(file);
        Ok(std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?.trim().to_string())
    }

    fn write(&self, file: &str, value: &str) -> Result<()> {
        let p = self.dir.join(file);
        std::fs::write(&p, value).with_context(|| format!("cannot write {value} to {}", p.display()))
    }
}

/// Makes the kernel OOM-kill one sacrificial process in the memory cgroup of `cgroups_path`.
pub fn relay(cgroups_path: &str) -> Result<()> {
    let Some(cg) = MemoryCgroup::find(Path::new("/sys/fs/cgroup"), cgroups_path) else {
        bail!("no memory cgroup for {cgroups_path:?}");
    };
    // With oom.group the kernel would kill the whole cgroup, VMM included.
    if cg.read("memory.oom.group").map(|v| v == "1").unwrap_or(false) {
        bail!("{} has memory.oom.group set; not relaying", cg.dir.display());
    }
    let old = cg.read(cg.limit)?;
    let child = Sacrifice::spawn()?;
    let usage: u64 = cg.read(cg.usage)?.parse().context("memory usage is not a number")?;
    let held = cg.write(cg.limit, &(usage + HEADROOM).to_string());
    let killed = held.and_then(|()| child.wait_killed(KILL_TIMEOUT));
    // Always put the limit back, whatever happened above.
    let restored = cg.write(cg.limit, &old);
    killed?;
    restored
}

/// A forked child that allocates until it is killed.
struct Sacrifice {
    pid: libc::pid_t,
}

impl Sacrifice {
    /// Forks the child and waits until it has made itself the OOM killer's first choice.
    fn spawn() -> Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two fds we then own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error()).context("pipe");
        }
        // SAFETY: the child only makes raw system calls (no allocation, no locks) and _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            unsafe { sacrifice_child(fds[1]) }
        }
        // SAFETY: closing our copy of the write end; reading one byte from the read end.
        unsafe { libc::close(fds[1]) };
        let mut b = 0u8;
        let n = unsafe { libc::read(fds[0], (&mut b as *mut u8).cast(), 1) };
        unsafe { libc::close(fds[0]) };
        if pid < 0 {
            return Err(std::io::Error::last_os_error()).context("fork");
        }
        let child = Self { pid };
        if n != 1 {
            bail!("the OOM relay child did not start");
        }
        Ok(child)
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
            if r < 0 || Instant::now() > deadline {
                bail!("the OOM relay child was not OOM-killed within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Sacrifice {
    fn drop(&mut self) {
        // SAFETY: our child; reaped right after (a no-op if wait_killed reaped it).
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

/// The child: dies with the sandbox, volunteers for the OOM killer, reports ready, then touches
/// memory 1 MiB at a time (bounded, so a cgroup without a working limit cannot be exhausted).
unsafe fn sacrifice_child(ready: libc::c_int) -> ! {
    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    let fd = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY);
    if fd < 0 || libc::write(fd, b"1000".as_ptr().cast(), 4) != 4 {
        libc::_exit(2);
    }
    libc::close(fd);
    libc::write(ready, b"r".as_ptr().cast(), 1);
    const CHUNK: usize = 1 << 20;
    for _ in 0..1024 {
        let p = libc::mmap(
            std::ptr::null_mut(),
            CHUNK,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            libc::_exit(3);
        }
        libc::memset(p, 1, CHUNK);
    }
    libc::_exit(4);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_v1_and_v2_memory_cgroups_and_refuses_odd_paths() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("memory/docker/a")).unwrap();
        std::fs::write(t.path().join("memory/docker/a/memory.oom_control"), "").unwrap();
        let v1 = MemoryCgroup::find(t.path(), "/docker/a").unwrap();
        assert_eq!((v1.dir, v1.limit), (t.path().join("memory/docker/a"), "memory.limit_in_bytes"));
        std::fs::create_dir_all(t.path().join("docker/b")).unwrap();
        std::fs::write(t.path().join("docker/b/memory.events"), "").unwrap();
        let v2 = MemoryCgroup::find(t.path(), "/docker/b").unwrap();
        assert_eq!((v2.dir, v2.limit), (t.path().join("docker/b"), "memory.max"));
        for bad in ["", "/", "system.slice:docker:x", "/docker/../etc", "/docker/none"] {
            assert!(MemoryCgroup::find(t.path(), bad).is_none(), "{bad}");
        }
    }
}
