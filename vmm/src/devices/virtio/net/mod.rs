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

use std::ops::RangeInclusive;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};
use vmm_sys_util::epoll::Epoll;

use super::worker::{unwatch, watch, Activation, DeviceWorker, QueueDevice, QueueWorker, RxTx};
use super::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use crate::memory::GuestMemoryMmap;

/// virtio device id of a network card.
pub const VIRTIO_ID_NET: u32 = 1;
/// Feature bit: the device reports its maximum MTU in config space.
pub const VIRTIO_NET_F_MTU: u64 = 1 << 3;
/// Feature bit: the device has a MAC address in config space.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// Size of `struct virtio_net_hdr_v1` (the header before every frame with VIRTIO_F_VERSION_1).
pub const NET_HDR_LEN: usize = 12;
/// Smallest MTU the Linux driver accepts from config space (IPv4's minimum).
pub const MIN_MTU: u16 = 68;
/// Largest frame (header included) either way: a 64 KiB IP packet in an Ethernet frame with a
/// VLAN tag. Without offloads real frames are MTU-sized; this only bounds the copy buffers.
pub const MAX_PACKET: usize = NET_HDR_LEN + 14 + 4 + 65_535;
/// Ethernet header: the least a transmitted frame must carry.
const ETH_HLEN: usize = 14;
/// Queue sizes: RX, TX (no control queue).
const QUEUE_SIZES: [u16; 2] = [256, 256];
/// Steps of the RX loop per wake-up before the thread looks at its other fds again.
const RX_BUDGET: usize = 64;
/// TX chains handled per wake-up before the thread looks at its other fds again.
const TX_BUDGET: usize = 128;

const RX_TOKEN: u64 = 0;
const TX_TOKEN: u64 = 1;
const TAP_TOKEN: u64 = 2;

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

fn tap_err(what: &'static str) -> impl FnOnce(std::io::Error) -> NetDeviceError {
    move |source| NetDeviceError::Tap { what, source }
}

/// Checks `fd` is a tap with the flags the device relies on, then sets the 12-byte vnet header,
/// no offloads, and non-blocking I/O.
fn prepare_tap(fd: RawFd) -> Result<(), NetDeviceError> {
    // struct ifreq: 16-byte name, then the flags as the first short of the union.
    let mut ifr = [0u8; 40];
    // SAFETY: TUNGETIFF writes at most a struct ifreq (40 bytes) into `ifr`.
    if unsafe { libc::ioctl(fd, libc::TUNGETIFF, ifr.as_mut_ptr()) } < 0 {
        return Err(NetDeviceError::NotATap(format!(
            "TUNGETIFF: {}",
            std::io::Error::last_os_error()
        )));
    }
    let flags = i32::from(u16::from_ne_bytes([ifr[16], ifr[17]]));
    let need = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    if flags & need != need {
        return Err(NetDeviceError::NotATap(format!(
            "flags {flags:#x}, need IFF_TAP|IFF_NO_PI|IFF_VNET_HDR ({need:#x})"
        )));
    }
    let hdr_len = NET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer.
    if unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
        return Err(tap_err("TUNSETVNETHDRSZ")(std::io::Error::last_os_error()));
    }
    // No offloads: the host segments and checksums before a frame reaches the tap, so every
    // frame fits an MTU-sized guest buffer and its header carries nothing to act on.
    // SAFETY: TUNSETOFFLOAD takes its argument by value.
    if unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, 0 as libc::c_ulong) } < 0 {
        return Err(tap_err("TUNSETOFFLOAD")(std::io::Error::last_os_error()));
    }
    // SAFETY: fcntl on an fd we hold.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if fl < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
        return Err(tap_err("fcntl(O_NONBLOCK)")(std::io::Error::last_os_error()));
    }
    Ok(())
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
    /// `struct virtio_net_config { u8 mac[6]; le16 status; le16 max_virtqueue_pairs; le16 mtu; }`
    config: [u8; 12],
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
        prepare_tap(config.tap.as_raw_fd())?;
        let mut space = [0u8; 12];
        space[..6].copy_from_slice(&config.mac);
        space[10..12].copy_from_slice(&config.mtu.to_le_bytes());
        let counters = Arc::new(NetCounters::default());
        let io = QueueWorker::spawn(
            "net-io",
            NetWorker {
                tap: config.tap.clone(),
                counters: counters.clone(),
                active: None,
                pending: None,
                tap_watched: false,
                tap_failed: false,
                rx_buf: vec![0u8; MAX_PACKET].into_boxed_slice(),
                tx_buf: vec![0u8; MAX_PACKET].into_boxed_slice(),
            },
            Some(crate::seccomp::net_io_filter),
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

/// Why a guest chain was refused.
#[derive(Debug, PartialEq, Eq)]
enum ChainError {
    /// A descriptor points the wrong way (device-writable in TX, readable in RX).
    Direction,
    /// A descriptor's range is not guest RAM.
    Address,
    /// The chain's total length is out of bounds for a frame.
    Length(usize),
}

/// The guest buffers of one chain: (address, length) of each, checked to be guest RAM and all
/// pointing the way `writable` says.
fn chain_buffers<M>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
    writable: bool,
) -> Result<(Vec<(GuestAddress, usize)>, usize), ChainError>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let mut bufs = Vec::new();
    let mut total = 0usize;
    for d in chain {
        if d.is_write_only() != writable {
            return Err(ChainError::Direction);
        }
        let len = d.len() as usize;
        let access = if writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !GuestMemory::check_range(mem, d.addr(), len, access) {
            return Err(ChainError::Address);
        }
        total = total.saturating_add(len);
        bufs.push((d.addr(), len));
    }
    Ok((bufs, total))
}

