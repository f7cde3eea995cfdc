//! virtio-fs for the built-in VMM: the shared [`rootcell_fs::FsDevice`] (fuse-backend-rs
//! passthrough) behind the virtio-mmio transport.
//!
//! The device logic is built on older rust-vmm crates (fuse-backend-rs pins vm-memory 0.17), so
//! at activation the I/O thread builds a 0.17 view of the VMM's guest RAM mapping and 0.17
//! queues at the addresses the driver programmed, through [`rootcell_fs::bridge`]. Nothing is
//! copied or mapped twice; the view stays valid because the I/O thread also holds the VMM's
//! own handle on the same mapping.

use std::ops::RangeInclusive;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use rootcell_fs::bridge::{guest_memory_view, queue_from_layout, QueueLayout, RawRegion};
use rootcell_fs::fd_table::Relay;
use rootcell_fs::{FsConfig, FsDevice};
use virtio_bindings::virtio_ids::VIRTIO_ID_FS;
use virtio_queue::QueueT;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::epoll::Epoll;
use vmm_sys_util::eventfd::EventFd;

use super::worker::{unwatch, watch_all, Activation, DeviceWorker, QueueDevice, QueueWorker};
use super::{Interrupt, TransportFds};
use crate::memory::GuestMemoryMmap;

/// Longest tag the config space holds (`struct virtio_fs_config { u8 tag[36]; le32
/// num_request_queues; }`: virtio-bindings has no virtio_fs module).
pub const MAX_TAG_LEN: usize = 36;
/// Queue sizes: the high-priority queue (FORGET, INTERRUPT) and one request queue.
const QUEUE_SIZES: [u16; rootcell_fs::NUM_QUEUES] = [128, 1024];

