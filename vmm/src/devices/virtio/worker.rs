//! The I/O thread behind a virtio device: an epoll loop that owns the device logic and the
//! queues once the driver has activated the device.
//!
//! The thread is spawned when the device is built, before any vCPU runs. Activation and reset
//! (which the transport calls on a vCPU thread, inside its MMIO exit) only send a message and
//! write an eventfd, then wait for the answer: so a vCPU thread under the seccomp allowlist
//! never creates threads, epoll instances or sockets, and the queues are touched by exactly one
//! thread at a time.
//!
//! The thread confines itself with the device's seccomp filter before it serves anything; the
//! spawn fails if it cannot.
//!
//! While the VM is paused the thread is paused too: it waits on its command channel alone, so
//! it neither touches guest memory nor raises interrupts until resumed.
//!
//! [`QueueWorker`] is the transport-facing half the virtio-vsock, -fs and -net devices share:
//! the features the driver accepted and the hand-over of the queues to the thread.

use std::ops::RangeInclusive;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use virtio_queue::QueueT;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{
    read_config_bytes, ActivateError, ActiveQueue, Interrupt, VirtioDevice,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::memory::GuestMemoryMmap;

/// Builds a device thread's seccomp allowlist for a given violation action.
pub(crate) type FilterFn = fn(seccompiler::SeccompAction) -> crate::Result<seccompiler::BpfProgram>;

/// What a confined device thread's forbidden syscall does: kill the whole process, like the
/// vCPU filter (the kernel's audit log names the syscall).
const ON_VIOLATION: seccompiler::SeccompAction = seccompiler::SeccompAction::KillProcess;

/// Epoll token of the control eventfd; device tokens must differ from it.
const CONTROL_TOKEN: u64 = u64::MAX;

/// How long a vCPU thread waits for the worker to take an activation or a reset. A worker
/// busy for longer (a stuck host file system, say) makes the transport report
/// DEVICE_NEEDS_RESET instead of stalling the vCPU forever.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// The device side of a worker: what runs on the I/O thread.
pub(crate) trait DeviceWorker: Send + 'static {
    /// Everything activation hands over (memory, interrupt, queues).
    type Activation: Send + 'static;
    /// Registers the fds the worker watches for its whole life (e.g. a host socket).
    fn start(&mut self, epoll: &Epoll) -> std::io::Result<()>;
    /// Takes over the queues and registers their notify eventfds.
    fn activate(&mut self, epoll: &Epoll, activation: Self::Activation) -> Result<(), String>;
    /// Unregisters and drops the queues; returns false if the device cannot start over.
    fn reset(&mut self, epoll: &Epoll) -> bool;
    /// Handles a readable fd registered under `token`.
    fn on_event(&mut self, epoll: &Epoll, token: u64);
}

/// A message from the transport side to the I/O thread.
enum Command<A> {
    Activate(A, Sender<Result<(), String>>),
    Reset(Sender<bool>),
    /// Stop serving fds until [`Command::Resume`]; answered once the thread is idle.
    Pause(Sender<()>),
    Resume,
}

/// The transport side's handle on a device's I/O thread; dropping it stops and joins the thread.
pub(crate) struct WorkerHandle<A: Send + 'static> {
    commands: Option<Sender<Command<A>>>,
    wake: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl<A: Send + 'static> std::fmt::Debug for WorkerHandle<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerHandle")
            .field("running", &self.thread.is_some())
            .finish()
    }
}

impl<A: Send + 'static> WorkerHandle<A> {
    /// Spawns thread `name` running `worker`, confined by the allowlist `filter` builds (if
    /// any) before it serves anything.
    pub(crate) fn spawn<W>(
        name: &str,
        mut worker: W,
        filter: Option<FilterFn>,
    ) -> std::io::Result<Self>
    where
        W: DeviceWorker<Activation = A>,
    {
        let filter = filter
            .map(|build| build(ON_VIOLATION))
            .transpose()
            .map_err(|e| std::io::Error::other(format!("seccomp filter for {name}: {e}")))?;
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, CONTROL_TOKEN),
        )?;
        worker.start(&epoll)?;
        let (tx, rx) = mpsc::channel();
        let thread_wake = wake.try_clone()?;
        let (confined_tx, confined_rx) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                if let Some(f) = filter {
                    if let Err(e) = crate::seccomp::apply(&f) {
                        let _ = confined_tx.send(Err(e.to_string()));
                        return;
                    }
                }
                let _ = confined_tx.send(Ok(()));
                drop(confined_tx);
                run(worker, epoll, thread_wake, rx)
            })?;
        let confined = confined_rx
            .recv()
            .unwrap_or_else(|_| Err("the thread exited before confining itself".into()));
        if let Err(e) = confined {
            let _ = thread.join();
            return Err(std::io::Error::other(format!("seccomp for {name}: {e}")));
        }
        Ok(WorkerHandle {
            commands: Some(tx),
            wake,
            thread: Some(thread),
        })
    }

    fn send(&self, cmd: Command<A>) -> bool {
        let sent = self.commands.as_ref().is_some_and(|c| c.send(cmd).is_ok());
        sent && self.wake.write(1).is_ok()
    }

    /// Hands `activation` to the thread and waits (bounded) for its verdict.
    pub(crate) fn activate(&self, activation: A) -> Result<(), String> {
        let (tx, rx) = mpsc::channel();
        if !self.send(Command::Activate(activation, tx)) {
            return Err("device I/O thread is gone".into());
        }
        match rx.recv_timeout(ANSWER_TIMEOUT) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err("device I/O thread did not answer".into()),
            Err(RecvTimeoutError::Disconnected) => Err("device I/O thread exited".into()),
        }
    }

    /// Asks the thread to drop the queues; false if it could not (in time).
    pub(crate) fn reset(&self) -> bool {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Reset(tx)) && rx.recv_timeout(ANSWER_TIMEOUT).unwrap_or(false)
    }

    /// Makes the thread stop serving its fds; true once it is idle (bounded wait).
    pub(crate) fn pause(&self) -> bool {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Pause(tx)) && rx.recv_timeout(ANSWER_TIMEOUT).is_ok()
    }

    /// Lets a paused thread serve its fds again (events that arrived meanwhile are pending).
    pub(crate) fn resume(&self) {
        self.send(Command::Resume);
    }
}

