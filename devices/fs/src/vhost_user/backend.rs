//! [`FsDevice`] as a `vhost-user-backend` backend: feature negotiation and vring events.

use std::io;
use std::sync::Mutex;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::device::{FsDevice, NUM_QUEUES};

/// Largest queue the backend accepts (QEMU's vhost-user-fs default is 128).
const MAX_QUEUE_SIZE: usize = 1024;

/// Guest memory as the vhost-user front end maps it (no dirty-page logging: no migration).
type Memory = GuestMemoryAtomic<GuestMemoryMmap>;

/// The vhost-user view of one virtio-fs device.
pub struct FsBackend {
    device: FsDevice,
    mem: Mutex<Option<Memory>>,
}

impl FsBackend {
    /// Wraps `device` for the vhost-user daemon.
    pub fn new(device: FsDevice) -> Self {
        FsBackend {
            device,
            mem: Mutex::new(None),
        }
    }

    fn memory(&self) -> io::Result<Memory> {
        self.mem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| io::Error::other("vring kicked before the guest memory table was set"))
    }
}

impl VhostUserBackend for FsBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The daemon sets the event-index mode on each vring itself; process_queue follows it.
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        *self.mem.lock().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without an exit event the vring worker thread would outlive the connection; the
        // daemon signals it when its handler is dropped.
        new_event_consumer_and_notifier(EventFlag::NONBLOCK)
            .map_err(|e| tracing::error!(error = %e, "virtio-fs: no exit eventfd"))
            .ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!(
                "unexpected vring event set {evset:?}"
            )));
        }
        let vring = vrings
            .get(usize::from(device_event))
            .ok_or_else(|| io::Error::other(format!("event for unknown queue {device_event}")))?;
        let mem = self.memory()?;
        let guard = mem.memory();
        let notify = {
            let mut state = vring.get_mut();
            self.device
                .process_queue(&guard, state.get_queue_mut())
                .map_err(io::Error::other)?
        };
        if notify {
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}
