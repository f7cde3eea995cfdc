//! virtio-net for the built-in VMM, backed by a tap device the runtime opened in the
//! container's network namespace (and mirrored to the container's veth with tc).
//!
//! No offloads are negotiated, so frames cross as plain Ethernet. The tap was opened with
//! `IFF_VNET_HDR`: its header size is set to 12 bytes, the size of virtio 1's
//! `virtio_net_hdr_v1`, so a frame moves between a tap read/write and a descriptor chain
//! without shifting. The header itself is not passed through, it is rewritten: towards the tap
//! it is zeroed (the guest may not ask the host for checksum or segmentation work it never
//! negotiated), towards the guest it says "no flags, no GSO, one buffer", as the spec requires
//! when no offload and no mergeable buffers were negotiated.
//!
//! The device's I/O thread waits on the two queue notifications and on the tap. It reads the
//! tap only while the guest has RX buffers: when it runs out it stops watching the tap (a frame
//! it already read waits for the next buffer) and resumes on the guest's next RX notification,
//! so an idle guest costs no CPU however busy the network is.
//!
//! The device is in four parts: this module (the device as the transport sees it: config
//! space, features, errors, counters), `tap` (checking and preparing the tap), `queue` (guest
//! descriptor chains to and from frames, every guest address and length checked; its
//! [`deliver_rx_frame`] and [`drain_tx_queue`] are public for the fuzz target and the tests)
//! and `worker` (the I/O thread that moves frames between the tap and the queues).

mod queue;
mod tap;
#[cfg(test)]
mod tests;
mod worker;

use std::ops::RangeInclusive;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{self, virtio_net_config};

use super::worker::{QueueDevice, QueueWorker};
use super::{feature_mask, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use worker::NetWorker;

pub use queue::{deliver_rx_frame, drain_tx_queue, RxOutcome};

/// Mask of [`virtio_net::VIRTIO_NET_F_MTU`]: the device reports its maximum MTU in config space.
pub const VIRTIO_NET_F_MTU: u64 = feature_mask(virtio_net::VIRTIO_NET_F_MTU);
/// Mask of [`virtio_net::VIRTIO_NET_F_MAC`]: the device has a MAC address in config space.
pub const VIRTIO_NET_F_MAC: u64 = feature_mask(virtio_net::VIRTIO_NET_F_MAC);
/// Size of `struct virtio_net_hdr_v1` (the header before every frame with VIRTIO_F_VERSION_1).
pub const NET_HDR_LEN: usize = size_of::<virtio_net::virtio_net_hdr_v1>();
/// Smallest MTU the Linux driver accepts from config space (IPv4's minimum; a driver rule,
/// not a virtio constant, so not in virtio-bindings).
pub const MIN_MTU: u16 = 68;
/// Largest frame (header included) either way: a 64 KiB IP packet in an Ethernet frame with a
/// VLAN tag. Without offloads real frames are MTU-sized; this only bounds the copy buffers.
pub const MAX_PACKET: usize = NET_HDR_LEN + ETH_HLEN + 4 + 65_535;
/// Ethernet header: the least a transmitted frame must carry.
const ETH_HLEN: usize = libc::ETH_HLEN as usize;
/// Where `mtu` sits in `struct virtio_net_config`.
const CONFIG_MTU: usize = std::mem::offset_of!(virtio_net_config, mtu);
/// How much of `struct virtio_net_config` the device has: up to `mtu` (2 bytes).
const CONFIG_LEN: usize = CONFIG_MTU + 2;
/// Queue sizes: RX, TX (no control queue).
const QUEUE_SIZES: [u16; 2] = [256, 256];

/// One network interface of the guest.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// An open tap: `/dev/net/tun` with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`. The device sets
    /// it non-blocking (which the open file description shares with every copy of the fd).
    pub tap: Arc<OwnedFd>,
    /// The guest card's MAC address.
    pub mac: [u8; 6],
    /// MTU offered to the guest (`VIRTIO_NET_F_MTU`); 0 offers none (the guest uses 1500).
    pub mtu: u16,
}

