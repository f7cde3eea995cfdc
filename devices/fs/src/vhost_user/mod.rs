//! The vhost-user front end: serves [`FsDevice`] to QEMU's `vhost-user-fs-device` from
//! background threads of the calling process.
//!
//! Threads: one "rootcell-fs" thread waits for the VMM to connect and then for the session to
//! end; `vhost-user-backend` adds a request thread for the vhost-user socket and one vring
//! worker that runs the FUSE requests of both queues; a "rootcell-fs-stop" thread waits for a
//! stop while a VMM is connected and then shuts the connection down.

mod backend;
mod conn;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vhost::vhost_user::{Error as VhostUserError, Listener};
#[cfg(test)]
use vhost::vhost_user::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{Error as DaemonError, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::backend::FsBackend;
use crate::device::FsDevice;
use crate::fd_table::Relay;
use crate::passthrough::{check_shared_dir, raise_nofile_limit};
use crate::{Error, FsConfig};

/// Starts a vhost-user-fs backend: binds and listens on `vhost_user_socket` (QEMU connects to it
/// as a client) before returning, so the VMM can be started right after; serves from background
/// threads until the VMM disconnects or `stop` is called.
///
/// One VMM connection is served; the socket file is removed when the backend finishes.
pub fn serve_vhost_user(
    vhost_user_socket: &Path,
    config: FsConfig,
) -> Result<BackendHandle, Error> {
    serve_vhost_user_confined(vhost_user_socket, config, Jail::default())
}

/// Confines the calling thread (e.g. seccomp and capabilities); runs first on the serving
/// thread, so every thread the back end starts afterwards inherits it.
pub type Confine = Box<dyn FnOnce() -> std::io::Result<()> + Send>;

/// How the serving thread confines itself before it starts the threads that handle guest
/// requests (they inherit all of it).
#[derive(Default)]
pub struct Jail {
    /// Serve from a mount namespace whose root is the share and nothing else (see
    /// [`crate::share_root`]); needs CAP_SYS_ADMIN, so it comes before `confine`. Mounts the
    /// caller attaches inside the share later reach the back end if the share is a shared
    /// mount in the caller's namespace.
    pub share_root: bool,
    /// Serve from an fd table of the back end's own ([`crate::fd_table`]; needs
    /// `share_root`): its `/proc/self/fd`, through which the passthrough reopens inodes, then
    /// lists only what its threads hold, not the rest of the process's files. The table and
    /// every fd in it go when its threads end.
    pub own_fd_table: bool,
    /// With `own_fd_table`: fd numbers of the caller's table that the back end's threads
    /// write to through objects shared with the whole process (the log file the process's
    /// log writer holds). In the back end's table each becomes the write end of a pipe, and a
    /// thread of the caller's ("fs-log-relay") copies what arrives there to the original,
    /// so the back end's log lines still reach the log without the log file being reachable
    /// from it. The relay ends when the back end's threads do.
    pub relay: Vec<RawFd>,
    /// Then this (capabilities, seccomp).
    pub confine: Option<Confine>,
}

/// [`serve_vhost_user`], with the serving thread confined as `jail` says before it builds the
/// vhost-user daemon (whose request and vring threads it then spawns): every thread that
/// handles guest requests runs confined. A failing step fails this call.
///
/// The listening socket and the device are made on the serving thread (in its own fd table,
/// with `own_fd_table`), so everything the back end holds is its threads' alone.
pub fn serve_vhost_user_confined(
    vhost_user_socket: &Path,
    config: FsConfig,
    jail: Jail,
) -> Result<BackendHandle, Error> {
    if jail.own_fd_table && !jail.share_root {
        return Err(Error::Daemon(
            "an fd table of its own needs the share as the back end's root".into(),
        ));
    }
    // Checked here too, so a bad share fails before anything listens.
    check_shared_dir(&config.shared_dir)?;
    raise_nofile_limit();
    let _ = std::fs::remove_file(vhost_user_socket);
    // From here on the handle, or a failed start, removes the socket file.
    let socket = SocketFile(vhost_user_socket.to_owned());
    let stop = StopSignal::new()?;
    // The serving thread's own copy of the stop eventfd: its number is valid until the
    // thread reports ready, since `stop` lives until then.
    let stop_fd = stop.event.as_raw_fd();
    let requested = Arc::clone(&stop.requested);
    let socket_path = vhost_user_socket.to_owned();
    // The pipes' write ends stay in this table until the thread has its own copies.
    let relays = if jail.own_fd_table {
        jail.relay
            .iter()
            .map(|&fd| Relay::start(fd, None))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::os("relaying the back end's log", e))?
    } else {
        Vec::new()
    };
    let redirect: Vec<(RawFd, RawFd)> = relays.iter().map(Relay::redirect).collect();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), Error>>();
    let thread = std::thread::Builder::new()
        .name("rootcell-fs".to_owned())
        .spawn(move || {
            let confined = (|| {
                let event = if jail.own_fd_table {
                    crate::fd_table::unshare_keeping(&[stop_fd], &redirect)
                        .map_err(|e| Error::os("giving the virtio-fs thread its own fds", e))?;
                    // SAFETY: this thread's table's copy of the stop eventfd, owned by
                    // nothing else in this table (the process's copy is `stop`'s).
                    unsafe { OwnedFd::from_raw_fd(stop_fd) }
                } else {
                    // SAFETY: F_DUPFD_CLOEXEC of a live eventfd; the result is ours.
                    let dup = unsafe { libc::fcntl(stop_fd, libc::F_DUPFD_CLOEXEC, 0) };
                    if dup < 0 {
                        return Err(Error::os(
                            "duplicating the stop eventfd",
                            std::io::Error::last_os_error(),
                        ));
                    }
                    // SAFETY: a fresh fd nothing else owns.
                    unsafe { OwnedFd::from_raw_fd(dup) }
                };
                // Bound here, in the host's view (vhost's `Listener::new` would remove the
                // file by path once the root is the share); the handle removes it.
                let listener = std::os::unix::net::UnixListener::bind(&socket_path)
                    .map(Listener::from)
                    .map_err(|e| Error::Listen {
                        path: socket_path.clone(),
                        reason: e.to_string(),
                    })?;
                let share = FsConfig {
                    shared_dir: crate::share_root::SHARE_PATH.into(),
                    read_only: config.read_only,
                };
                let in_root = |e| Error::os("giving the virtio-fs thread the share as root", e);
                let device = if jail.own_fd_table {
                    // The passthrough opens /proc/self/{fd,mountinfo} after the pivot: the
                    // thread's own, bound there.
                    crate::share_root::enter_with_own_fds(&config.shared_dir).map_err(in_root)?;
                    crate::share_root::pivot().map_err(in_root)?;
                    FsDevice::new(&share)?
                } else if jail.share_root {
                    crate::share_root::enter(&config.shared_dir).map_err(in_root)?;
                    let device = FsDevice::new(&share)?;
                    crate::share_root::pivot().map_err(in_root)?;
                    device
                } else {
                    FsDevice::new(&config)?
                };
                if let Some(confine) = jail.confine {
                    confine().map_err(|e| Error::os("confining the virtio-fs thread", e))?;
                }
                Ok((device, listener, event))
            })();
            let (device, listener, event) = match confined {
                Ok(all) => all,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return Ok(());
                }
            };
            let daemon = VhostUserDaemon::new(
                "rootcell-fs-vhost".to_owned(),
                Arc::new(FsBackend::new(device)),
                GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            )
            .map_err(|e| Error::Daemon(e.to_string()));
            match daemon {
                Ok(daemon) => {
                    let _ = ready_tx.send(Ok(()));
                    run(
                        listener,
                        daemon,
                        ThreadStop {
                            requested,
                            event: Some(event),
                        },
                    )
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    Ok(())
                }
            }
        })
        .map_err(|e| Error::os("spawning the virtio-fs thread", e))?;
    let ready = ready_rx
        .recv()
        .unwrap_or_else(|_| Err(Error::Daemon("the virtio-fs thread ended early".into())));
    // The thread holds its copies now (or has failed): once its table goes, the relays see
    // the end of their pipes.
    drop(relays);
    if let Err(e) = ready {
        let _ = thread.join();
        return Err(e);
    }
    Ok(BackendHandle {
        stop,
        thread: Mutex::new(Some(thread)),
        _socket: socket,
    })
}