/// Copies a TX chain (header and frame) into `buf`; returns its length.
fn gather<M>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
    buf: &mut [u8],
) -> Result<usize, ChainError>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let (bufs, total) = chain_buffers(mem, chain, false)?;
    if !(NET_HDR_LEN + ETH_HLEN..=buf.len()).contains(&total) {
        return Err(ChainError::Length(total));
    }
    let mut off = 0;
    for (addr, len) in bufs {
        mem.read_slice(&mut buf[off..off + len], addr)
            .map_err(|_| ChainError::Address)?;
        off += len;
    }
    Ok(total)
}

/// Copies `frame` (header included) into an RX chain.
fn scatter<M>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
    frame: &[u8],
) -> Result<(), ChainError>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let (bufs, total) = chain_buffers(mem, chain, true)?;
    if total < frame.len() {
        return Err(ChainError::Length(total));
    }
    let mut rest = frame;
    for (addr, len) in bufs {
        if rest.is_empty() {
            break;
        }
        let n = len.min(rest.len());
        mem.write_slice(&rest[..n], addr)
            .map_err(|_| ChainError::Address)?;
        rest = &rest[n..];
    }
    Ok(())
}

/// The I/O thread's state.
struct NetWorker {
    tap: Arc<OwnedFd>,
    counters: Arc<NetCounters>,
    active: Option<RxTx>,
    /// Length of a frame read from the tap (in `rx_buf`) that no guest buffer has taken yet.
    pending: Option<usize>,
    tap_watched: bool,
    /// Reading the tap failed for good (see `read_tap`).
    tap_failed: bool,
    rx_buf: Box<[u8]>,
    tx_buf: Box<[u8]>,
}

