//! Frames to and from guest descriptor chains: a TX chain gathered into one buffer for the
//! tap, a frame from the tap scattered into an RX chain, and the used-ring bookkeeping around
//! both. Every guest-supplied address and length is checked; none of this touches the tap's
//! setup or the I/O thread's state, so the fuzz target and the tests drive it directly.

use std::os::fd::{AsRawFd, BorrowedFd};

use virtio_bindings::virtio_net::virtio_net_hdr_v1;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use super::{bump, NetCounters, ETH_HLEN, NET_HDR_LEN};
use crate::memory::GuestMemoryMmap;

/// Why a guest chain was refused.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ChainError {
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
pub(super) fn gather<M>(
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
pub(super) fn scatter<M>(
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
    // Zero is no flags and VIRTIO_NET_HDR_GSO_NONE; the frame fills one buffer.
    frame[..NET_HDR_LEN].fill(0);
    let num_buffers = std::mem::offset_of!(virtio_net_hdr_v1, num_buffers);
    frame[num_buffers..num_buffers + 2].copy_from_slice(&1u16.to_le_bytes());
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
/// of [`MAX_PACKET`](super::MAX_PACKET) bytes (a shorter one refuses longer frames). Stops
/// after `max_chains`. Returns whether the driver wants an interrupt, and whether chains may be
/// left (the caller must come back). Every guest-supplied address and length is checked.
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
pub(super) fn avail_ring_broken(queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
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
