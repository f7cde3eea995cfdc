//! The virtio-net device driven the way the guest's driver drives it (virtio-mmio registers,
//! descriptor chains in guest memory, queue notifications, the device's interrupt), backed by a
//! real tap. Each test runs on a thread that first moves into a network namespace of its own,
//! so the tap, and the AF_PACKET socket the test uses as "the network", never touch the host's
//! network; both vanish with the thread. No KVM needed; needs root (CAP_NET_ADMIN) and
//! /dev/net/tun.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::virtq::{Buf, MmioDriver, Used};
use rootcell_vmm::devices::virtio::net::{
    NetConfig, NetDevice, NetDeviceError, NET_HDR_LEN, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU,
};
use rootcell_vmm::devices::virtio::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_STATUS;
use virtio_bindings::virtio_net::VIRTIO_NET_HDR_F_NEEDS_CSUM;

const RX: usize = 0;
const TX: usize = 1;
const T: Duration = Duration::from_secs(5);
/// An EtherType reserved for local experiments: the packet socket sees only the test's frames,
/// not the IPv6 chatter the kernel starts when the tap comes up.
const ETHERTYPE: u16 = 0x88b5;
const MAC: [u8; 6] = [0x02, 0x52, 0x43, 0x00, 0x00, 0x07];
/// Room for a 1500-byte MTU frame and its header, as the Linux driver posts.
const RX_BUF: u32 = (NET_HDR_LEN + 1514) as u32;

/// The tests share one process: one at a time, so the thread-CPU check sees one net-io thread.
static SERIAL: Mutex<()> = Mutex::new(());

fn check(rc: libc::c_int, what: &str) -> libc::c_int {
    assert!(rc >= 0, "{what}: {}", std::io::Error::last_os_error());
    rc
}

/// A tap in the calling thread's network namespace, up, with a packet socket bound to it.
struct Tap {
    fd: Arc<OwnedFd>,
    packet: OwnedFd,
}

fn ifreq(name: &str) -> [u8; 40] {
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    ifr
}

/// Opens tap `name` with `flags` (no packet socket, not up).
fn open_tap(name: &str, flags: libc::c_int) -> OwnedFd {
    // SAFETY: plain open of a device node; the fd is owned below.
    let fd = check(
        unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) },
        "open /dev/net/tun",
    );
    // SAFETY: `fd` was just opened and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut ifr = ifreq(name);
    ifr[16..18].copy_from_slice(&(flags as u16).to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq (40 bytes).
    check(
        unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, ifr.as_mut_ptr()) },
        "TUNSETIFF",
    );
    fd
}

impl Tap {
    fn new() -> Tap {
        let name = "rctest0";
        let fd = open_tap(name, libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR);
        // SAFETY: socket/ioctl/bind with properly sized structures; fds are owned below.
        unsafe {
            let s = OwnedFd::from_raw_fd(check(
                libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0),
                "socket(AF_INET)",
            ));
            let mut ifr = ifreq(name);
            check(
                libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, ifr.as_mut_ptr()),
                "SIOCGIFFLAGS",
            );
            let flags = u16::from_ne_bytes([ifr[16], ifr[17]]) | libc::IFF_UP as u16;
            ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
            check(
                libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, ifr.as_mut_ptr()),
                "SIOCSIFFLAGS",
            );
            let ifindex = libc::if_nametoindex(c"rctest0".as_ptr());
            assert_ne!(ifindex, 0, "tap has an index");
            let packet = OwnedFd::from_raw_fd(check(
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    i32::from(ETHERTYPE.to_be()),
                ),
                "socket(AF_PACKET)",
            ));
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = ETHERTYPE.to_be();
            sll.sll_ifindex = ifindex as i32;
            check(
                libc::bind(
                    packet.as_raw_fd(),
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                ),
                "bind(AF_PACKET)",
            );
            Tap {
                fd: Arc::new(fd),
                packet,
            }
        }
    }

    /// Puts `frame` on the wire: the tap transmits it, so the device reads it.
    fn inject(&self, frame: &[u8]) {
        // SAFETY: sends `frame.len()` bytes from `frame`.
        let n = unsafe {
            libc::send(
                self.packet.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
    }

    /// The next frame the tap received (what the device wrote), waiting up to `timeout`.
    fn capture(&self, timeout: Duration) -> Option<Vec<u8>> {
        let mut pfd = libc::pollfd {
            fd: self.packet.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) } != 1 {
            return None;
        }
        let mut buf = vec![0u8; 65536];
        // SAFETY: receives at most buf.len() bytes into buf.
        let n = unsafe {
            libc::recv(
                self.packet.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        (n >= 0).then(|| {
            buf.truncate(n as usize);
            buf
        })
    }

    fn config(&self, mtu: u16) -> NetConfig {
        NetConfig {
            tap: self.fd.clone(),
            mac: MAC,
            mtu,
        }
    }
}

/// Runs `f` on a thread inside a fresh network namespace; skips (with a message) where the
/// host does not allow one or has no tun driver.
fn in_netns(test: &str, f: impl FnOnce() + Send + 'static) {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tun = std::path::Path::new("/dev/net/tun").exists();
    if !rootcell_test_support::require(test, tun, "/dev/net/tun is absent", "load the tun module") {
        return;
    }
    let test = test.to_owned();
    let r = std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread's namespaces.
        let netns = unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0;
        let why = format!(
            "cannot create a network namespace: {}",
            std::io::Error::last_os_error()
        );
        if !rootcell_test_support::require(&test, netns, &why, "run as root") {
            return;
        }
        f();
    })
    .join();
    if let Err(panic) = r {
        std::panic::resume_unwind(panic);
    }
}