impl<A: Send + 'static> Drop for WorkerHandle<A> {
    fn drop(&mut self) {
        // A closed channel plus a wake-up is the stop signal.
        self.commands = None;
        let _ = self.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The I/O thread's loop: control messages first, then device events, until the handle drops.
fn run<W: DeviceWorker>(
    mut worker: W,
    epoll: Epoll,
    wake: EventFd,
    commands: Receiver<Command<W::Activation>>,
) {
    let mut events = vec![EpollEvent::default(); 32];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("virtio device epoll_wait failed, stopping its I/O thread: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            if ev.data() != CONTROL_TOKEN {
                worker.on_event(&epoll, ev.data());
                continue;
            }
            let _ = wake.read();
            loop {
                match commands.try_recv() {
                    Ok(Command::Activate(a, answer)) => {
                        let _ = answer.send(worker.activate(&epoll, a));
                    }
                    Ok(Command::Reset(answer)) => {
                        let _ = answer.send(worker.reset(&epoll));
                    }
                    Ok(Command::Pause(answer)) => {
                        let _ = answer.send(());
                        if !wait_paused(&mut worker, &epoll, &commands) {
                            return;
                        }
                    }
                    Ok(Command::Resume) => {}
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        worker.reset(&epoll);
                        return;
                    }
                }
            }
        }
    }
}