fn bump(c: &std::sync::atomic::AtomicU64) {
    c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

impl NetWorker {
    fn watch_tap(&mut self, epoll: &Epoll, on: bool) {
        if on == self.tap_watched || (on && self.tap_failed) {
            return;
        }
        let fd = self.tap.as_raw_fd();
        if on {
            if let Err(e) = watch(epoll, fd, TAP_TOKEN) {
                log::warn!("virtio-net: cannot watch the tap: {e}");
                return;
            }
        } else {
            unwatch(epoll, fd);
        }
        self.tap_watched = on;
    }

    /// Reads one frame from the tap into `rx_buf`; `None` when there is none. A tap that fails
    /// (deleted under us, say) is no longer watched: level-triggered epoll would otherwise
    /// report its error state forever.
    fn read_tap(&mut self, epoll: &Epoll) -> Option<usize> {
        if self.tap_failed {
            return None;
        }
        loop {
            // SAFETY: reads at most rx_buf.len() bytes into rx_buf.
            let n = unsafe {
                libc::read(
                    self.tap.as_raw_fd(),
                    self.rx_buf.as_mut_ptr().cast(),
                    self.rx_buf.len(),
                )
            };
            if n > 0 {
                let n = n as usize;
                if n < NET_HDR_LEN + ETH_HLEN {
                    bump(&self.counters.dropped);
                    continue;
                }
                return Some(n);
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                _ if n == 0 => {}
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => return None,
                _ => log::warn!("virtio-net: reading the tap failed, receiving stops: {e}"),
            }
            // End of file or a hard error: the tap is gone for good.
            self.watch_tap(epoll, false);
            self.tap_failed = true;
            return None;
        }
    }

    /// Moves frames from the tap into guest RX buffers while both have some, for at most
    /// [`RX_BUDGET`] steps; then it reschedules itself through the RX eventfd, so a flood (or a
    /// guest posting bad chains as fast as it can) never keeps the thread from its other work.
    fn process_rx(&mut self, epoll: &Epoll) -> bool {
        let mut used = false;
        let mut out_of_buffers = false;
        for step in 0.. {
            let Some(a) = self.active.as_mut() else {
                return false;
            };
            if step == RX_BUDGET {
                let _ = a.rx.notify.write(1);
                break;
            }
            let len = match self.pending {
                Some(n) => n,
                None => match self.read_tap(epoll) {
                    Some(n) => n,
                    None => break,
                },
            };
            self.pending = Some(len);
            let a = self.active.as_mut().expect("checked above");
            let (outcome, interrupt) =
                deliver_rx_frame(&mut a.rx.queue, &a.mem, &mut self.rx_buf[..len]);
            used |= interrupt;
            match outcome {
                RxOutcome::Delivered => {
                    self.pending = None;
                    bump(&self.counters.rx_frames);
                }
                RxOutcome::TooBig => {
                    self.pending = None;
                    bump(&self.counters.dropped);
                }
                RxOutcome::BadChain => bump(&self.counters.bad_chains),
                RxOutcome::NoBuffer => {
                    // With EVENT_IDX this also asks the driver to notify on its next buffer;
                    // true means buffers arrived in the meantime.
                    if let Ok(true) = a.rx.queue.enable_notification(&a.mem) {
                        if !avail_ring_broken(&mut a.rx.queue, &a.mem) {
                            continue;
                        }
                    }
                    out_of_buffers = true;
                    break;
                }
            }
        }
        // Stop polling the tap until the guest posts buffers (RX notification).
        self.watch_tap(epoll, !out_of_buffers);
        used
    }

    /// Writes every frame the guest queued to the tap.
    fn process_tx(&mut self) -> bool {
        let Some(a) = self.active.as_mut() else {
            return false;
        };
        let _ = a.tx.notify.read();
        let (interrupt, more) = drain_tx_queue(
            &mut a.tx.queue,
            &a.mem,
            self.tap.as_fd(),
            &mut self.tx_buf,
            &self.counters,
            TX_BUDGET,
        );
        if more {
            // Come back after the other fds had their turn.
            let _ = a.tx.notify.write(1);
        }
        interrupt
    }
}

/// What became of one frame offered to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxOutcome {
    /// Copied into the guest's next RX buffer.
    Delivered,
    /// The guest has no RX buffer posted: the frame has to wait.
    NoBuffer,
    /// The next buffer is well-formed but too small: the frame was dropped, the buffer kept.
    TooBig,
    /// The next chain was malformed and was handed back empty: the frame has to wait.
    BadChain,
}

/// Puts `frame` (a tap read: header space, then the Ethernet frame) into the next chain of the
/// RX `queue`, rewriting the header to "no flags, no GSO, one buffer". Also returns whether the
/// driver wants an interrupt. Every guest-supplied address and length is checked.
pub fn deliver_rx_frame(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    frame: &mut [u8],
) -> (RxOutcome, bool) {
    if frame.len() < NET_HDR_LEN {
        return (RxOutcome::TooBig, false);
    }
    let Some(chain) = queue.pop_descriptor_chain(mem) else {
        return (RxOutcome::NoBuffer, false);
    };
    let head = chain.head_index();
    frame[..NET_HDR_LEN].fill(0);
    frame[10..12].copy_from_slice(&1u16.to_le_bytes());
    match scatter(mem, chain, frame) {
        Ok(()) => (
            RxOutcome::Delivered,
            add_used(queue, mem, head, frame.len() as u32),
        ),
        Err(ChainError::Length(room)) => {
            // The guest keeps its buffer for the next (smaller) frame.
            log::debug!(
                "virtio-net: {}-byte frame does not fit a {room}-byte buffer",
                frame.len()
            );
            queue.go_to_previous_position();
            (RxOutcome::TooBig, false)
        }
        Err(e) => {
            log::debug!("virtio-net: bad RX chain {head}: {e:?}");
            (RxOutcome::BadChain, add_used(queue, mem, head, 0))
        }
    }
}