/// The listening socket's file, removed when the handle goes (or the start fails).
struct SocketFile(std::path::PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Handle on a running vhost-user-fs backend.
pub struct BackendHandle {
    stop: StopSignal,
    thread: Mutex<Option<JoinHandle<Result<(), Error>>>>,
    _socket: SocketFile,
}

impl BackendHandle {
    /// Blocks until the backend has finished (VMM disconnected or stopped); returns its outcome.
    pub fn wait(self) -> Result<(), Error> {
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        match thread {
            Some(thread) => thread.join().map_err(|_| Error::Panicked)?,
            None => Ok(()),
        }
        // `self` drops here: the socket file goes.
    }

    /// Asks the backend threads to finish (idempotent); also done on drop.
    ///
    /// Stops waiting for a VMM that has not connected yet, or shuts down the connection of one
    /// that has (the VMM then sees the backend disconnect).
    pub fn stop(&self) {
        self.stop.request();
    }
}

impl Drop for BackendHandle {
    fn drop(&mut self) {
        // Not joined here: a FUSE request stuck on a host file (a FIFO, a hung NFS mount) would
        // make drop block forever. `wait` is the way to join.
        self.stop.request();
    }
}

/// The caller's side of a stop: a flag and an eventfd the back end's threads wait on. Only
/// the eventfd crosses to them (by its object, not its number: with an fd table of their own
/// they hold a copy of it), so a stop needs no fd of theirs; they shut their connection down
/// themselves ([`run`]).
struct StopSignal {
    requested: Arc<AtomicBool>,
    event: EventFd,
}

impl StopSignal {
    fn new() -> Result<Self, Error> {
        Ok(StopSignal {
            requested: Arc::new(AtomicBool::new(false)),
            event: EventFd::new(EFD_NONBLOCK)
                .map_err(|e| Error::os("creating the stop eventfd", e))?,
        })
    }

    fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        // Never read: once written it stays readable for every poll.
        let _ = self.event.write(1);
    }
}