/// A paused thread's loop: commands only (blocking on the channel, not on epoll, so ready fds
/// wait) until resumed; false when the handle dropped meanwhile (the thread then ends).
fn wait_paused<W: DeviceWorker>(
    worker: &mut W,
    epoll: &Epoll,
    commands: &Receiver<Command<W::Activation>>,
) -> bool {
    loop {
        match commands.recv() {
            Ok(Command::Resume) => return true,
            Ok(Command::Pause(answer)) => {
                let _ = answer.send(());
            }
            // Only a running vCPU activates or resets a device; answer anyway, never hang one.
            Ok(Command::Activate(a, answer)) => {
                let _ = answer.send(worker.activate(epoll, a));
            }
            Ok(Command::Reset(answer)) => {
                let _ = answer.send(worker.reset(epoll));
            }
            Err(mpsc::RecvError) => {
                worker.reset(epoll);
                return false;
            }
        }
    }
}

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
    pub(crate) fn spawn<W>(name: &str, worker: W, filter: Option<FilterFn>) -> std::io::Result<Self>
    where
        W: DeviceWorker<Activation = Activation>,
    {
        Ok(QueueWorker {
            acked: 0,
            handle: WorkerHandle::spawn(name, worker, filter)?,
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

/// Stops watching `fd` (needed before dropping a duplicated eventfd: epoll keys registrations
/// on the open file, which the transport's copy keeps alive).
pub(crate) fn unwatch(epoll: &Epoll, fd: RawFd) {
    let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Records what the thread saw; its activation is an eventfd to watch under token 7.
    struct Recorder(Arc<Mutex<Vec<String>>>, Option<EventFd>);

    impl DeviceWorker for Recorder {
        type Activation = EventFd;
        fn start(&mut self, _: &Epoll) -> std::io::Result<()> {
            self.0.lock().unwrap().push("start".into());
            Ok(())
        }
        fn activate(&mut self, epoll: &Epoll, evt: EventFd) -> Result<(), String> {
            watch(epoll, evt.as_raw_fd(), 7)?;
            self.1 = Some(evt);
            self.0.lock().unwrap().push("activate".into());
            Ok(())
        }
        fn reset(&mut self, epoll: &Epoll) -> bool {
            if let Some(e) = self.1.take() {
                unwatch(epoll, e.as_raw_fd());
            }
            self.0.lock().unwrap().push("reset".into());
            true
        }
        fn on_event(&mut self, _: &Epoll, token: u64) {
            if let Some(e) = &self.1 {
                let _ = e.read();
            }
            self.0.lock().unwrap().push(format!("event {token}"));
        }
    }

    #[test]
    fn activation_events_reset_and_stop_reach_the_thread_in_order() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let handle = WorkerHandle::spawn("test-worker", Recorder(log.clone(), None), None).unwrap();
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        handle.activate(notify.try_clone().unwrap()).unwrap();
        notify.write(1).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !log.lock().unwrap().iter().any(|s| s == "event 7") {
            assert!(std::time::Instant::now() < deadline, "event never handled");
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(handle.reset());
        // After reset the (still open) eventfd is no longer watched.
        notify.write(1).unwrap();
        drop(handle);
        let seen = log.lock().unwrap().clone();
        assert_eq!(seen, ["start", "activate", "event 7", "reset", "reset"]);
    }

    fn wait_for(log: &Mutex<Vec<String>>, what: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !log.lock().unwrap().iter().any(|s| s == what) {
            assert!(std::time::Instant::now() < deadline, "{what} never seen");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn a_paused_thread_serves_nothing_until_resumed_and_stops_when_dropped() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let handle = WorkerHandle::spawn("test-worker", Recorder(log.clone(), None), None).unwrap();
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        handle.activate(notify.try_clone().unwrap()).unwrap();
        assert!(handle.pause());
        assert!(handle.pause(), "pausing twice");
        notify.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !log.lock().unwrap().iter().any(|s| s == "event 7"),
            "served while paused"
        );
        handle.resume();
        wait_for(&log, "event 7");
        // Dropped while paused: the thread still resets and ends (drop joins it).
        assert!(handle.pause());
        drop(handle);
        assert_eq!(log.lock().unwrap().last().unwrap(), "reset");
    }

    /// Makes one syscall, chosen by the test, when its eventfd fires.
    struct Syscaller(fn() -> i64, Option<EventFd>, mpsc::Sender<i64>);

    impl DeviceWorker for Syscaller {
        type Activation = EventFd;
        fn start(&mut self, _: &Epoll) -> std::io::Result<()> {
            Ok(())
        }
        fn activate(&mut self, epoll: &Epoll, evt: EventFd) -> Result<(), String> {
            watch(epoll, evt.as_raw_fd(), 1)?;
            self.1 = Some(evt);
            Ok(())
        }
        fn reset(&mut self, epoll: &Epoll) -> bool {
            if let Some(e) = self.1.take() {
                unwatch(epoll, e.as_raw_fd());
            }
            true
        }
        fn on_event(&mut self, _: &Epoll, _: u64) {
            if let Some(e) = &self.1 {
                let _ = e.read();
            }
            let _ = self.2.send((self.0)());
        }
    }

    /// In the child process: a net-io-confined worker makes the syscall named by the env var.
    const CHILD_ENV: &str = "ROOTCELL_SECCOMP_CHILD";

    fn tcp_socket() -> i64 {
        // SAFETY: plain syscall; the fd (if any) is leaked in a process about to end.
        i64::from(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) })
    }

    fn getpid() -> i64 {
        // SAFETY: no arguments.
        i64::from(unsafe { libc::getpid() })
    }

    #[test]
    fn seccomp_child_worker() {
        // Does nothing unless started by `device_thread_is_killed_outside_its_filter`.
        let Ok(which) = std::env::var(CHILD_ENV) else {
            return;
        };
        let call: fn() -> i64 = if which == "forbidden" {
            tcp_socket
        } else {
            getpid
        };
        let (tx, rx) = mpsc::channel();
        let handle = WorkerHandle::spawn(
            "confined-test",
            Syscaller(call, None, tx),
            Some(crate::seccomp::net_io_filter),
        )
        .unwrap();
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        handle.activate(notify.try_clone().unwrap()).unwrap();
        notify.write(1).unwrap();
        let got = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the syscall returned");
        drop(handle); // the confined thread also exits cleanly
        println!("CHILD-SURVIVED {got}");
    }

    fn run_child(which: &str) -> std::process::Output {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "devices::virtio::worker::tests::seccomp_child_worker",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, which)
            .output()
            .unwrap()
    }

    #[test]
    fn device_thread_is_killed_outside_its_filter() {
        use std::os::unix::process::ExitStatusExt;
        // An allowed syscall: the child survives, so the setup itself is within the filter.
        let ok = run_child("allowed");
        let text = String::from_utf8_lossy(&ok.stdout);
        assert!(
            ok.status.success() && text.contains("CHILD-SURVIVED"),
            "{ok:?}"
        );
        // socket(AF_INET) from the confined device thread kills the whole process.
        let bad = run_child("forbidden");
        assert_eq!(bad.status.signal(), Some(libc::SIGSYS), "{bad:?}");
        assert!(!String::from_utf8_lossy(&bad.stdout).contains("CHILD-SURVIVED"));
    }
}
