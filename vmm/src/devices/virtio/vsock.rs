//! virtio-vsock for the built-in VMM: the shared [`rootcell_vsock::VsockMuxer`] behind the
//! virtio-mmio transport.
//!
//! Host side: the hybrid unix socket (`CONNECT <port>\n` -> `OK <n>\n`) at the configured path,
//! and guest connections to CID 2 port P forwarded to `<path>_<P>`: exactly what the QEMU
//! backend serves over vhost-user. The muxer lives on the device's I/O thread, which waits on
//! the TX and RX queue notifications and on the muxer's own epoll fd.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use rootcell_vsock::{VsockConfig, VsockMuxer};
use virtio_queue::QueueT;
use vmm_sys_util::epoll::Epoll;

use super::worker::{unwatch, watch, DeviceWorker, WorkerHandle};
use super::{
    read_config_bytes, ActivateError, ActiveQueue, Interrupt, VirtioDevice,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::memory::GuestMemoryMmap;

/// virtio device id of vsock.
pub const VIRTIO_ID_VSOCK: u32 = 19;
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

/// What activation hands to the I/O thread.
struct Activation {
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<ActiveQueue>,
    event_idx: bool,
}

/// The virtio-vsock device as the transport sees it.
#[derive(Debug)]
pub struct VsockDevice {
    guest_cid: u64,
    acked: u64,
    worker: WorkerHandle<Activation>,
}

impl VsockDevice {
    /// Binds the hybrid socket at `config.uds_path` and starts the device's I/O thread.
    /// The socket file is removed when the device is dropped.
    pub fn new(config: &VsockConfig) -> Result<Self, VsockDeviceError> {
        let muxer = VsockMuxer::new(config.guest_cid, &config.uds_path)?;
        let worker = WorkerHandle::spawn(
            "vsock-io",
            VsockWorker {
                muxer,
                active: None,
            },
            Some(crate::seccomp::vsock_io_filter),
        )
        .map_err(VsockDeviceError::Thread)?;
        Ok(VsockDevice {
            guest_cid: config.guest_cid,
            acked: 0,
            worker,
        })
    }
}

impl VirtioDevice for VsockDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        // The transport hands over ready queues in order; RX and TX must both be there.
        if queues.len() < 2 {
            return Err(ActivateError(format!(
                "vsock needs its RX and TX queues, the driver readied {}",
                queues.len()
            )));
        }
        self.worker
            .activate(Activation {
                mem,
                interrupt,
                queues,
                event_idx: self.acked & VIRTIO_RING_F_EVENT_IDX != 0,
            })
            .map_err(ActivateError)
    }

    fn reset(&mut self) -> bool {
        self.acked = 0;
        self.worker.reset()
    }
}

/// The queues and memory of an activated device.
struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    rx: ActiveQueue,
    tx: ActiveQueue,
    // The event queue is kept (the driver filled it) but never used: no transport events.
    _event: Option<ActiveQueue>,
}

/// The I/O thread's state.
struct VsockWorker {
    muxer: VsockMuxer,
    active: Option<Active>,
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

    fn activate(&mut self, epoll: &Epoll, act: Activation) -> Result<(), String> {
        let mut queues = act.queues.into_iter();
        let (Some(mut rx), Some(mut tx)) = (queues.next(), queues.next()) else {
            return Err("vsock needs RX and TX queues".into());
        };
        rx.queue.set_event_idx(act.event_idx);
        tx.queue.set_event_idx(act.event_idx);
        watch(epoll, rx.notify.as_raw_fd(), RX_TOKEN)?;
        if let Err(e) = watch(epoll, tx.notify.as_raw_fd(), TX_TOKEN) {
            unwatch(epoll, rx.notify.as_raw_fd());
            return Err(e);
        }
        self.active = Some(Active {
            mem: act.mem,
            interrupt: act.interrupt,
            rx,
            tx,
            _event: queues.next(),
        });
        // Host clients may have connected before the driver was ready: deliver their requests.
        self.pump_rx(false);
        Ok(())
    }

    fn reset(&mut self, epoll: &Epoll) -> bool {
        if let Some(a) = self.active.take() {
            unwatch(epoll, a.rx.notify.as_raw_fd());
            unwatch(epoll, a.tx.notify.as_raw_fd());
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