/// The serving thread's side of a stop: the flag and its own fd of the eventfd.
struct ThreadStop {
    requested: Arc<AtomicBool>,
    /// Taken by the thread that watches it once a VMM is connected.
    event: Option<OwnedFd>,
}

impl ThreadStop {
    fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }
}

/// Body of the "rootcell-fs" thread.
fn run(
    mut listener: Listener,
    mut daemon: VhostUserDaemon<Arc<FsBackend>>,
    mut stop: ThreadStop,
) -> Result<(), Error> {
    let event = stop.event.take().expect("the stop eventfd");
    if !wait_for_connection(&listener, &stop, &event)? {
        return Ok(());
    }
    daemon
        .start(&mut listener)
        .map_err(|e| Error::Daemon(e.to_string()))?;
    // The daemon offers no way to end a session early; its request thread blocks on the
    // connection until the VMM hangs up. A thread of the back end's (its fd table) waits for
    // a stop and shuts the connection down, which wakes that request thread.
    let watcher = Watcher::start(conn::accepted_connections(&listener), event)?;
    let outcome = daemon.wait();
    watcher.finish();
    // Dropping the daemon signals the vring worker's exit event and joins it.
    drop(daemon);
    drop(listener);
    match outcome {
        Ok(()) => Ok(()),
        Err(DaemonError::HandleRequest(
            VhostUserError::Disconnected
            | VhostUserError::PartialMessage
            | VhostUserError::SocketBroken(_),
        )) => Ok(()),
        Err(_) if stop.is_requested() => Ok(()),
        Err(e) => Err(Error::Daemon(e.to_string())),
    }
}

/// The "rootcell-fs-stop" thread: waits for a stop (then shuts the VMM connection down) or
/// for the session's end.
struct Watcher {
    done: EventFd,
    thread: JoinHandle<()>,
}