/// Writes every frame queued on the TX `queue` to `tap` (its header zeroed: the guest
/// negotiated no offloads) and hands every chain back, sent or refused. `buf` is scratch space
/// of [`MAX_PACKET`] bytes (a shorter one refuses longer frames). Stops after `max_chains`.
/// Returns whether the driver wants an interrupt, and whether chains may be left (the caller
/// must come back). Every guest-supplied address and length is checked.
pub fn drain_tx_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    tap: BorrowedFd<'_>,
    buf: &mut [u8],
    counters: &NetCounters,
    max_chains: usize,
) -> (bool, bool) {
    let mut used = false;
    let mut left = max_chains;
    loop {
        let _ = queue.disable_notification(mem);
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            left = left.saturating_sub(1);
            let head = chain.head_index();
            match gather(mem, chain, buf) {
                Ok(len) => {
                    buf[..NET_HDR_LEN].fill(0);
                    // SAFETY: writes `len` initialised bytes of buf.
                    let n = unsafe { libc::write(tap.as_raw_fd(), buf.as_ptr().cast(), len) };
                    if n == len as isize {
                        bump(&counters.tx_frames);
                    } else {
                        log::debug!(
                            "virtio-net: tap refused a frame: {}",
                            std::io::Error::last_os_error()
                        );
                        bump(&counters.dropped);
                    }
                }
                Err(e) => {
                    log::debug!("virtio-net: bad TX chain {head}: {e:?}");
                    bump(&counters.bad_chains);
                }
            }
            // TX buffers are returned with nothing written.
            used |= add_used(queue, mem, head, 0);
            if left == 0 {
                return (used, true);
            }
        }
        // With EVENT_IDX: true if the driver queued more while notifications were off.
        match queue.enable_notification(mem) {
            Ok(true) if !avail_ring_broken(queue, mem) => continue,
            _ => return (used, false),
        }
    }
}

/// True if the driver published an available index no valid ring can have (more than a
/// queue's worth ahead of what the device took). `pop_descriptor_chain` then finds nothing
/// while `enable_notification` keeps reporting "more": a loop on the two would never end.
fn avail_ring_broken(queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    queue.iter(mem).is_err()
}

/// Returns a chain to the driver; true if the queue wants an interrupt for it.
fn add_used(q: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32) -> bool {
    if let Err(e) = q.add_used(mem, head, len) {
        log::warn!("virtio-net: used ring: {e}");
        return false;
    }
    q.needs_notification(mem).unwrap_or(true)
}

impl DeviceWorker for NetWorker {
    type Activation = Activation;

    fn start(&mut self, _epoll: &Epoll) -> std::io::Result<()> {
        Ok(())
    }

    fn activate(&mut self, epoll: &Epoll, act: Activation) -> Result<(), String> {
        self.active = Some(RxTx::watch(epoll, act, RX_TOKEN, TX_TOKEN)?);
        // Frames may already wait in the tap; RX buffers posted before DRIVER_OK count too.
        self.watch_tap(epoll, true);
        Ok(())
    }

    fn reset(&mut self, epoll: &Epoll) -> bool {
        if let Some(a) = self.active.take() {
            a.unwatch(epoll);
        }
        self.watch_tap(epoll, false);
        self.pending = None;
        true
    }

