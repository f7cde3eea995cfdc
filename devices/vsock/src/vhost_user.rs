//! vhost-user front end: serves the [`VsockMuxer`] to a VMM such as QEMU's
//! `vhost-user-vsock-device`.

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use vhost::vhost_user::{
    Error as VhostUserError, Listener, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost_user_backend::{
    Error as DaemonError, ShutdownHandle, VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::muxer::{ChainError, VsockMuxer};
use crate::{Error, VsockConfig};

const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
const EVT_QUEUE: u16 = 2;
const NUM_QUEUES: usize = 3;
/// Token of the muxer's epoll fd in the worker's epoll (0..=NUM_QUEUES are reserved).
const MUXER_EVENT: u16 = NUM_QUEUES as u16 + 1;
const MAX_QUEUE_SIZE: usize = 1024;

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// The vhost-user backend state guarded by the daemon's lock.
struct VsockBackend {
    muxer: VsockMuxer,
    mem: Option<Mem>,
    /// Consumer/notifier pair that stops the vring worker thread.
    exit: (EventConsumer, EventNotifier),
}

impl VsockBackend {
    /// Runs `f` on the queue of `vring` if the driver has set it up, then signals the guest
    /// if `f` says so.
    fn with_queue(
        &mut self,
        vring: &VringRwLock,
        f: impl FnOnce(&mut VsockMuxer, &mut Queue, &GuestMemoryMmap) -> Result<bool, ChainError>,
    ) -> io::Result<()> {
        let Some(mem) = self.mem.as_ref().map(|m| m.memory()) else {
            return Ok(());
        };
        let notify = {
            let mut state = vring.get_mut();
            if !state.is_enabled() || !state.get_queue().ready() {
                return Ok(());
            }
            f(&mut self.muxer, state.get_queue_mut(), &mem).map_err(io::Error::other)?
        };
        if notify {
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}

impl VhostUserBackendMut for VsockBackend {
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
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // CONFIG: QEMU reads the guest CID through VHOST_USER_GET_CONFIG.
        VhostUserProtocolFeatures::CONFIG
    }

    fn set_event_idx(&mut self, _enabled: bool) {
        // The library applies it to each queue; the muxer's queue helpers follow the queue.
    }

    fn reset_device(&mut self) {
        self.muxer.reset();
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // struct virtio_vsock_config { le64 guest_cid; }
        let cfg = self.muxer.guest_cid().to_le_bytes();
        let start = (offset as usize).min(cfg.len());
        let end = start.saturating_add(size as usize).min(cfg.len());
        cfg[start..end].to_vec()
    }

    fn update_memory(&mut self, mem: Mem) -> io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((self.exit.0.try_clone().ok()?, self.exit.1.try_clone().ok()?))
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        match device_event {
            RX_QUEUE | EVT_QUEUE => {}
            TX_QUEUE => self.with_queue(&vrings[TX_QUEUE as usize], |m, q, mem| {
                m.process_tx_queue(q, mem)
            })?,
            MUXER_EVENT => self.muxer.process_host_events(),
            other => {
                return Err(io::Error::other(format!("unknown vsock event {other}")));
            }
        }
        self.with_queue(&vrings[RX_QUEUE as usize], |m, q, mem| {
            m.process_rx_queue(q, mem)
        })
    }
}

/// Shared between the handle and the serving thread.
struct StopState {
    requested: AtomicBool,
    /// Wakes the serving thread while it waits for the VMM to connect.
    wake: EventFd,
    /// Set once the VMM is connected, so `stop` can cut the vhost-user connection.
    conn: Mutex<Option<ShutdownHandle>>,
}

impl StopState {
    fn stop(&self) {
        self.requested.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
        if let Some(h) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            h.shutdown();
        }
    }
}

/// A running vhost-user vsock backend.
pub struct BackendHandle {
    stop: Arc<StopState>,
    thread: Option<JoinHandle<Result<(), Error>>>,
}

impl std::fmt::Debug for BackendHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendHandle")
            .field("running", &self.thread.is_some())
            .finish()
    }
}

impl BackendHandle {
    /// Blocks until the backend has finished (VMM disconnected or stopped); returns its outcome.
    pub fn wait(mut self) -> Result<(), Error> {
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| Error::ThreadPanicked)?,
            None => Ok(()),
        }
    }

    /// Asks the backend threads to finish (idempotent); also done on drop.
    pub fn stop(&self) {
        self.stop.stop();
    }
}

impl Drop for BackendHandle {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.stop();
            let _ = t.join();
        }
    }
}

/// Starts a vhost-user vsock backend: binds and listens on `vhost_user_socket` (QEMU connects to
/// it as a client) and binds the hybrid socket `config.uds_path`; both are bound before this
/// returns, so the VMM can be started right after. Serves from background threads until the VMM
/// disconnects or `stop` is called.
pub fn serve_vhost_user(
    vhost_user_socket: &Path,
    config: VsockConfig,
) -> Result<BackendHandle, Error> {
    serve_vhost_user_confined(vhost_user_socket, config, None)
}

/// Confines the calling thread (e.g. seccomp and capabilities); runs first on the serving
/// thread, so every thread the back end starts afterwards inherits it.
pub type Confine = Box<dyn FnOnce() -> io::Result<()> + Send>;