/// An Ethernet frame of our test EtherType; `tag` makes each one distinct.
fn frame(tag: u8, payload_len: usize) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0xaa]);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend((0..payload_len).map(|i| (i as u8).wrapping_mul(7) ^ tag));
    f
}

/// The header the device must put before every received frame: no flags, no GSO, one buffer.
fn rx_header() -> Vec<u8> {
    let mut h = vec![0u8; NET_HDR_LEN];
    h[10] = 1;
    h
}

/// Waits for the RX entry carrying one of our frames (other entries hold the kernel's own
/// traffic on the new link, e.g. IPv6 neighbour discovery).
fn receive(drv: &mut MmioDriver) -> Used {
    let deadline = Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let u = drv
            .wait_used(RX, left)
            .expect("a frame reached an RX buffer");
        if u.data.len() >= NET_HDR_LEN + 14
            && u.data[NET_HDR_LEN + 12..NET_HDR_LEN + 14] == ETHERTYPE.to_be_bytes()
        {
            return u;
        }
        drv.send(RX, &[Buf::Writable(RX_BUF)]);
    }
}

fn probe(
    tap: &Tap,
    features: u64,
) -> (
    MmioDriver,
    Arc<rootcell_vmm::devices::virtio::net::NetCounters>,
) {
    let dev = NetDevice::new(&tap.config(1500)).unwrap();
    let counters = dev.counters();
    let mut drv = MmioDriver::new(Box::new(dev));
    drv.probe(VIRTIO_ID_NET, features, 2);
    (drv, counters)
}

fn frames_both_ways(event_idx: bool) {
    let tap = Tap::new();
    let (mut drv, counters) = probe(
        &tap,
        if event_idx {
            VIRTIO_RING_F_EVENT_IDX
        } else {
            0
        },
    );
    for _ in 0..16 {
        drv.offer(RX, &[Buf::Writable(RX_BUF)]);
    }
    drv.notify(RX);

    // Network -> guest.
    let f = frame(1, 200);
    tap.inject(&f);
    let u = receive(&mut drv);
    assert_eq!(u.len as usize, NET_HDR_LEN + f.len());
    assert_eq!(u.data[..NET_HDR_LEN], rx_header()[..]);
    assert_eq!(u.data[NET_HDR_LEN..], f[..]);
    assert!(drv.interrupted(T), "the device interrupted the guest");

    // Guest -> network, header and frame in separate descriptors and the frame split in two.
    // The header asks for checksum offload with nonsense offsets: the tap would refuse the
    // frame if the device passed it through, and the guest never negotiated offloads.
    let f = frame(2, 300);
    let mut hdr = vec![0u8; NET_HDR_LEN];
    hdr[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    hdr[6..8].copy_from_slice(&60000u16.to_le_bytes()); // csum_start
    let head = drv.send(
        TX,
        &[
            Buf::Readable(hdr),
            Buf::Readable(f[..20].to_vec()),
            Buf::Readable(f[20..].to_vec()),
        ],
    );
    let u = drv.wait_used(TX, T).expect("TX chain returned");
    assert_eq!((u.head, u.len), (head, 0));
    assert_eq!(tap.capture(T).expect("frame on the tap"), f);

    // Many frames each way.
    for i in 0..20u8 {
        drv.send(
            TX,
            &[
                Buf::Readable(vec![0; NET_HDR_LEN]),
                Buf::Readable(frame(i, 64)),
            ],
        );
        drv.wait_used(TX, T).expect("TX chain returned");
        assert_eq!(tap.capture(T).expect("frame on the tap"), frame(i, 64));
    }
    for i in 0..20u8 {
        tap.inject(&frame(100 + i, 1000));
        assert_eq!(
            receive(&mut drv).data[NET_HDR_LEN..],
            frame(100 + i, 1000)[..]
        );
        drv.send(RX, &[Buf::Writable(RX_BUF)]);
    }
    let n = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(n(&counters.tx_frames), 21);
    assert!(n(&counters.rx_frames) >= 21);
    assert_eq!(n(&counters.bad_chains), 0);
}

#[test]
fn frames_cross_between_guest_buffers_and_a_real_tap() {
    in_netns("frames_cross_between_guest_buffers_and_a_real_tap", || {
        frames_both_ways(false)
    });
}

#[test]
fn frames_cross_with_event_idx() {
    in_netns("frames_cross_with_event_idx", || frames_both_ways(true));
}

#[test]
fn features_and_config_space_carry_mac_and_mtu() {
    in_netns("features_and_config_space_carry_mac_and_mtu", || {
        let tap = Tap::new();
        for (mtu, offers_mtu) in [(9000u16, true), (0, false)] {
            let mut drv = MmioDriver::new(Box::new(NetDevice::new(&tap.config(mtu)).unwrap()));
            let features = drv.probe(VIRTIO_ID_NET, VIRTIO_NET_F_MAC | VIRTIO_NET_F_MTU, 2);
            assert_ne!(features & VIRTIO_F_VERSION_1, 0);
            assert_ne!(features & VIRTIO_NET_F_MAC, 0);
            assert_eq!(features & VIRTIO_NET_F_MTU != 0, offers_mtu);
            let cfg = drv.config(12);
            assert_eq!(cfg[..6], MAC);
            assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), mtu);
            // Past the config structure: zeros.
            assert_eq!(drv.config(16)[12..], [0u8; 4]);
        }
        // An MTU no guest can use is refused up front.
        let err = NetDevice::new(&tap.config(20)).unwrap_err();
        assert!(matches!(err, NetDeviceError::Mtu(20)), "{err}");
    });
}

