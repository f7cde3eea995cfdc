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
//! The `queue_device` submodule is what the virtio-vsock, -fs and -net devices share on top of
//! this thread: [`QueueDevice`] (a device says who it is, the [`VirtioDevice`] impl is
//! common), [`QueueWorker`] (the features the driver accepted and the hand-over of the queues),
//! [`RxTx`] and the epoll registration helpers.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

mod queue_device;

pub(crate) use queue_device::{
    unwatch, watch, watch_all, Activation, QueueDevice, QueueWorker, RxTx,
};

/// Builds a device thread's seccomp allowlist for a given violation action.
pub(crate) type FilterFn = fn(seccompiler::SeccompAction) -> crate::Result<seccompiler::BpfProgram>;

/// How a device thread confines itself: the capabilities it keeps, then its seccomp allowlist.
#[derive(Clone, Copy)]
pub(crate) struct Confinement {
    /// Builds the allowlist.
    pub filter: FilterFn,
    /// Capabilities kept (see [`crate::seccomp::FS_CAPS`]); none for most devices.
    pub caps: &'static [caps::Capability],
    /// Which thread this is, for the runtime's jail ([`crate::jail`]).
    pub kind: crate::jail::ThreadKind,
}

impl Confinement {
    /// Confines the calling thread: the runtime's jail ([`crate::jail`]; `dir` is the host
    /// directory it keeps, see [`DeviceWorker::jail_dir`]), then, unless the jail says
    /// [`crate::jail::Confine::Not`], the capabilities and the allowlist (`filter`, built
    /// beforehand; built here if `None`).
    pub(crate) fn enter(
        &self,
        dir: Option<&std::path::Path>,
        filter: Option<&seccompiler::BpfProgram>,
    ) -> Result<(), String> {
        let built;
        let filter = match filter {
            Some(f) => f,
            None => {
                built = (self.filter)(ON_VIOLATION).map_err(|e| e.to_string())?;
                &built
            }
        };
        if crate::jail::enter(self.kind, dir)? == crate::jail::Confine::Not {
            return Ok(());
        }
        crate::seccomp::keep_caps(self.caps).map_err(|e| e.to_string())?;
        crate::seccomp::apply(filter).map_err(|e| e.to_string())
    }
}

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
    /// Runs first on the I/O thread, before it is confined (still with the caller's
    /// capabilities): for what only that thread may do, such as giving itself a mount
    /// namespace or an fd table of its own. `held` are the fds the thread's loop uses (its
    /// epoll and control eventfd), which a table of its own must keep.
    fn on_thread(&mut self, _held: &[RawFd]) -> Result<(), String> {
        Ok(())
    }
    /// Whether [`DeviceWorker::on_thread`] gave the thread an fd table of its own (asked on the
    /// thread after it, whether it succeeded or not).
    fn has_own_fd_table(&self) -> bool {
        false
    }
    /// The host directory the thread reaches by path once jailed (the vsock device's socket
    /// directory); none for most devices.
    fn jail_dir(&self) -> Option<std::path::PathBuf> {
        None
    }
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
    /// Spawns thread `name` running `worker`, confined as `confine` says (if at all: its
    /// capabilities restricted, then the allowlist installed) before it serves anything.
    pub(crate) fn spawn<W>(
        name: &str,
        mut worker: W,
        confine: Option<Confinement>,
    ) -> std::io::Result<Self>
    where
        W: DeviceWorker<Activation = A>,
    {
        let filter = confine
            .map(|c| (c.filter)(ON_VIOLATION))
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
        let held = [epoll.as_raw_fd(), thread_wake.as_raw_fd()];
        let (confined_tx, confined_rx) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let confined = worker.on_thread(&held).and_then(|()| match confine {
                    Some(c) => c.enter(worker.jail_dir().as_deref(), filter.as_ref()),
                    None => Ok(()),
                });
                let failed = confined.is_err();
                let _ = confined_tx.send((confined, worker.has_own_fd_table()));
                drop(confined_tx);
                if !failed {
                    run(worker, epoll, thread_wake, rx)
                }
            })?;
        let (confined, own_table) = confined_rx.recv().unwrap_or_else(|_| {
            (
                Err("the thread exited before confining itself".into()),
                false,
            )
        });
        if own_table {
            for fd in held {
                // SAFETY: `epoll` and `thread_wake` moved to the thread, whose table of its own
                // they own (and close there); in this table these numbers are owned by nothing.
                unsafe { libc::close(fd) };
            }
        }
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

#[cfg(test)]
mod tests;
