//! The container's stdio from what containerd gives (FIFO paths or `file://` URIs), and the
//! rootfs mounts containerd hands the shim.

use crate::runtime::Stdio3;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Opens an output (stdout, stderr): a FIFO whose reader containerd (or ctr) already holds or
/// is opening, or a `file://` URI. Empty means none.
pub fn open_output(uri: &str) -> std::io::Result<Option<File>> {
    if uri.is_empty() {
        return Ok(None);
    }
    if let Some(p) = uri.strip_prefix("file://") {
        if let Some(dir) = Path::new(p).parent() {
            std::fs::create_dir_all(dir)?;
        }
        return OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map(Some);
    }
    if uri.contains("://") {
        return Err(std::io::Error::other(format!(
            "stdio URI {uri} is not supported by the rootcell shim (FIFO paths and file:// are)"
        )));
    }
    // Non-blocking so that a reader that went away cannot hang the shim; a reader blocked in
    // its own open already counts. Blocking again afterwards, as the container expects.
    let f = match OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(uri)
    {
        Ok(f) => f,
        // No reader yet: open read-write, which does not wait, and keeps the FIFO usable.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(uri)?,
        Err(e) => return Err(e),
    };
    fcntl(f.as_raw_fd(), FcntlArg::F_SETFL(OFlag::empty())).map_err(std::io::Error::from)?;
    Ok(Some(f))
}

/// Opens the stdin FIFO for reading: a pipe whose read end is the container's stdin, fed by a
/// thread that waits for containerd's writer, copies, and closes the pipe at the writer's EOF
/// (so the container sees EOF when `ctr`'s stdin ends).
fn open_input(path: &str) -> std::io::Result<Option<File>> {
    if path.is_empty() {
        return Ok(None);
    }
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(std::io::Error::from)?;
    let path = path.to_string();
    std::thread::spawn(move || {
        let mut w = File::from(w);
        // Blocks until containerd opens the write side, as runc's shim does.
        match File::open(&path) {
            Ok(mut f) => {
                let _ = std::io::copy(&mut f, &mut w);
            }
            Err(e) => log::warn!("stdin {path}: {e}"),
        }
    });
    Ok(Some(File::from(r)))
}

/// The three stdio files for a process.
pub fn open(stdin: &str, stdout: &str, stderr: &str) -> std::io::Result<Stdio3> {
    Ok(Stdio3 {
        stdin: open_input(stdin)?,
        stdout: open_output(stdout)?,
        stderr: open_output(stderr)?,
    })
}

/// Unmounts what the shim mounted on a bundle's rootfs (nothing if it is not a mount point).
pub fn unmount_rootfs(rootfs: &Path) {
    for _ in 0..8 {
        if nix::mount::umount2(rootfs, nix::mount::MntFlags::MNT_DETACH).is_err() {
            break;
        }
    }
}