/// Why a virtio-net device could not be built.
#[derive(Debug, thiserror::Error)]
pub enum NetDeviceError {
    /// The fd is not a tap, or was opened without the flags the device needs.
    #[error("the fd is not a usable tap ({0})")]
    NotATap(String),
    /// The MTU is below what a guest can use.
    #[error("MTU {0} is below the minimum of {MIN_MTU}")]
    Mtu(u16),
    /// An ioctl or fcntl on the tap failed.
    #[error("{what} on the tap: {source}")]
    Tap {
        /// The operation.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The I/O thread could not be started.
    #[error("starting the virtio-net I/O thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Frame counters, readable from any thread (for tests and diagnostics).
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Frames delivered into guest RX buffers.
    pub rx_frames: std::sync::atomic::AtomicU64,
    /// Frames written to the tap.
    pub tx_frames: std::sync::atomic::AtomicU64,
    /// Guest chains refused as malformed (wrong direction, bad address, bad length).
    pub bad_chains: std::sync::atomic::AtomicU64,
    /// Frames dropped: too big for the guest's buffer, or refused by the tap.
    pub dropped: std::sync::atomic::AtomicU64,
}

/// The virtio-net device as the transport sees it.
#[derive(Debug)]
pub struct NetDevice {
    /// The start of `struct virtio_net_config`, up to and including `mtu`: the fields the
    /// device offers (`mac`, and `mtu` with [`VIRTIO_NET_F_MTU`]).
    config: [u8; CONFIG_LEN],
    mtu: u16,
    counters: Arc<NetCounters>,
    io: QueueWorker,
}

impl NetDevice {
    /// Prepares the tap (vnet header size, no offloads, non-blocking) and starts the device's
    /// I/O thread.
    pub fn new(config: &NetConfig) -> Result<Self, NetDeviceError> {
        if config.mtu != 0 && config.mtu < MIN_MTU {
            return Err(NetDeviceError::Mtu(config.mtu));
        }
        tap::prepare_tap(config.tap.as_raw_fd())?;
        let mut space = [0u8; CONFIG_LEN];
        let mac = std::mem::offset_of!(virtio_net_config, mac);
        space[mac..mac + 6].copy_from_slice(&config.mac);
        space[CONFIG_MTU..CONFIG_LEN].copy_from_slice(&config.mtu.to_le_bytes());
        let counters = Arc::new(NetCounters::default());
        let io = QueueWorker::spawn(
            "net-io",
            NetWorker::new(config.tap.clone(), counters.clone()),
            Some(crate::devices::virtio::worker::Confinement {
                filter: crate::seccomp::net_io_filter,
                caps: &[],
                kind: crate::jail::ThreadKind::Net,
            }),
        )
        .map_err(NetDeviceError::Thread)?;
        Ok(NetDevice {
            config: space,
            mtu: config.mtu,
            counters,
            io,
        })
    }

    /// The device's frame counters.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }
}

impl QueueDevice for NetDevice {
    const DEVICE_TYPE: u32 = VIRTIO_ID_NET;
    const QUEUE_SIZES: &'static [u16] = &QUEUE_SIZES;
    const QUEUES_NEEDED: (RangeInclusive<usize>, &'static str) = (
        QUEUE_SIZES.len()..=QUEUE_SIZES.len(),
        "virtio-net needs its RX and TX queues",
    );

    fn features(&self) -> u64 {
        let mtu = if self.mtu != 0 { VIRTIO_NET_F_MTU } else { 0 };
        VIRTIO_NET_F_MAC | mtu | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX
    }

    fn config_space(&self) -> &[u8] {
        &self.config
    }

    fn io(&mut self) -> &mut QueueWorker {
        &mut self.io
    }
}

/// Counts one more event in `c`.
fn bump(c: &std::sync::atomic::AtomicU64) {
    c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}
