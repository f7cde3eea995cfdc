//! What the queue devices (virtio-vsock, -fs, -net) share on top of their I/O thread: the
//! [`VirtioDevice`] impl of every [`QueueDevice`], the transport-facing [`QueueWorker`], the
//! receive/transmit pair [`RxTx`], and the epoll registration helpers.

use std::ops::RangeInclusive;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_queue::QueueT;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::{Confinement, DeviceWorker, WorkerHandle};
use crate::devices::virtio::{
    read_config_bytes, ActivateError, ActiveQueue, Interrupt, TransportFds, VirtioDevice,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::memory::GuestMemoryMmap;

/// What activation hands to a queue device's I/O thread.
pub(crate) struct Activation {
    /// Guest RAM.
    pub(crate) mem: GuestMemoryMmap,
    /// The device's interrupt.
    pub(crate) interrupt: Arc<Interrupt>,
    /// The ready queues, in queue order.
    pub(crate) queues: Vec<ActiveQueue>,
    /// Whether the driver accepted `VIRTIO_RING_F_EVENT_IDX`.
    pub(crate) event_idx: bool,
}

/// A virtio device whose queues an I/O thread serves (virtio-vsock, -fs, -net). Such a device
/// says who it is; the rest of its [`VirtioDevice`] impl (feature acknowledgement, activation,
/// reset, pause) is the one below, shared by all of them.
pub(crate) trait QueueDevice: Send {
    /// virtio device id.
    const DEVICE_TYPE: u32;
    /// Maximum size of each queue; the length is the number of queues.
    const QUEUE_SIZES: &'static [u16];
    /// How many ready queues activation needs, and what to say when the driver readied a
    /// number outside that range.
    const QUEUES_NEEDED: (RangeInclusive<usize>, &'static str);
    /// Feature bits the device offers: by default what the queues support (indirect
    /// descriptors, event index), which the device crates' queue helpers handle.
    fn features(&self) -> u64 {
        VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX
    }
    /// The device's config space.
    fn config_space(&self) -> &[u8];
    /// See [`VirtioDevice::take_transport_fds`].
    fn take_transport_fds(&mut self) -> Option<TransportFds> {
        None
    }
    /// The handle on the device's I/O thread.
    fn io(&mut self) -> &mut QueueWorker;
}

impl<D: QueueDevice> VirtioDevice for D {
    fn device_type(&self) -> u32 {
        D::DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        D::QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        QueueDevice::features(self)
    }

    fn take_transport_fds(&mut self) -> Option<TransportFds> {
        QueueDevice::take_transport_fds(self)
    }

    fn ack_features(&mut self, features: u64) {
        self.io().ack_features(features);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(self.config_space(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        let (needed, what) = D::QUEUES_NEEDED;
        self.io().activate(mem, interrupt, queues, needed, what)
    }

    fn reset(&mut self) -> bool {
        self.io().reset()
    }

    fn pause(&mut self) -> bool {
        self.io().pause()
    }

    fn resume(&mut self) {
        self.io().resume()
    }
}

/// The transport-facing half of a device served by an I/O thread: the features the driver
/// accepted, and the hand-over of its queues at activation.
#[derive(Debug)]
pub(crate) struct QueueWorker {
    acked: u64,
    handle: WorkerHandle<Activation>,
}

impl QueueWorker {
    /// Spawns the I/O thread (see [`WorkerHandle::spawn`]).
    pub(crate) fn spawn<W>(
        name: &str,
        worker: W,
        confine: Option<Confinement>,
    ) -> std::io::Result<Self>
    where
        W: DeviceWorker<Activation = Activation>,
    {
        Ok(QueueWorker {
            acked: 0,
            handle: WorkerHandle::spawn(name, worker, confine)?,
        })
    }

    /// Records the features the driver accepted.
    pub(crate) fn ack_features(&mut self, features: u64) {
        self.acked = features;
    }

    /// Hands the queues to the thread if the driver readied a number of them in `needed`;
    /// otherwise fails with "`what`, the driver readied N".
    pub(crate) fn activate(
        &self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<ActiveQueue>,
        needed: RangeInclusive<usize>,
        what: &str,
    ) -> Result<(), ActivateError> {
        if !needed.contains(&queues.len()) {
            return Err(ActivateError(format!(
                "{what}, the driver readied {}",
                queues.len()
            )));
        }
        self.handle
            .activate(Activation {
                mem,
                interrupt,
                queues,
                event_idx: self.acked & VIRTIO_RING_F_EVENT_IDX != 0,
            })
            .map_err(ActivateError)
    }

    /// Forgets the features and makes the thread drop the queues.
    pub(crate) fn reset(&mut self) -> bool {
        self.acked = 0;
        self.handle.reset()
    }

    /// Pauses the thread (see [`WorkerHandle::pause`]).
    pub(crate) fn pause(&self) -> bool {
        self.handle.pause()
    }

    /// Resumes the thread.
    pub(crate) fn resume(&self) {
        self.handle.resume()
    }
}

/// An activated device with a receive and a transmit queue (virtio-net, virtio-vsock), their
/// notifications watched by the I/O thread.
pub(crate) struct RxTx {
    /// Guest RAM.
    pub(crate) mem: GuestMemoryMmap,
    /// The device's interrupt.
    pub(crate) interrupt: Arc<Interrupt>,
    /// The first queue: buffers the device fills.
    pub(crate) rx: ActiveQueue,
    /// The second queue: buffers the device consumes.
    pub(crate) tx: ActiveQueue,
    /// Queues after the first two (vsock's event queue): kept, as the driver filled them, but
    /// not watched.
    pub(crate) _rest: Vec<ActiveQueue>,
}

impl RxTx {
    /// Takes RX and TX out of `act`, sets their EVENT_IDX mode and watches their notifications
    /// under `rx_token` and `tx_token`.
    pub(crate) fn watch(
        epoll: &Epoll,
        act: Activation,
        rx_token: u64,
        tx_token: u64,
    ) -> Result<Self, String> {
        let mut queues = act.queues.into_iter();
        let (Some(mut rx), Some(mut tx)) = (queues.next(), queues.next()) else {
            return Err("the device needs RX and TX queues".into());
        };
        rx.queue.set_event_idx(act.event_idx);
        tx.queue.set_event_idx(act.event_idx);
        watch_all(
            epoll,
            &[
                (rx.notify.as_raw_fd(), rx_token),
                (tx.notify.as_raw_fd(), tx_token),
            ],
        )?;
        Ok(RxTx {
            mem: act.mem,
            interrupt: act.interrupt,
            rx,
            tx,
            _rest: queues.collect(),
        })
    }

    /// Stops watching the notifications (before the queues are dropped).
    pub(crate) fn unwatch(&self, epoll: &Epoll) {
        unwatch(epoll, self.rx.notify.as_raw_fd());
        unwatch(epoll, self.tx.notify.as_raw_fd());
    }
}

/// Registers each `(fd, token)` for input; on error none stays registered.
pub(crate) fn watch_all(epoll: &Epoll, fds: &[(RawFd, u64)]) -> Result<(), String> {
    for (i, &(fd, token)) in fds.iter().enumerate() {
        if let Err(e) = watch(epoll, fd, token) {
            for &(fd, _) in &fds[..i] {
                unwatch(epoll, fd);
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Registers `fd` for input under `token`.
pub(crate) fn watch(epoll: &Epoll, fd: RawFd, token: u64) -> Result<(), String> {
    epoll
        .ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
        .map_err(|e| format!("epoll_ctl(ADD): {e}"))
}

/// Stops watching `fd` (needed before dropping the queues: epoll keys registrations on the
/// open file, which the transport's copy keeps alive).
pub(crate) fn unwatch(epoll: &Epoll, fd: RawFd) {
    let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
}
