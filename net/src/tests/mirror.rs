use super::*;
use crate::{mirror, scan, Interface, NetError, NetworkConfig};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

const ETH0_MAC: [u8; 6] = [0x02, 0x42, 0xac, 0x11, 0x00, 0x02];
const PEER_MAC: [u8; 6] = [0x02, 0x42, 0xac, 0x11, 0x00, 0x99];
/// IEEE "local experimental" EtherType: nobody else sends it.
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
/// `struct virtio_net_hdr` without mergeable buffers.
pub(super) const VNET_HDR_LEN: usize = 10;

/// An Ethernet frame of EtherType `ethertype`.
pub(super) fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A 20-byte IPv4 header (protocol 253, experimental) from `src` to `dst`.
pub(super) fn ipv4(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let mut h = vec![0x45, 0, 0, 40, 0, 0, 0, 0, 64, 253, 0, 0];
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h
}

fn frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE);
    f.extend_from_slice(payload);
    f
}

/// An AF_PACKET socket bound to `ifname` in the calling thread's namespace.
pub(super) fn packet_socket(ifname: &str) -> OwnedFd {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket calls on a descriptor this function owns.
    unsafe {
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            proto.into(),
        );
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        let fd = OwnedFd::from_raw_fd(fd);
        let name = std::ffi::CString::new(ifname).unwrap();
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
        assert!(sll.sll_ifindex > 0, "no {ifname}");
        let rc = libc::bind(
            fd.as_raw_fd(),
            &sll as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        fd
    }
}

pub(super) fn write_all(fd: BorrowedFd<'_>, data: &[u8]) {
    let n = nix::unistd::write(fd, data).unwrap();
    assert_eq!(n, data.len());
}

/// Reads from `fd` until a read ends with `wanted` (other traffic, e.g. IPv6 neighbour
/// discovery, is skipped); returns that read whole. Panics after 5 s.
fn read_until(fd: BorrowedFd<'_>, wanted: &[u8]) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "timed out waiting for {:?}",
            String::from_utf8_lossy(wanted)
        );
        let mut pfd = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        if nix::poll::poll(&mut pfd, ms).unwrap() == 0 {
            continue;
        }
        let n = nix::unistd::read(fd.as_raw_fd(), &mut buf).unwrap();
        if buf[..n].ends_with(wanted) {
            return buf[..n].to_vec();
        }
    }
}

fn ingress_qdiscs(dev: &str) -> usize {
    let q = json(&sh(&format!("tc -j qdisc show dev {dev}")));
    q.as_array()
        .unwrap()
        .iter()
        .filter(|q| q["kind"] == "ingress")
        .count()
}

fn tap_names() -> Vec<String> {
    let links = json(&sh("ip -j link show"));
    links
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["ifname"].as_str().unwrap().to_string())
        .filter(|n| n.starts_with("rctap"))
        .collect()
}

#[test]
fn frames_cross_between_peer_and_tap_and_drop_leaves_nothing() {
    let peer_ns = other_netns();
    in_new_netns(move || {
        veth_to(&peer_ns, "eth0", "02:42:ac:11:00:02", 1400, "peer0");
        sh("ip link set eth0 up && ip addr add 172.17.0.2/16 dev eth0");
        sh_in(&peer_ns, "ip link set peer0 address 02:42:ac:11:00:99");
        let config = scan().unwrap();
        let m = mirror(&config).unwrap();
        let tap = &m.taps()[0];
        assert_eq!(
            (tap.name.as_str(), tap.interface.as_str(), tap.mtu),
            ("rctap0", "eth0", 1400)
        );
        assert_eq!(tap.mac, "02:42:ac:11:00:02".parse().unwrap());
        let link = &json(&sh("ip -j link show rctap0"))[0];
        assert_eq!(link["mtu"], 1400);
        assert!(
            link["flags"].as_array().unwrap().contains(&"UP".into()),
            "{link}"
        );
        assert_eq!(ingress_qdiscs("eth0"), 1);

        let peer = in_netns(&peer_ns, || packet_socket("peer0"));
        let tap_fd = tap.fd().unwrap();

        // Peer -> veth -> tap: the frame comes out of the tap behind a virtio-net header.
        let inbound = frame(ETH0_MAC, PEER_MAC, b"hello from the peer");
        write_all(peer.as_fd(), &inbound);
        let got = read_until(tap_fd, b"hello from the peer");
        assert_eq!(&got[VNET_HDR_LEN..], &inbound[..]);

        // Tap -> veth -> peer: a frame written with a zeroed header arrives unchanged (an
        // IPv4 packet from the interface's own MAC and address: the guard lets it pass).
        let outbound = eth(
            PEER_MAC,
            ETH0_MAC,
            0x0800,
            &[
                ipv4([172, 17, 0, 2], [172, 17, 0, 99]),
                b"hello from the guest".to_vec(),
            ]
            .concat(),
        );
        let mut with_hdr = vec![0u8; VNET_HDR_LEN];
        with_hdr.extend_from_slice(&outbound);
        write_all(tap_fd, &with_hdr);
        assert_eq!(read_until(peer.as_fd(), b"hello from the guest"), outbound);

        drop(m);
        assert_eq!(ingress_qdiscs("eth0"), 0);
        assert!(tap_names().is_empty(), "{:?}", tap_names());
    });
}