impl Watcher {
    fn start(connections: Vec<OwnedFd>, stop: OwnedFd) -> Result<Self, Error> {
        let done = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::os("creating an eventfd", e))?;
        let done_fd = done
            .try_clone()
            .map_err(|e| Error::os("creating an eventfd", e))?;
        let thread = std::thread::Builder::new()
            .name("rootcell-fs-stop".to_owned())
            .spawn(move || {
                let stopped =
                    wait_readable(&[stop.as_raw_fd(), done_fd.as_raw_fd()]).is_ok_and(|i| i == 0);
                if stopped {
                    connections.iter().for_each(conn::shutdown);
                }
            })
            .map_err(|e| Error::os("spawning the virtio-fs stop thread", e))?;
        Ok(Watcher { done, thread })
    }

    /// Ends the thread (the session is over) and joins it.
    fn finish(self) {
        let _ = self.done.write(1);
        let _ = self.thread.join();
    }
}

/// Blocks until one of `fds` is readable (or hung up); the index of the first such.
fn wait_readable(fds: &[RawFd]) -> std::io::Result<usize> {
    let mut polled: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `polled` is a valid array of pollfd for the duration of the call.
        let rc = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if let Some(i) = polled.iter().position(|p| p.revents != 0) {
            return Ok(i);
        }
    }
}

/// Waits until the VMM connects (true) or a stop is requested (false).
fn wait_for_connection(
    listener: &Listener,
    stop: &ThreadStop,
    event: &OwnedFd,
) -> Result<bool, Error> {
    if stop.is_requested() {
        return Ok(false);
    }
    match wait_readable(&[event.as_raw_fd(), listener.as_raw_fd()]) {
        Ok(0) => Ok(false),
        Ok(_) => Ok(true),
        Err(e) => Err(Error::os("waiting for the VMM to connect", e)),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use vhost::vhost_user::{Frontend, VhostUserFrontend};
    use vhost::VhostBackend;
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

    use super::*;

    fn config(dir: &Path) -> FsConfig {
        FsConfig {
            shared_dir: dir.to_owned(),
            read_only: false,
        }
    }

    /// Runs `wait` on another thread and fails the test if it does not return in time.
    fn wait_bounded(handle: BackendHandle) -> Result<(), Error> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(handle.wait());
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("backend did not finish in time")
    }

    #[test]
    fn listens_before_returning_and_stops_without_a_vmm() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("fs.sock");
        let handle = serve_vhost_user(&socket, config(dir.path())).unwrap();
        // Bound and listening already: a connect succeeds right away.
        assert!(std::os::unix::net::UnixStream::connect(&socket).is_ok());
        handle.stop();
        handle.stop();
        assert!(wait_bounded(handle).is_ok());
        assert!(!socket.exists(), "socket file removed");
    }

    #[test]
    fn stop_before_any_connection_returns_promptly() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("fs.sock");
        let handle = serve_vhost_user(&socket, config(dir.path())).unwrap();
        let start = Instant::now();
        handle.stop();
        assert!(wait_bounded(handle).is_ok());
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn negotiates_with_a_frontend_and_ends_when_it_hangs_up() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("fs.sock");
        let handle = serve_vhost_user(&socket, config(dir.path())).unwrap();
        let mut frontend = Frontend::connect(&socket, 2).unwrap();
        frontend.set_owner().unwrap();
        let features = frontend.get_features().unwrap();
        assert_ne!(features & (1 << VIRTIO_F_VERSION_1), 0);
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        assert_ne!(features & protocol_bit, 0);
        frontend.set_features(features).unwrap();
        let protocol = frontend.get_protocol_features().unwrap();
        assert!(protocol.contains(VhostUserProtocolFeatures::MQ));
        frontend.set_protocol_features(protocol).unwrap();
        assert_eq!(frontend.get_queue_num().unwrap(), 2);
        drop(frontend);
        assert!(wait_bounded(handle).is_ok());
    }

    #[test]
    fn stop_shuts_down_a_connected_vmm() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("fs.sock");
        let handle = serve_vhost_user(&socket, config(dir.path())).unwrap();
        let frontend = Frontend::connect(&socket, 2).unwrap();
        frontend.set_owner().unwrap();
        assert!(frontend.get_features().is_ok());
        handle.stop();
        assert!(wait_bounded(handle).is_ok());
        // The frontend now finds the backend gone.
        assert!(frontend.get_features().is_err());
    }

    #[test]
    fn refuses_a_bad_share_before_listening() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("fs.sock");
        let err = serve_vhost_user(&socket, config(&dir.path().join("missing"))).err();
        assert!(matches!(err, Some(Error::SharedDir { .. })));
        assert!(!socket.exists());
    }
}
