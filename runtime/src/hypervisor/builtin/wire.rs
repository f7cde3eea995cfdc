//! What the sandbox and the built-in VMM's process say to each other on their control
//! socket: one JSON object per line. The sandbox sends a [`Launch`] first, then
//! [`Request`]s, one at a time; the VMM process answers [`Report`]s: [`Report::Started`] or
//! [`Report::Failed`] once, a [`Report::Done`] per pause or resume, and [`Report::Ended`]
//! last, when the guest ended the VM or a [`Request::Stop`] did (then it exits).

use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};
use std::path::PathBuf;

/// One virtio-net card: its tap is inherited by fd number.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetFd {
    /// The tap's descriptor in the VMM process.
    pub fd: i32,
    /// The card's MAC address.
    pub mac: [u8; 6],
    /// Its MTU.
    pub mtu: u16,
}

/// Everything the VMM process needs to build and start one container's VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Launch {
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: PathBuf,
    /// Kernel parameters beyond the VMM's own.
    pub cmdline: String,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// The serial console's file.
    pub console_log: PathBuf,
    /// The backend's diagnostics file (the VMM process logs there once the VM runs).
    pub hypervisor_log: PathBuf,
    /// The hybrid vsock socket.
    pub vsock_uds: PathBuf,
    /// Guest CID.
    pub guest_cid: u64,
    /// The virtio-fs share.
    pub share_dir: PathBuf,
    /// Its tag.
    pub share_tag: String,
    /// Serve the share from a root holding only it.
    pub share_root: bool,
    /// Network cards.
    pub nets: Vec<NetFd>,
    /// The sandbox's pid: the VMM process ends if it is no longer its parent.
    pub parent: i32,
}

/// A request of the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Freeze every vCPU and device.
    Pause,
    /// Thaw them.
    Resume,
    /// Stop the VM and exit.
    Stop,
}

/// Where a virtio-mmio device sits.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Slot {
    /// Register window base.
    pub base: u64,
    /// IRQ.
    pub irq: u32,
}

/// What the VMM process reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Report {
    /// The VM runs.
    Started {
        /// The guest's kernel command line.
        cmdline: String,
        /// The vsock device.
        vsock: Slot,
        /// The virtio-fs device.
        fs: Slot,
    },
    /// The VM could not start (the VMM's error); the process exits.
    Failed(String),
    /// A pause or resume is done, or failed.
    Done(Result<(), String>),
    /// The VM has ended and been stopped; the process exits.
    Ended {
        /// The exit status, shell convention ([`super::exit_status`]).
        status: i32,
        /// Lines for the backend's diagnostics file, in order.
        lines: Vec<String>,
    },
}

/// Writes `msg` as one line.
pub fn send<T: Serialize>(w: &mut impl Write, msg: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)
}

/// Reads one message; `None` at end of stream.
pub fn recv<T: for<'de> Deserialize<'de>>(r: &mut impl BufRead) -> std::io::Result<Option<T>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    serde_json::from_str(&line)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_one_per_line() {
        let mut buf = Vec::new();
        send(&mut buf, &Request::Pause).unwrap();
        send(
            &mut buf,
            &Report::Ended {
                status: 137,
                lines: vec!["guest exit: Stopped".into()],
            },
        )
        .unwrap();
        assert_eq!(buf.iter().filter(|&&b| b == b'\n').count(), 2);
        let mut r = std::io::BufReader::new(&buf[..]);
        assert_eq!(recv::<Request>(&mut r).unwrap(), Some(Request::Pause));
        match recv::<Report>(&mut r).unwrap() {
            Some(Report::Ended { status, lines }) => {
                assert_eq!(status, 137);
                assert_eq!(lines, ["guest exit: Stopped"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(recv::<Report>(&mut r).unwrap().is_none());
    }
}