/// Why a virtio-fs device could not be built.
#[derive(Debug, thiserror::Error)]
pub enum FsDeviceError {
    /// The tag is empty or longer than the config space allows.
    #[error("virtio-fs tag {0:?} must be 1..={MAX_TAG_LEN} bytes")]
    Tag(String),
    /// The share could not be opened.
    #[error(transparent)]
    Share(#[from] rootcell_fs::Error),
    /// The I/O thread could not be started.
    #[error("starting the virtio-fs I/O thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// The virtio-fs device as the transport sees it.
#[derive(Debug)]
pub struct VirtioFs {
    /// `struct virtio_fs_config { u8 tag[36]; le32 num_request_queues; }`.
    config: [u8; MAX_TAG_LEN + 4],
    io: QueueWorker,
    /// Made before the I/O thread took its own fd table, for the transport to take.
    transport_fds: Option<TransportFds>,
}

impl VirtioFs {
    /// Opens `config.shared_dir` for the guest to mount as `tag` and starts the I/O thread.
    pub fn new(config: &FsConfig, tag: &str) -> Result<Self, FsDeviceError> {
        Self::build(config, tag, None)
    }

    /// [`VirtioFs::new`], with the I/O thread serving from a mount namespace of its own whose
    /// root holds the share and nothing of the host's ([`rootcell_fs::share_root`]), and from
    /// an fd table of its own ([`rootcell_fs::fd_table`]): the process's fds (its logs, the
    /// control socket, taps, KVM's) are `/dev/null` there, so the passthrough's
    /// `/proc/self/fd`, the thread's own, reaches none of them. Each of `relay` (the log file
    /// the process's log writer holds) becomes a pipe in that table, copied to the original by
    /// a jailed "fs-log-relay" thread. Needs CAP_SYS_ADMIN. Mounts attached inside the share
    /// later reach it if the share is a shared mount in the caller's namespace.
    pub fn with_share_root(
        config: &FsConfig,
        tag: &str,
        relay: &[RawFd],
    ) -> Result<Self, FsDeviceError> {
        Self::build(config, tag, Some(relay))
    }

    fn build(config: &FsConfig, tag: &str, jail: Option<&[RawFd]>) -> Result<Self, FsDeviceError> {
        if tag.is_empty() || tag.len() > MAX_TAG_LEN {
            return Err(FsDeviceError::Tag(tag.to_owned()));
        }
        // With its own root the device is opened on the I/O thread (after its namespace and
        // the pivot); the share is checked here anyway, so a bad one fails now.
        let device = if jail.is_some() {
            rootcell_fs::check_shared_dir(&config.shared_dir)?;
            None
        } else {
            Some(FsDevice::new(config)?)
        };
        let mut space = [0u8; MAX_TAG_LEN + 4];
        space[..tag.len()].copy_from_slice(tag.as_bytes());
        let request_queues = (rootcell_fs::NUM_QUEUES - 1) as u32;
        space[MAX_TAG_LEN..].copy_from_slice(&request_queues.to_le_bytes());
        // With a table of its own, the thread's copy of the process's is taken when it
        // starts: everything it uses later must exist by then, in the caller's table.
        let (transport_fds, relays) = match jail {
            Some(relay) => {
                let fds = TransportFds::new(QUEUE_SIZES.len()).map_err(FsDeviceError::Thread)?;
                let relays = relay
                    .iter()
                    .map(|&fd| {
                        let confine: rootcell_fs::Confine = Box::new(|| {
                            RELAY_CONFINEMENT
                                .enter(None, None)
                                .map_err(std::io::Error::other)
                        });
                        Relay::start(fd, Some(confine))
                    })
                    .collect::<std::io::Result<Vec<_>>>()
                    .map_err(FsDeviceError::Thread)?;
                (Some(fds), relays)
            }
            None => (None, Vec::new()),
        };
        let own_fds = transport_fds.as_ref().map(|fds| OwnFds {
            keep: fds.raw_fds(),
            redirect: relays.iter().map(Relay::redirect).collect(),
        });
        let io = QueueWorker::spawn(
            "virtiofs-io",
            FsWorker {
                config: config.clone(),
                device,
                active: None,
                own_fds,
                own_table: false,
            },
            Some(crate::devices::virtio::worker::Confinement {
                filter: crate::seccomp::fs_io_filter,
                caps: crate::seccomp::FS_CAPS,
                kind: crate::jail::ThreadKind::Fs,
            }),
        )
        .map_err(FsDeviceError::Thread)?;
        // The thread holds its copies of the pipes now (or has failed): once its table goes,
        // the relays see their end.
        drop(relays);
        Ok(VirtioFs {
            config: space,
            io,
            transport_fds,
        })
    }
}

/// How the log relay thread confines itself: nothing but its two fds.
const RELAY_CONFINEMENT: crate::devices::virtio::worker::Confinement =
    crate::devices::virtio::worker::Confinement {
        filter: crate::seccomp::relay_filter,
        caps: &[],
        kind: crate::jail::ThreadKind::LogRelay,
    };

impl QueueDevice for VirtioFs {
    const DEVICE_TYPE: u32 = VIRTIO_ID_FS;
    const QUEUE_SIZES: &'static [u16] = &QUEUE_SIZES;
    // Queue indices must line up with the device's (hiprio first), so all must be ready.
    const QUEUES_NEEDED: (RangeInclusive<usize>, &'static str) = (
        QUEUE_SIZES.len()..=QUEUE_SIZES.len(),
        "virtio-fs needs its hiprio and request queues",
    );

    fn config_space(&self) -> &[u8] {
        &self.config
    }

    fn take_transport_fds(&mut self) -> Option<TransportFds> {
        self.transport_fds.take()
    }

    fn io(&mut self) -> &mut QueueWorker {
        &mut self.io
    }
}

/// One queue as the device logic sees it, with the eventfd the guest's notify lands on.
struct FsQueue {
    queue: rootcell_fs::virtio_queue::Queue,
    notify: Arc<EventFd>,
}

/// The queues and memory of an activated device.
struct Active {
    // Declared before `_mem`: the view must go before the mapping it borrows.
    view: rootcell_fs::vm_memory::GuestMemoryMmap,
    _mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<FsQueue>,
}

/// The I/O thread's state.
struct FsWorker {
    config: FsConfig,
    device: Option<FsDevice>,
    active: Option<Active>,
    /// Serving from [`rootcell_fs::share_root`]'s root and an fd table of its own (both set
    /// up in `on_thread`): what that table keeps besides the thread loop's own fds.
    own_fds: Option<OwnFds>,
    /// The thread has its own fd table.
    own_table: bool,
}

/// Numbers of the caller's table the I/O thread's own table keeps (the transport's eventfds,
/// which the transport owns and closes in the caller's table; the thread's copies go with its
/// table), and the log pipes' `(write end, log fd)` pairs ([`Relay::redirect`]).
struct OwnFds {
    keep: Vec<RawFd>,
    redirect: Vec<(RawFd, RawFd)>,
}

/// Describes every region of the VMM's guest RAM for [`guest_memory_view`].
fn raw_regions(mem: &GuestMemoryMmap) -> Result<Vec<RawRegion>, String> {
    mem.iter()
        .map(|r| {
            let host_addr = r
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| format!("host address of guest RAM: {e}"))?;
            Ok(RawRegion {
                guest_addr: r.start_addr().0,
                host_addr,
                len: r.len() as usize,
            })
        })
        .collect()
}

impl DeviceWorker for FsWorker {
    type Activation = Activation;

