//! The vhost-user front end: serves [`FsDevice`] to QEMU's `vhost-user-fs-device` from
//! background threads of the calling process.
//!
//! Threads: one "rootcell-fs" thread waits for the VMM to connect and then for the session to
//! end; `vhost-user-backend` adds a request thread for the vhost-user socket and one vring
//! worker that runs the FUSE requests of both queues.

mod backend;
mod conn;

use std::os::fd::{AsRawFd, OwnedFd};
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
    /// Then this (capabilities, seccomp).
    pub confine: Option<Confine>,
}

/// [`serve_vhost_user`], with the serving thread confined as `jail` says before it builds the
/// vhost-user daemon (whose request and vring threads it then spawns): every thread that
/// handles guest requests runs confined. A failing step fails this call.
pub fn serve_vhost_user_confined(
    vhost_user_socket: &Path,
    config: FsConfig,
    jail: Jail,
) -> Result<BackendHandle, Error> {
    // With its own root the device is opened on the serving thread, between the namespace
    // and the pivot; the share is checked here anyway, so a bad one fails before listening.
    let mut device = if jail.share_root {
        check_shared_dir(&config.shared_dir)?;
        None
    } else {
        Some(FsDevice::new(&config)?)
    };
    raise_nofile_limit();
    // Bound here (not by vhost's `Listener::new`, which would remove the file by path from the
    // serving thread, whose root is the share); the handle removes it.
    let _ = std::fs::remove_file(vhost_user_socket);
    let listener = std::os::unix::net::UnixListener::bind(vhost_user_socket)
        .map(Listener::from)
        .map_err(|e| Error::Listen {
            path: vhost_user_socket.to_owned(),
            reason: e.to_string(),
        })?;
    let stop = Arc::new(StopSignal::new()?);
    let thread_stop = Arc::clone(&stop);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), Error>>();
    let thread = std::thread::Builder::new()
        .name("rootcell-fs".to_owned())
        .spawn(move || {
            let confined = (|| {
                if jail.share_root {
                    crate::share_root::enter(&config.shared_dir).map_err(|e| {
                        Error::os("giving the virtio-fs thread the share as root", e)
                    })?;
                    device = Some(FsDevice::new(&FsConfig {
                        shared_dir: crate::share_root::SHARE_PATH.into(),
                        read_only: config.read_only,
                    })?);
                    crate::share_root::pivot().map_err(|e| {
                        Error::os("giving the virtio-fs thread the share as root", e)
                    })?;
                }
                if let Some(confine) = jail.confine {
                    confine().map_err(|e| Error::os("confining the virtio-fs thread", e))?;
                }
                device.ok_or_else(|| Error::Daemon("no device".into()))
            })();
            let device = match confined {
                Ok(device) => device,
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
                    run(listener, daemon, &thread_stop)
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    Ok(())
                }
            }
        })
        .map_err(|e| Error::os("spawning the virtio-fs thread", e))?;
    let socket = SocketFile(vhost_user_socket.to_owned());
    let ready = ready_rx
        .recv()
        .unwrap_or_else(|_| Err(Error::Daemon("the virtio-fs thread ended early".into())));
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
    stop: Arc<StopSignal>,
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

/// Shared between the handle and the serving thread: the stop request and the connection.
struct StopSignal {
    requested: AtomicBool,
    event: EventFd,
    connections: Mutex<Vec<OwnedFd>>,
}

impl StopSignal {
    fn new() -> Result<Self, Error> {
        Ok(StopSignal {
            requested: AtomicBool::new(false),
            event: EventFd::new(EFD_NONBLOCK)
                .map_err(|e| Error::os("creating the stop eventfd", e))?,
            connections: Mutex::new(Vec::new()),
        })
    }

    fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        let _ = self.event.write(1);
        for fd in self
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            conn::shutdown(fd);
        }
    }

    fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Remembers the VMM connection; shuts it down at once if a stop came first.
    fn set_connections(&self, fds: Vec<OwnedFd>) {
        let mut connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        *connections = fds;
        if self.is_requested() {
            connections.iter().for_each(conn::shutdown);
        }
    }
}

/// Body of the "rootcell-fs" thread.
fn run(
    mut listener: Listener,
    mut daemon: VhostUserDaemon<Arc<FsBackend>>,
    stop: &StopSignal,
) -> Result<(), Error> {
    if !wait_for_connection(&listener, stop)? {
        return Ok(());
    }
    daemon
        .start(&mut listener)
        .map_err(|e| Error::Daemon(e.to_string()))?;
    stop.set_connections(conn::accepted_connections(&listener));
    let outcome = daemon.wait();
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

/// Waits until the VMM connects (true) or a stop is requested (false).
fn wait_for_connection(listener: &Listener, stop: &StopSignal) -> Result<bool, Error> {
    loop {
        if stop.is_requested() {
            return Ok(false);
        }
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.event.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::os("waiting for the VMM to connect", err));
        }
        if fds[1].revents != 0 {
            return Ok(false);
        }
        if fds[0].revents != 0 {
            return Ok(true);
        }
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
