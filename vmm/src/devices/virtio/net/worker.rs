//! The virtio-net I/O thread: it waits on the two queue notifications and on the tap, and
//! moves frames between them with the `queue` module's helpers, within a budget per wake-up.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;

use virtio_queue::QueueT;
use vmm_sys_util::epoll::Epoll;

use super::queue::{avail_ring_broken, deliver_rx_frame, drain_tx_queue, RxOutcome};
use super::{bump, NetCounters, ETH_HLEN, MAX_PACKET, NET_HDR_LEN};
use crate::devices::virtio::worker::{unwatch, watch, Activation, DeviceWorker, RxTx};

/// Steps of the RX loop per wake-up before the thread looks at its other fds again.
const RX_BUDGET: usize = 64;
/// TX chains handled per wake-up before the thread looks at its other fds again.
const TX_BUDGET: usize = 128;

const RX_TOKEN: u64 = 0;
const TX_TOKEN: u64 = 1;
const TAP_TOKEN: u64 = 2;

/// The I/O thread's state.
pub(super) struct NetWorker {
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

impl NetWorker {
    /// The state of a device not yet activated: the tap not watched, no frame pending.
    pub(super) fn new(tap: Arc<OwnedFd>, counters: Arc<NetCounters>) -> Self {
        NetWorker {
            tap,
            counters,
            active: None,
            pending: None,
            tap_watched: false,
            tap_failed: false,
            rx_buf: vec![0u8; MAX_PACKET].into_boxed_slice(),
            tx_buf: vec![0u8; MAX_PACKET].into_boxed_slice(),
        }
    }

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