    fn start(&mut self, _epoll: &Epoll) -> std::io::Result<()> {
        Ok(())
    }

    fn on_thread(&mut self, held: &[RawFd]) -> Result<(), String> {
        let Some(own) = &self.own_fds else {
            return Ok(());
        };
        let keep: Vec<RawFd> = held.iter().chain(&own.keep).copied().collect();
        rootcell_fs::fd_table::unshare_keeping(&keep, &own.redirect)
            .map_err(|e| format!("giving the virtio-fs thread its own fds: {e}"))?;
        self.own_table = true;
        let fail =
            |e: std::io::Error| format!("giving the virtio-fs thread the share as root: {e}");
        // The passthrough opens /proc/self/{fd,mountinfo} after the pivot: the thread's own,
        // bound there, so it reopens inodes through this table alone.
        rootcell_fs::share_root::enter_with_own_fds(&self.config.shared_dir).map_err(fail)?;
        rootcell_fs::share_root::pivot().map_err(fail)?;
        self.config.shared_dir = rootcell_fs::share_root::SHARE_PATH.into();
        self.device = Some(FsDevice::new(&self.config).map_err(|e| e.to_string())?);
        Ok(())
    }

    fn has_own_fd_table(&self) -> bool {
        self.own_table
    }

    fn activate(&mut self, epoll: &Epoll, act: Activation) -> Result<(), String> {
        if self.device.is_none() {
            // A reset dropped the share and reopening it failed.
            self.device = Some(FsDevice::new(&self.config).map_err(|e| e.to_string())?);
        }
        let regions = raw_regions(&act.mem)?;
        // SAFETY: the regions are the live mappings of `act.mem`, which `Active` keeps (and
        // drops after the view), so they stay mapped for as long as the view exists.
        let view = unsafe { guest_memory_view(&regions) }.map_err(|e| e.to_string())?;
        let mut queues = Vec::with_capacity(act.queues.len());
        for (i, q) in act.queues.into_iter().enumerate() {
            let layout = QueueLayout {
                size: q.queue.size(),
                desc_table: q.queue.desc_table(),
                avail_ring: q.queue.avail_ring(),
                used_ring: q.queue.used_ring(),
                event_idx: act.event_idx,
            };
            let queue = queue_from_layout(&layout, q.queue.max_size())
                .map_err(|e| format!("queue {i}: {e}"))?;
            queues.push(FsQueue {
                queue,
                notify: q.notify,
            });
        }
        let fds: Vec<_> = queues
            .iter()
            .enumerate()
            .map(|(i, q)| (q.notify.as_raw_fd(), i as u64))
            .collect();
        watch_all(epoll, &fds)?;
        self.active = Some(Active {
            view,
            _mem: act.mem,
            interrupt: act.interrupt,
            queues,
        });
        Ok(())
    }