    fn on_event(&mut self, epoll: &Epoll, token: u64) {
        let notify = match token {
            TX_TOKEN => self.process_tx(),
            RX_TOKEN => {
                if let Some(a) = &self.active {
                    let _ = a.rx.notify.read();
                }
                self.process_rx(epoll)
            }
            TAP_TOKEN => self.process_rx(epoll),
            _ => false,
        };
        if notify {
            if let Some(a) = &self.active {
                if let Err(e) = a.interrupt.signal_used_queue() {
                    log::warn!("virtio-net interrupt: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{Address, GuestMemoryBackend};

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    /// A chain built from (addr, len, flags) triples on a mock queue over guest memory `mem`.
    fn chain_of<'m>(
        mem: &'m GuestMemoryMmap,
        descs: &[(u64, u32, u16)],
    ) -> DescriptorChain<&'m GuestMemoryMmap> {
        let m = MockSplitQueue::new(mem, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let next = if i + 1 < descs.len() { F_NEXT } else { 0 };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags | next, i as u16 + 1))
            })
            .collect();
        m.build_desc_chain(&raw).unwrap();
        let mut q: Queue = m.create_queue().unwrap();
        q.pop_descriptor_chain(mem).expect("a chain")
    }

    #[test]
    fn tx_chain_is_gathered_across_descriptors() {
        let mem = create_guest_memory(16 << 20).unwrap();
        mem.write_slice(&[1u8; 12], GuestAddress(0x10_0000))
            .unwrap();
        mem.write_slice(&[2u8; 60], GuestAddress(0x20_0000))
            .unwrap();
        let chain = chain_of(&mem, &[(0x10_0000, 12, 0), (0x20_0000, 60, 0)]);
        let mut buf = vec![0u8; MAX_PACKET];
        assert_eq!(gather(&mem, chain, &mut buf), Ok(72));
        assert_eq!(&buf[..12], &[1u8; 12]);
        assert_eq!(&buf[12..72], &[2u8; 60]);
        assert_eq!(mem.last_addr(), GuestAddress((16 << 20) - 1));
    }