/// [`serve_vhost_user`], with the serving thread confined by `confine` before it builds the
/// vhost-user daemon (whose request and vring threads it then spawns): every thread that
/// handles guest packets runs confined. The sockets are bound before, by the caller's thread.
/// A failing `confine` fails this call.
pub fn serve_vhost_user_confined(
    vhost_user_socket: &Path,
    config: VsockConfig,
    confine: Option<Confine>,
) -> Result<BackendHandle, Error> {
    let muxer = VsockMuxer::new(config.guest_cid, &config.uds_path)?;
    let muxer_fd = muxer.epoll_fd();
    let bind_err = |e: VhostUserError| Error::BindVhostUser {
        path: vhost_user_socket.to_owned(),
        source: io::Error::other(e.to_string()),
    };
    let listener = Listener::new(vhost_user_socket, true).map_err(bind_err)?;
    // Non-blocking so the serving thread can wait for either the VMM or a stop request.
    listener.set_nonblocking(true).map_err(bind_err)?;
    let setup = |what| move |source| Error::Setup { what, source };
    let exit =
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).map_err(setup("worker exit event"))?;
    let stop = Arc::new(StopState {
        requested: AtomicBool::new(false),
        wake: EventFd::new(EFD_NONBLOCK).map_err(setup("stop eventfd"))?,
        conn: Mutex::new(None),
    });
    let socket_path = vhost_user_socket.to_owned();
    let thread_stop = stop.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), Error>>();
    let thread = std::thread::Builder::new()
        .name("vsock-vhost-user".into())
        .spawn(move || {
            if let Some(confine) = confine {
                if let Err(source) = confine() {
                    let _ = ready_tx.send(Err(Error::Setup {
                        what: "confining the vsock thread",
                        source,
                    }));
                    return Ok(());
                }
            }
            // The daemon starts its vring worker thread here, after the confinement.
            let daemon = (|| {
                let backend = Arc::new(RwLock::new(VsockBackend {
                    muxer,
                    mem: None,
                    exit,
                }));
                let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
                let daemon = VhostUserDaemon::new("rootcell-vsock".into(), backend, mem)
                    .map_err(|e| Error::Daemon(e.to_string()))?;
                for handler in daemon.get_epoll_handlers() {
                    handler
                        .register_listener(muxer_fd, EventSet::IN, MUXER_EVENT as u64)
                        .map_err(|source| Error::Setup {
                            what: "muxer event registration",
                            source,
                        })?;
                }
                Ok(daemon)
            })();
            match daemon {
                Ok(daemon) => {
                    let _ = ready_tx.send(Ok(()));
                    run(daemon, listener, socket_path, thread_stop)
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    let _ = std::fs::remove_file(&socket_path);
                    Ok(())
                }
            }
        })
        .map_err(setup("serving thread"))?;
    let ready = ready_rx
        .recv()
        .unwrap_or_else(|_| Err(Error::Daemon("the vsock thread ended early".into())));
    if let Err(e) = ready {
        let _ = thread.join();
        return Err(e);
    }
    Ok(BackendHandle {
        stop,
        thread: Some(thread),
    })
}

/// The serving thread: wait for the VMM, serve it until it leaves or a stop is requested.
fn run(
    mut daemon: VhostUserDaemon<Arc<RwLock<VsockBackend>>>,
    mut listener: Listener,
    socket_path: PathBuf,
    stop: Arc<StopState>,
) -> Result<(), Error> {
    let result = serve_one(&mut daemon, &mut listener, &stop);
    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
    // Dropping the daemon joins its vring worker; the muxer (and its hybrid socket file) goes
    // with the last reference to the backend.
    drop(daemon);
    drop(listener);
    let _ = std::fs::remove_file(&socket_path);
    result
}

fn serve_one(
    daemon: &mut VhostUserDaemon<Arc<RwLock<VsockBackend>>>,
    listener: &mut Listener,
    stop: &StopState,
) -> Result<(), Error> {
    if !wait_readable(listener.as_raw_fd(), stop)? {
        return Ok(());
    }
    daemon
        .start(listener)
        .map_err(|e| Error::Daemon(e.to_string()))?;
    if let Some(h) = daemon.shutdown_handle() {
        *stop.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(h.clone());
        // A stop that raced with the connection setup would have found no handle to use.
        if stop.requested.load(Ordering::SeqCst) {
            h.shutdown();
        }
    }
    match daemon.wait() {
        Ok(()) => Ok(()),
        Err(DaemonError::HandleRequest(
            VhostUserError::Disconnected | VhostUserError::PartialMessage,
        )) => Ok(()),
        Err(_) if stop.requested.load(Ordering::SeqCst) => Ok(()),
        Err(e) => Err(Error::Daemon(e.to_string())),
    }
}

/// Waits until `fd` is readable (true) or a stop was requested (false).
fn wait_readable(fd: i32, stop: &StopState) -> Result<bool, Error> {
    loop {
        if stop.requested.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let mut fds = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd structures.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::Setup {
                what: "waiting for the VMM",
                source: e,
            });
        }
        if fds[1].revents != 0 {
            return Ok(false);
        }
        if fds[0].revents != 0 {
            return Ok(true);
        }
    }
}
