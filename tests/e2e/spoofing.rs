//! Root in the guest cannot pose as someone else on the container's network (issue 16): a
//! privileged-in-guest container changes its card's MAC, takes a neighbour's address and
//! sends ARP and IP with them; a capture on the bridge port in front of the container sees
//! none of it, the bridge's and the neighbour's ARP tables do not learn it, and the
//! container's own traffic still flows. Real guest, a plain bridge this test makes.

use rootcell_e2e::*;
use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CTR_MAC: &str = "02:42:0a:db:00:02";
const FORGED_MAC: &str = "02:00:00:00:00:66";

/// Every frame the port `ifname` of namespace `ns` receives (not those it sends), until
/// `stop` is set; at most 5 minutes.
fn capture(
    ns: String,
    ifname: &'static str,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<Vec<u8>>> {
    let ready = Arc::new(AtomicBool::new(false));
    let r = ready.clone();
    let h = std::thread::spawn(move || {
        let f = std::fs::File::open(&ns).unwrap();
        // SAFETY: setns on this thread only, with a namespace file we hold open.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: a socket this function owns, bound and read with buffers of the right size.
        let fd = unsafe {
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
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
            fd
        };
        r.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut frames = Vec::new();
        let mut buf = vec![0u8; 65536];
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            // SAFETY: recvfrom into buffers we own, with their lengths.
            let (n, pkttype) = unsafe {
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                let n = libc::recvfrom(
                    fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                    &mut sll as *mut _ as *mut libc::sockaddr,
                    &mut len,
                );
                (n, sll.sll_pkttype)
            };
            if n > 0 && pkttype != libc::PACKET_OUTGOING {
                frames.push(buf[..n as usize].to_vec());
            }
        }
        frames
    });
    while !ready.load(Ordering::SeqCst) {
        assert!(!h.is_finished(), "the capture thread failed");
        std::thread::sleep(Duration::from_millis(10));
    }
    h
}