    fn reset(&mut self, epoll: &Epoll) -> bool {
        if let Some(a) = self.active.take() {
            for q in &a.queues {
                unwatch(epoll, q.notify.as_raw_fd());
            }
        }
        if self.own_fds.is_some() {
            // Its root is built for the one passthrough opened there: the same one forgets
            // every inode and handle the old driver held instead.
            if let Some(d) = &self.device {
                d.forget_all();
            }
            return true;
        }
        // A fresh passthrough forgets every inode the old driver held (one fd each); it is
        // reopened now, or at the next activation if the share is unavailable right now.
        self.device = None;
        self.device = FsDevice::new(&self.config).ok();
        true
    }

    fn on_event(&mut self, _epoll: &Epoll, token: u64) {
        let (Some(device), Some(a)) = (&self.device, self.active.as_mut()) else {
            return;
        };
        let Some(q) = a.queues.get_mut(token as usize) else {
            return;
        };
        let _ = q.notify.read();
        match device.process_queue(&a.view, &mut q.queue) {
            Ok(true) => {
                if let Err(e) = a.interrupt.signal_used_queue() {
                    log::warn!("virtio-fs interrupt: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => log::warn!("virtio-fs queue {token}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &std::path::Path) -> std::collections::BTreeSet<String> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// With `with_share_root`, the I/O thread's root holds the share and `/proc/self` only,
    /// its mount namespace is its own, it runs under its filter, and a device reset (which
    /// cannot open a new passthrough there) still works; its fd table is its own and holds the
    /// transport's eventfds at their numbers and no host file outside the share (what it
    /// holds of the process's is in `vmm/tests/virtio_fs.rs`). Needs root.
    #[test]
    fn the_io_thread_serves_from_a_root_holding_only_the_share_and_its_own_fds() {
        if !rootcell_test_support::require_root("virtio-fs thread's root and fds") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let share = tmp.path().join("share");
        std::fs::create_dir(&share).unwrap();
        let marker = format!("marker-{}", std::process::id());
        std::fs::write(share.join(&marker), b"x").unwrap();
        let started = std::time::Instant::now();
        let mut dev = VirtioFs::with_share_root(
            &FsConfig {
                shared_dir: share,
                read_only: false,
            },
            "t",
            &[],
        )
        .unwrap();
        eprintln!(
            "virtio-fs device with its jailed thread built in {:?}",
            started.elapsed()
        );
        let ours = std::fs::read_link("/proc/thread-self/ns/mnt").unwrap();
        // Other tests may run I/O threads of the same name: ours is the one with our marker.
        let io = rootcell_test_support::thread_holding(
            "virtiofs-io",
            &std::path::Path::new("share").join(&marker),
        )
        .expect("the I/O thread, serving our share under /share");
        let root = io.join("root");
        assert_eq!(
            names(&root),
            ["proc".to_string(), "share".to_string()].into()
        );
        assert_eq!(names(&root.join("..")), names(&root));
        assert_ne!(std::fs::read_link(io.join("ns/mnt")).unwrap(), ours);
        let status = std::fs::read_to_string(io.join("status")).unwrap();
        assert!(status.contains("Seccomp:\t2"), "{status}");

        let table = rootcell_test_support::fd_targets(&io.join("fd"));
        for fd in dev.transport_fds.as_ref().unwrap().raw_fds() {
            assert_eq!(
                table.get(&fd).map(String::as_str),
                Some("anon_inode:[eventfd]"),
                "transport eventfd {fd}: {table:?}"
            );
        }
        // Besides /dev/null and anonymous inodes (epoll, eventfds), only what the passthrough
        // opened in its root (the share, its /proc/self/fd and mountinfo).
        let host: Vec<_> = table
            .iter()
            .filter(|(_, t)| {
                t.as_str() != "/dev/null"
                    && !t.starts_with("anon_inode:")
                    && !t.starts_with("/share")
                    && !t.starts_with("/proc/self/")
            })
            .collect();
        assert!(
            host.is_empty(),
            "host files in the thread's table: {host:?}"
        );

        // A reset forgets everything through the same passthrough; the thread survives it.
        assert!(dev.io().reset(), "reset answered");
        assert!(io.join("status").exists(), "the I/O thread is still there");
        drop(dev);
    }
}
