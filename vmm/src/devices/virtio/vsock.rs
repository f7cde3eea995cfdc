//! virtio-vsock for the built-in VMM: the shared [`rootcell_vsock::VsockMuxer`] behind the
//! virtio-mmio transport.
//!
//! Host side: the hybrid unix socket (`CONNECT <port>\n` -> `OK <n>\n`) at the configured path,
//! and guest connections to CID 2 port P forwarded to `<path>_<P>`: exactly what the QEMU
//! backend serves over vhost-user. The muxer lives on the device's I/O thread, which waits on
//! the TX and RX queue notifications and on the muxer's own epoll fd.

use std::ops::RangeInclusive;

use rootcell_vsock::{VsockConfig, VsockMuxer};
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use vmm_sys_util::epoll::Epoll;

use super::worker::{watch, Activation, DeviceWorker, QueueDevice, QueueWorker, RxTx};

/// Queue sizes: RX, TX, event.
const QUEUE_SIZES: [u16; 3] = [256, 256, 256];

const MUXER_TOKEN: u64 = 0;
const RX_TOKEN: u64 = 1;
const TX_TOKEN: u64 = 2;

/// Why a vsock device could not be built.
#[derive(Debug, thiserror::Error)]
pub enum VsockDeviceError {
    /// The muxer (hybrid socket) could not be set up.
    #[error(transparent)]
    Muxer(#[from] rootcell_vsock::Error),
    /// The I/O thread could not be started.
    #[error("starting the vsock I/O thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// The virtio-vsock device as the transport sees it.
#[derive(Debug)]
pub struct VsockDevice {
    /// `struct virtio_vsock_config { le64 guest_cid; }`.
    config: [u8; 8],
    io: QueueWorker,
    /// Removed after the I/O thread has ended (declared after `io`, so dropped after it).
    socket: SocketFile,
}

/// The hybrid socket's file, removed on the thread that drops the device: the I/O thread does
/// not remove it, so its seccomp list has no unlink.
#[derive(Debug)]
struct SocketFile(Option<std::path::PathBuf>);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl VsockDevice {
    /// Binds the hybrid socket at `config.uds_path` and starts the device's I/O thread.
    /// The socket file is removed when the device is dropped (unless
    /// [`VsockDevice::leave_socket_file`]), by the dropping thread.
    pub fn new(config: &VsockConfig) -> Result<Self, VsockDeviceError> {
        let mut muxer = VsockMuxer::new(config.guest_cid, &config.uds_path)?;
        // Removed here, not by the I/O thread, which drops the muxer.
        muxer.leave_socket_file();
        let socket = SocketFile(Some(config.uds_path.clone()));
        let io = QueueWorker::spawn(
            "vsock-io",
            VsockWorker {
                muxer,
                active: None,
            },
            Some(crate::devices::virtio::worker::Confinement {
                filter: crate::seccomp::vsock_io_filter,
                caps: &[],
                kind: crate::jail::ThreadKind::Vsock,
            }),
        )
        .map_err(VsockDeviceError::Thread)?;
        Ok(VsockDevice {
            config: config.guest_cid.to_le_bytes(),
            io,
            socket,
        })
    }

    /// Leaves the socket file in place when the device is dropped: for an owner whose thread
    /// that drops it may not unlink files (the runtime's jailed VMM process), and that has the
    /// file removed otherwise.
    pub fn leave_socket_file(&mut self) {
        self.socket.0 = None;
    }
}

impl QueueDevice for VsockDevice {
    const DEVICE_TYPE: u32 = VIRTIO_ID_VSOCK;
    const QUEUE_SIZES: &'static [u16] = &QUEUE_SIZES;
    // The transport hands over ready queues in order; RX and TX must both be there.
    const QUEUES_NEEDED: (RangeInclusive<usize>, &'static str) =
        (2..=QUEUE_SIZES.len(), "vsock needs its RX and TX queues");

    fn config_space(&self) -> &[u8] {
        &self.config
    }

    fn io(&mut self) -> &mut QueueWorker {
        &mut self.io
    }
}

/// The I/O thread's state.
struct VsockWorker {
    muxer: VsockMuxer,
    /// The queues; vsock's event queue is kept in `_rest` but never used (no transport
    /// events).
    active: Option<RxTx>,
}

impl VsockWorker {
    /// Moves whatever the muxer has for the guest into RX buffers; signals the guest if the
    /// used rings say so (`tx_notify`: the TX pass already asked for an interrupt).
    fn pump_rx(&mut self, tx_notify: bool) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let rx_notify = match self.muxer.process_rx_queue(&mut a.rx.queue, &a.mem) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("vsock RX queue: {e}");
                false
            }
        };
        if tx_notify || rx_notify {
            if let Err(e) = a.interrupt.signal_used_queue() {
                log::warn!("vsock interrupt: {e}");
            }
        }
    }

    fn process_tx(&mut self) -> bool {
        let Some(a) = self.active.as_mut() else {
            return false;
        };
        let _ = a.tx.notify.read();
        match self.muxer.process_tx_queue(&mut a.tx.queue, &a.mem) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("vsock TX queue: {e}");
                false
            }
        }
    }
}

impl DeviceWorker for VsockWorker {
    type Activation = Activation;

    fn start(&mut self, epoll: &Epoll) -> std::io::Result<()> {
        watch(epoll, self.muxer.epoll_fd(), MUXER_TOKEN).map_err(std::io::Error::other)
    }

    fn jail_dir(&self) -> Option<std::path::PathBuf> {
        // Guest-initiated connections go to `<uds>_<port>` beside the hybrid socket.
        self.muxer.uds_path().parent().map(|d| d.to_path_buf())
    }

    fn activate(&mut self, epoll: &Epoll, act: Activation) -> Result<(), String> {
        self.active = Some(RxTx::watch(epoll, act, RX_TOKEN, TX_TOKEN)?);
        // Host clients may have connected before the driver was ready: deliver their requests.
        self.pump_rx(false);
        Ok(())
    }

    fn reset(&mut self, epoll: &Epoll) -> bool {
        if let Some(a) = self.active.take() {
            a.unwatch(epoll);
        }
        // The guest forgot every connection: drop the host ends too (their clients see EOF).
        self.muxer.reset();
        true
    }

    fn on_event(&mut self, _epoll: &Epoll, token: u64) {
        let tx_notify = match token {
            MUXER_TOKEN => {
                self.muxer.process_host_events();
                false
            }
            TX_TOKEN => self.process_tx(),
            RX_TOKEN => {
                // New RX buffers: packets that waited for room can go now.
                if let Some(a) = &self.active {
                    let _ = a.rx.notify.read();
                }
                false
            }
            _ => false,
        };
        self.pump_rx(tx_notify);
    }
}