#[test]
fn teardown_from_a_thread_in_another_namespace_reaches_the_mirrored_one() {
    let peer_ns = other_netns();
    in_new_netns(move || {
        veth_to(&peer_ns, "eth0", "02:42:ac:11:00:02", 1500, "peer0");
        sh("ip link set eth0 up");
        let mut m = mirror(&scan().unwrap()).unwrap();
        // A taken descriptor keeps its tap alive after teardown, as it would for a VMM.
        let fd = m.take_fds().pop().unwrap();
        assert!(m.taps()[0].fd().is_none());
        in_new_netns(move || m.teardown()).unwrap();
        assert_eq!(ingress_qdiscs("eth0"), 0);
        assert_eq!(tap_names(), ["rctap0"]);
        drop(fd);
        assert!(tap_names().is_empty());
    });
}

fn iface(name: &str, mac: &str) -> Interface {
    Interface {
        card: None,
        name: name.into(),
        mac: mac.parse().unwrap(),
        mtu: 1500,
        addresses: vec![],
    }
}

#[test]
fn failure_on_a_second_interface_undoes_the_first() {
    let peer_ns = other_netns();
    in_new_netns(move || {
        veth_to(&peer_ns, "eth0", "02:42:ac:11:00:02", 1500, "peer0");
        veth_to(&peer_ns, "eth1", "02:42:ac:11:00:03", 1500, "peer1");
        sh("ip link set eth0 up && ip link set eth1 up
            ip link add br0 address 02:42:ac:11:00:04 type bridge && ip link set br0 up
            tc qdisc add dev eth1 ingress");
        let eth0 = iface("eth0", "02:42:ac:11:00:02");
        let cases = [
            (
                iface("br0", "02:42:ac:11:00:04"),
                "interface br0 (kind bridge) cannot be mirrored",
            ),
            (
                iface("eth1", "02:42:ac:11:00:03"),
                "interface eth1: adding an ingress qdisc to eth1: File exists",
            ),
            (
                iface("nosuch", "02:42:ac:11:00:05"),
                "interface nosuch: there is no such interface here",
            ),
        ];
        for (second, message) in cases {
            let config = NetworkConfig {
                interfaces: vec![eth0.clone(), second],
                routes: vec![],
            };
            let err = mirror(&config).unwrap_err();
            assert!(err.to_string().starts_with(message), "{err}");
            assert_eq!(ingress_qdiscs("eth0"), 0, "after: {err}");
            assert!(tap_names().is_empty(), "after {err}: {:?}", tap_names());
        }
        // The qdisc that was there before is not ours to delete.
        assert_eq!(ingress_qdiscs("eth1"), 1);
    });
}

#[test]
fn a_stale_mac_is_refused() {
    let peer_ns = other_netns();
    let err = in_new_netns(move || {
        veth_to(&peer_ns, "eth0", "02:42:ac:11:00:02", 1500, "peer0");
        let config = NetworkConfig {
            interfaces: vec![iface("eth0", "02:42:ac:11:00:07")],
            routes: vec![],
        };
        mirror(&config).unwrap_err()
    });
    assert!(matches!(err, NetError::Mismatch(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "interface eth0: its MAC is 02:42:ac:11:00:02, the configuration says 02:42:ac:11:00:07"
    );
}

/// A mirror whose process died (its tap closed, its qdiscs never deleted) does not refuse the
/// next one on the same interface: its ingress qdisc, whose redirect leads to the gone tap, is
/// replaced. A qdisc whose redirect leads to a link that is there is not.
#[test]
fn a_killed_mirrors_qdisc_gives_way_to_the_next_mirror() {
    let peer_ns = other_netns();
    in_new_netns(move || {
        veth_to(&peer_ns, "eth0", "02:42:ac:11:00:02", 1500, "peer0");
        sh("ip link set eth0 up");
        let config = NetworkConfig {
            interfaces: vec![iface("eth0", "02:42:ac:11:00:02")],
            routes: vec![],
        };
        // What SIGKILL leaves: the tap goes with its last descriptor, the qdiscs stay.
        let mut killed = mirror(&config).unwrap();
        drop(killed.take_fds());
        std::mem::forget(killed);
        assert!(tap_names().is_empty(), "{:?}", tap_names());
        assert_eq!(ingress_qdiscs("eth0"), 1);
        let next = mirror(&config).expect("the next mirror replaces the stale qdisc");
        assert_eq!(tap_names(), ["rctap0"]);
        // Live: its redirect leads to rctap0, which is there: it stays.
        let mut nl = crate::netlink::Netlink::open().unwrap();
        let eth0 = crate::links::links(&mut nl)
            .unwrap()
            .into_iter()
            .find(|l| l.name == "eth0")
            .unwrap();
        assert!(!crate::mirror::remove_stale_ingress(
            &mut nl, eth0.index, "eth0"
        ));
        let here = File::open("/proc/thread-self/ns/net").unwrap();
        assert_eq!(
            crate::remove_stale_mirrors(&here).unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(ingress_qdiscs("eth0"), 1);
        // Killed too: what is left is found and removed from the whole namespace.
        let mut next = next;
        drop(next.take_fds());
        std::mem::forget(next);
        assert_eq!(crate::remove_stale_mirrors(&here).unwrap(), ["eth0"]);
        assert_eq!(ingress_qdiscs("eth0"), 0);
        let next = mirror(&config).unwrap();
        drop(next);
        assert_eq!(ingress_qdiscs("eth0"), 0);
    });
}
