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

use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

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