/// What each captured frame claims about its sender: (source MAC, kind, sender address).
fn claims(frames: &[Vec<u8>]) -> Vec<(String, &'static str, String)> {
    let hex = |b: &[u8]| {
        b.iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    frames
        .iter()
        .filter(|f| f.len() >= 14)
        .map(|f| {
            let src = hex(&f[6..12]);
            let l3 = &f[14..];
            match u16::from_be_bytes([f[12], f[13]]) {
                0x0800 if l3.len() >= 20 => (
                    src,
                    "ipv4",
                    format!("{}.{}.{}.{}", l3[12], l3[13], l3[14], l3[15]),
                ),
                0x0806 if l3.len() >= 18 => (
                    src,
                    "arp",
                    format!(
                        "{} {}.{}.{}.{}",
                        hex(&l3[8..14]),
                        l3[14],
                        l3[15],
                        l3[16],
                        l3[17]
                    ),
                ),
                0x86dd if l3.len() >= 24 => {
                    let a: [u8; 16] = l3[8..24].try_into().unwrap();
                    (src, "ipv6", std::net::Ipv6Addr::from(a).to_string())
                }
                t => (src, "other", format!("{t:04x}")),
            }
        })
        .collect()
}

#[test]
fn root_in_the_guest_cannot_spoof_mac_or_addresses_on_the_bridge() {
    let rt = Runtime::new();
    let lan = NetNs::new("rc-lan");
    let ctr = NetNs::new("rc-ctr");
    let nb = NetNs::new("rc-nb");
    lan.sh(
        "ip link add br0 type bridge && ip addr add 10.219.0.1/24 dev br0 && ip link set br0 up && ip link set lo up",
    );
    // IPv6 off on the container's interface on the host, so that every IPv6 frame on the
    // port comes from the guest (the host's own stack would send duplicate address detection
    // from :: when the link comes up).
    ctr.sh(&format!(
        "ip link add eth0 address {CTR_MAC} type veth peer name ctrport netns {lan} \
         && sysctl -qw net.ipv6.conf.eth0.disable_ipv6=1 \
         && ip addr add 10.219.0.2/24 dev eth0 && ip link set eth0 up",
        lan = lan.name()
    ));
    nb.sh(&format!(
        "ip link add nb0 type veth peer name nbport netns {lan} \
         && ip addr add 10.219.0.3/24 dev nb0 && ip link set nb0 up",
        lan = lan.name()
    ));
    lan.sh("ip link set ctrport master br0 up && ip link set nbport master br0 up");
    let nb_mac = nb.sh("cat /sys/class/net/nb0/address").trim().to_string();
    // The bridge and the neighbour know each other before the guest starts.
    nb.sh("busybox ping -c 1 -W 2 10.219.0.1 >/dev/null");

    let stop = Arc::new(AtomicBool::new(false));
    let cap = capture(lan.path(), "ctrport", stop.clone());

    // Own traffic; then the neighbour's address (gratuitous ARP and pings from it); then a
    // forged MAC; then own traffic again. Each step prints whether it got an answer.
    let script = format!(
        "set -x; ping -c 2 -W 2 10.219.0.1 >/dev/null && echo own-before-ok; \
         ip addr add 10.219.0.3/24 dev eth0 && ip addr add 10.219.0.77/24 dev eth0 || echo addr-add-failed; \
         arping -U -c 2 -I eth0 -s 10.219.0.3 10.219.0.3; arping -A -c 2 -I eth0 -s 10.219.0.77 10.219.0.77; \
         arping -c 2 -w 3 -I eth0 -s 10.219.0.3 10.219.0.1 && echo forged-arp-answered; \
         ping -c 2 -W 2 -I 10.219.0.77 10.219.0.1 >/dev/null && echo forged-ip-answered; \
         ip addr del 10.219.0.3/24 dev eth0; ip addr del 10.219.0.77/24 dev eth0; \
         ip link set eth0 down && ip link set eth0 address {FORGED_MAC} && ip link set eth0 up || echo mac-change-failed; \
         cat /sys/class/net/eth0/address; ip neigh flush dev eth0; \
         ping -c 2 -W 2 10.219.0.1 >/dev/null && echo forged-mac-answered; \
         ip link set eth0 down && ip link set eth0 address {CTR_MAC} && ip link set eth0 up; ip neigh flush dev eth0; \
         for i in 1 2 3 4 5; do ping -c 1 -W 2 10.219.0.1 >/dev/null && echo own-after-ok && break; done; \
         ping -c 1 -W 2 10.219.0.3 >/dev/null && echo neighbour-ok; exit 0"
    );
    let b = Bundle::new(&["sh", "-c", &script]).edit(|s| {
        let ns = s["linux"]["namespaces"].as_array_mut().unwrap();
        ns.retain(|n| n["type"] != "network");
        ns.push(serde_json::json!({"type": "network", "path": ctr.path()}));
    });
    let id = unique_id("spoof");
    let o = rt.run(&[
        "--guest-privileged",
        "run",
        "--bundle",
        b.path().to_str().unwrap(),
        &id,
    ]);
    stop.store(true, Ordering::SeqCst);
    let frames = cap.join().unwrap();
    let out = text(&o.stdout);
    let report = format!("stdout:\n{out}\nstderr:\n{}", text(&o.stderr));
    rt.run(&["delete", "--force", &id]);
    assert_eq!(code(&o), 0, "{report}");

    // The guest did forge: the steps ran, and what it sent under false colours got no answer.
    assert!(out.contains("own-before-ok"), "{report}");
    assert!(
        out.contains(FORGED_MAC),
        "the MAC did not change in the guest: {report}"
    );
    for failed in ["addr-add-failed", "mac-change-failed"] {
        assert!(!out.contains(failed), "{failed}: {report}");
    }
    for forged in [
        "forged-arp-answered",
        "forged-ip-answered",
        "forged-mac-answered",
    ] {
        assert!(!out.contains(forged), "{forged}: {report}");
    }
    // The container's own traffic still flows, to the bridge and to the neighbour.
    assert!(out.contains("own-after-ok"), "{report}");
    assert!(out.contains("neighbour-ok"), "{report}");

    // Nothing on the wire claims another MAC or address.
    let seen = claims(&frames);
    let ll = "fe80::42:aff:fedb:2";
    let mut kinds = BTreeSet::new();
    for (src, kind, addr) in &seen {
        kinds.insert(*kind);
        let fine = src == CTR_MAC
            && match *kind {
                "ipv4" => addr == "10.219.0.2",
                "arp" => *addr == format!("{CTR_MAC} 10.219.0.2"),
                "ipv6" => addr == ll,
                _ => false,
            };
        assert!(
            fine,
            "a forged frame left the tap: {src} {kind} {addr}\nall: {seen:?}\n{report}"
        );
    }
    assert!(
        kinds.contains("ipv4") && kinds.contains("arp"),
        "own traffic not captured: {seen:?}"
    );

    // Nobody learnt the forgeries: the neighbour's address still points at the neighbour.
    let bridge_neigh = lan.sh("ip neigh show");
    let nb_neigh = nb.sh("ip neigh show");
    for (who, table) in [("bridge", &bridge_neigh), ("neighbour", &nb_neigh)] {
        assert!(
            !table.contains(FORGED_MAC),
            "{who} learnt the forged MAC:\n{table}"
        );
        assert!(
            !table.contains("10.219.0.77"),
            "{who} learnt the forged address:\n{table}"
        );
    }
    for line in bridge_neigh
        .lines()
        .filter(|l| l.starts_with("10.219.0.3 "))
    {
        assert!(
            line.contains(&nb_mac),
            "the bridge maps the neighbour's address elsewhere: {line}"
        );
    }
    assert_no_leftovers(&rt, &id);
}