#[test]
fn a_tap_without_vnet_header_is_refused() {
    in_netns("a_tap_without_vnet_header_is_refused", || {
        let fd = open_tap("rcplain0", libc::IFF_TAP | libc::IFF_NO_PI);
        let err = NetDevice::new(&NetConfig {
            tap: Arc::new(fd),
            mac: MAC,
            mtu: 1500,
        })
        .unwrap_err();
        assert!(matches!(err, NetDeviceError::NotATap(_)), "{err}");
    });
}

#[test]
fn malformed_chains_are_returned_and_the_device_keeps_working() {
    in_netns(
        "malformed_chains_are_returned_and_the_device_keeps_working",
        || {
            let tap = Tap::new();
            let (mut drv, counters) = probe(&tap, 0);
            let outside = 0x4000_0000; // beyond the test VM's 64 MiB
            let bad_tx: Vec<Vec<Buf>> = vec![
                // Too short for a header and an Ethernet header.
                vec![Buf::Readable(vec![0; 20])],
                // Write-only where the device must read.
                vec![Buf::Readable(vec![0; NET_HDR_LEN]), Buf::Writable(100)],
                // Outside guest RAM, and straddling its end.
                vec![Buf::At {
                    addr: outside,
                    len: 100,
                    writable: false,
                }],
                vec![Buf::At {
                    addr: (64 << 20) - 50,
                    len: 100,
                    writable: false,
                }],
                // Longer than any frame.
                vec![Buf::At {
                    addr: 0x200_0000,
                    len: 0x20_0000,
                    writable: false,
                }],
            ];
            let count = bad_tx.len() as u64;
            for bufs in bad_tx {
                let head = drv.send(TX, &bufs);
                let u = drv.wait_used(TX, T).expect("bad TX chain handed back");
                assert_eq!((u.head, u.len), (head, 0));
            }
            assert!(
                tap.capture(Duration::from_millis(200)).is_none(),
                "nothing reached the tap"
            );
            let n = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
            assert_eq!(n(&counters.bad_chains), count);

            // Bad RX chains: readable, and outside RAM. Both come back empty; the frame goes to
            // the good buffer after them.
            let bad1 = drv.offer(RX, &[Buf::Readable(vec![0; RX_BUF as usize])]);
            let bad2 = drv.offer(
                RX,
                &[Buf::At {
                    addr: outside,
                    len: RX_BUF,
                    writable: true,
                }],
            );
            drv.offer(RX, &[Buf::Writable(RX_BUF)]);
            drv.notify(RX);
            let f = frame(9, 100);
            tap.inject(&f);
            let mut heads = Vec::new();
            loop {
                let u = drv.wait_used(RX, T).expect("RX entries");
                if u.head == bad1 || u.head == bad2 {
                    assert_eq!(u.len, 0);
                    heads.push(u.head);
                    continue;
                }
                if u.data.get(NET_HDR_LEN..) == Some(&f[..]) {
                    break;
                }
                drv.send(RX, &[Buf::Writable(RX_BUF)]); // kernel chatter took it
            }
            assert_eq!(heads, [bad1, bad2]);

            // A well-formed buffer too small for the frame: the frame is dropped, the buffer stays.
            drv.send(RX, &[Buf::Writable(40)]);
            tap.inject(&frame(10, 500));
            std::thread::sleep(Duration::from_millis(200));
            assert!(n(&counters.dropped) >= 1);
            // And a good TX chain still goes out.
            drv.send(
                TX,
                &[
                    Buf::Readable(vec![0; NET_HDR_LEN]),
                    Buf::Readable(frame(11, 64)),
                ],
            );
            assert_eq!(tap.capture(T).expect("frame on the tap"), frame(11, 64));
        },
    );
}