    #[test]
    fn malformed_tx_chains_are_refused() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let mut buf = vec![0u8; MAX_PACKET];
        // Shorter than header + Ethernet header.
        let c = chain_of(&mem, &[(0x10_0000, 20, 0)]);
        assert_eq!(gather(&mem, c, &mut buf), Err(ChainError::Length(20)));
        // A device-writable descriptor where the device must read.
        let c = chain_of(&mem, &[(0x10_0000, 12, 0), (0x20_0000, 60, F_WRITE)]);
        assert_eq!(gather(&mem, c, &mut buf), Err(ChainError::Direction));
        // Past the end of guest RAM, and straddling it.
        let c = chain_of(&mem, &[(0x4000_0000, 64, 0)]);
        assert_eq!(gather(&mem, c, &mut buf), Err(ChainError::Address));
        let c = chain_of(&mem, &[((16 << 20) - 8, 64, 0)]);
        assert_eq!(gather(&mem, c, &mut buf), Err(ChainError::Address));
        // Longer than any frame.
        let c = chain_of(
            &mem,
            &[
                (0x10_0000, 0x8000, 0),
                (0x20_0000, 0x8000, 0),
                (0x30_0000, 0x100, 0),
            ],
        );
        assert!(matches!(
            gather(&mem, c, &mut buf),
            Err(ChainError::Length(_))
        ));
    }

    #[test]
    fn rx_chain_is_filled_across_descriptors_and_checked() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let frame: Vec<u8> = (0..100u8).collect();
        let c = chain_of(
            &mem,
            &[(0x10_0000, 40, F_WRITE), (0x20_0000, 1500, F_WRITE)],
        );
        scatter(&mem, c, &frame).unwrap();
        let mut a = [0u8; 40];
        let mut b = [0u8; 60];
        mem.read_slice(&mut a, GuestAddress(0x10_0000)).unwrap();
        mem.read_slice(&mut b, GuestAddress(0x20_0000)).unwrap();
        assert_eq!([&a[..], &b[..]].concat(), frame);
        let c = chain_of(&mem, &[(0x10_0000, 40, F_WRITE)]);
        assert_eq!(scatter(&mem, c, &frame), Err(ChainError::Length(40)));
        let c = chain_of(&mem, &[(0x10_0000, 1500, 0)]);
        assert_eq!(scatter(&mem, c, &frame), Err(ChainError::Direction));
        let c = chain_of(&mem, &[(u64::MAX - 10, 1500, F_WRITE)]);
        assert_eq!(scatter(&mem, c, &frame), Err(ChainError::Address));
    }

    #[test]
    fn tx_drain_stops_at_its_budget_and_resumes() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let m = MockSplitQueue::new(&mem, 16);
        let descs: Vec<RawDescriptor> = (0..5u64)
            .map(|i| RawDescriptor::from(SplitDescriptor::new(0x10_0000 + i * 0x1000, 64, 0, 0)))
            .collect();
        m.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = m.create_queue().unwrap();
        let null = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .unwrap();
        let counters = NetCounters::default();
        let mut buf = vec![0u8; MAX_PACKET];
        let used_idx = |mem: &GuestMemoryMmap| -> u16 {
            mem.read_obj(m.used_addr().unchecked_add(2)).unwrap()
        };
        let mut drain =
            |q: &mut Queue| drain_tx_queue(q, &mem, null.as_fd(), &mut buf, &counters, 2);
        assert_eq!(drain(&mut q), (true, true));
        assert_eq!(used_idx(&mem), 2);
        assert_eq!(drain(&mut q), (true, true));
        assert_eq!(
            drain(&mut q),
            (true, false),
            "the last chain, then nothing left"
        );
        assert_eq!(used_idx(&mem), 5);
        assert_eq!(
            counters
                .tx_frames
                .load(std::sync::atomic::Ordering::Relaxed),
            5
        );
    }

    #[test]
    fn rx_delivery_reports_each_outcome() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let m = MockSplitQueue::new(&mem, 16);
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(0x10_0000, 1526, F_WRITE, 0)),
            RawDescriptor::from(SplitDescriptor::new(0x20_0000, 1526, 0, 0)),
            RawDescriptor::from(SplitDescriptor::new(0x30_0000, 30, F_WRITE, 0)),
        ];
        m.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = m.create_queue().unwrap();
        let mut frame = vec![0xaau8; 100];
        let (o, _) = deliver_rx_frame(&mut q, &mem, &mut frame);
        assert_eq!(o, RxOutcome::Delivered);
        let mut got = vec![0u8; 100];
        mem.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(
            got[..12],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
            "header rewritten"
        );
        assert_eq!(got[12..], [0xaa; 88]);
        assert_eq!(
            deliver_rx_frame(&mut q, &mem, &mut frame).0,
            RxOutcome::BadChain
        );
        assert_eq!(
            deliver_rx_frame(&mut q, &mem, &mut frame).0,
            RxOutcome::TooBig
        );
        // The too-small buffer stays available for a frame that fits.
        let mut small = vec![0u8; 30];
        assert_eq!(
            deliver_rx_frame(&mut q, &mem, &mut small).0,
            RxOutcome::Delivered
        );
        assert_eq!(
            deliver_rx_frame(&mut q, &mem, &mut frame).0,
            RxOutcome::NoBuffer
        );
    }

    #[test]
    fn an_impossible_avail_index_ends_the_tx_pass() {
        // The driver claims 1000 new chains in a 16-entry ring: nothing is valid to pop, and
        // the pass must end instead of re-checking forever (bounded here by a timeout).
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mem = create_guest_memory(16 << 20).unwrap();
            let m = MockSplitQueue::new(&mem, 16);
            let mut q: Queue = m.create_queue().unwrap();
            mem.write_obj(1000u16, m.avail_addr().unchecked_add(2))
                .unwrap();
            let null = std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/null")
                .unwrap();
            let mut buf = vec![0u8; MAX_PACKET];
            let counters = NetCounters::default();
            let tx = drain_tx_queue(&mut q, &mem, null.as_fd(), &mut buf, &counters, 128);
            let rx = deliver_rx_frame(&mut q, &mem, &mut [0u8; 64]).0;
            let _ = done_tx.send((tx, rx));
        });
        let got = done_rx.recv_timeout(std::time::Duration::from_secs(10));
        assert_eq!(got, Ok(((false, false), RxOutcome::NoBuffer)));
    }

    #[test]
    fn a_plain_file_is_not_a_tap() {
        let f = tempfile::tempfile().unwrap();
        let err = NetDevice::new(&NetConfig {
            tap: Arc::new(f.into()),
            mac: [2, 0, 0, 0, 0, 1],
            mtu: 1500,
        })
        .unwrap_err();
        assert!(matches!(err, NetDeviceError::NotATap(_)), "{err}");
    }
}