/// CPU time (user + system, in clock ticks) of this process's thread named `name`.
fn thread_cpu_ticks(name: &str) -> u64 {
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
        // Fields after the parenthesised command: state is field 3, utime 14, stime 15.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        return f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    }
    panic!("no thread named {name}");
}

#[test]
fn without_rx_buffers_the_device_waits_instead_of_spinning() {
    in_netns(
        "without_rx_buffers_the_device_waits_instead_of_spinning",
        || {
            let tap = Tap::new();
            let (mut drv, counters) = probe(&tap, 0);
            for i in 0..5u8 {
                tap.inject(&frame(i, 100));
            }
            let before = thread_cpu_ticks("net-io");
            std::thread::sleep(Duration::from_millis(500));
            let spent = thread_cpu_ticks("net-io") - before;
            assert!(
                spent <= 5,
                "net-io used {spent} ticks with no RX buffer (busy loop?)"
            );
            // Buffers arrive: every frame that waited is delivered, in order.
            for _ in 0..32 {
                drv.offer(RX, &[Buf::Writable(RX_BUF)]);
            }
            drv.notify(RX);
            for i in 0..5u8 {
                assert_eq!(receive(&mut drv).data[NET_HDR_LEN..], frame(i, 100)[..]);
            }
            let n = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
            assert_eq!(n(&counters.dropped), 0);
        },
    );
}

#[test]
fn reset_and_reprobe_keep_the_tap_working() {
    in_netns("reset_and_reprobe_keep_the_tap_working", || {
        let tap = Tap::new();
        let (mut drv, _) = probe(&tap, VIRTIO_RING_F_EVENT_IDX);
        drv.send(
            TX,
            &[
                Buf::Readable(vec![0; NET_HDR_LEN]),
                Buf::Readable(frame(1, 64)),
            ],
        );
        assert_eq!(tap.capture(T).expect("frame before reset"), frame(1, 64));
        drv.reset();
        assert_eq!(drv.read(VIRTIO_MMIO_STATUS), 0, "status after reset");
        drv.probe(VIRTIO_ID_NET, 0, 2);
        drv.send(RX, &[Buf::Writable(RX_BUF)]);
        tap.inject(&frame(2, 64));
        assert_eq!(receive(&mut drv).data[NET_HDR_LEN..], frame(2, 64)[..]);
        drv.send(
            TX,
            &[
                Buf::Readable(vec![0; NET_HDR_LEN]),
                Buf::Readable(frame(3, 64)),
            ],
        );
        assert_eq!(tap.capture(T).expect("frame after reset"), frame(3, 64));
    });
}

#[test]
fn a_tap_deleted_under_the_device_costs_no_cpu_and_tx_still_completes() {
    in_netns(
        "a_tap_deleted_under_the_device_costs_no_cpu_and_tx_still_completes",
        || {
            let tap = Tap::new();
            let (mut drv, counters) = probe(&tap, 0);
            for _ in 0..8 {
                drv.offer(RX, &[Buf::Writable(RX_BUF)]);
            }
            drv.notify(RX);
            // `ip` runs in this thread's network namespace (a child inherits it).
            let st = std::process::Command::new("ip")
                .args(["link", "del", "rctest0"])
                .status()
                .expect("run ip");
            assert!(st.success(), "ip link del: {st}");
            std::thread::sleep(Duration::from_millis(100));
            let before = thread_cpu_ticks("net-io");
            std::thread::sleep(Duration::from_millis(500));
            let spent = thread_cpu_ticks("net-io") - before;
            assert!(
                spent <= 5,
                "net-io used {spent} ticks on a dead tap (busy loop?)"
            );
            // The guest's transmissions are still handed back (and counted as dropped).
            let head = drv.send(
                TX,
                &[
                    Buf::Readable(vec![0; NET_HDR_LEN]),
                    Buf::Readable(frame(1, 64)),
                ],
            );
            let u = drv.wait_used(TX, T).expect("TX chain returned");
            assert_eq!(u.head, head);
            let n = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
            assert_eq!(n(&counters.tx_frames), 0);
            assert!(n(&counters.dropped) >= 1);
        },
    );
}
