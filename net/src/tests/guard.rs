//! The tap's anti-spoofing filters on a real kernel: forged frames written to the tap (as a
//! guest's root could send them) never reach the other end of the container's veth; the
//! container's own frames do.

use super::mirror::{eth, ipv4, packet_socket, write_all, VNET_HDR_LEN};
use super::*;
use crate::{mirror, scan};
use std::collections::BTreeSet;
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

const MAC: [u8; 6] = [0x02, 0x42, 0xac, 0x11, 0x00, 0x02];
const OTHER_MAC: [u8; 6] = [0x02, 0x42, 0xac, 0x11, 0x00, 0x03];
const PEER_MAC: [u8; 6] = [0x02, 0x42, 0xac, 0x11, 0x00, 0x99];
const BCAST: [u8; 6] = [0xff; 6];
const OWN4: [u8; 4] = [172, 17, 0, 2];
const OTHER4: [u8; 4] = [172, 17, 0, 3];
const GW4: [u8; 4] = [172, 17, 0, 1];

fn v6(s: &str) -> [u8; 16] {
    s.parse::<std::net::Ipv6Addr>().unwrap().octets()
}

/// An IPv6 header with next header `nh`.
fn ipv6(src: [u8; 16], dst: [u8; 16], nh: u8) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0, 0, 40, nh, 255];
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h
}

/// ICMPv6 of `icmp_type` whose first 16 bytes after the 8-byte header are `target`.
fn icmpv6(icmp_type: u8, target: [u8; 16]) -> Vec<u8> {
    let mut m = vec![icmp_type, 0, 0, 0, 0x60, 0, 0, 0];
    m.extend_from_slice(&target);
    m
}

/// An Ethernet/IPv4 ARP request.
fn arp(sha: [u8; 6], spa: [u8; 4], tpa: [u8; 4]) -> Vec<u8> {
    let mut a = vec![0, 1, 0x08, 0x00, 6, 4, 0, 1];
    a.extend_from_slice(&sha);
    a.extend_from_slice(&spa);
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&tpa);
    a
}

fn tagged(mut payload: Vec<u8>, tag: &str) -> Vec<u8> {
    payload.extend_from_slice(format!("rc-guard-{tag};").as_bytes());
    payload
}

/// The tags of every frame that reaches `fd` until the one tagged `last` (and 200 ms more).
fn tags_until(fd: std::os::fd::BorrowedFd<'_>, last: &str) -> BTreeSet<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = BTreeSet::new();
    let mut end: Option<Instant> = None;
    let mut buf = vec![0u8; 65536];
    loop {
        let now = Instant::now();
        if end.is_some_and(|e| now >= e) {
            return seen;
        }
        assert!(now < deadline, "'{last}' never arrived; saw {seen:?}");
        let mut pfd = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        if nix::poll::poll(&mut pfd, 50u16).unwrap() == 0 {
            continue;
        }
        let n = nix::unistd::read(fd.as_raw_fd(), &mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        if let Some(at) = text.find("rc-guard-") {
            let tag = text[at + 9..].split(';').next().unwrap().to_string();
            if tag == last {
                end = Some(Instant::now() + Duration::from_millis(200));
            }
            seen.insert(tag);
        }
    }
}

#[test]
fn only_the_containers_own_mac_and_addresses_leave_the_tap() {
    let peer_ns = other_netns();
    in_new_netns(move || {
        veth_to(&peer_ns, "eth0", "02:42:ac:11:00:02", 1500, "peer0");
        sh("ip link set eth0 up && ip addr add 172.17.0.2/16 dev eth0 \
            && ip addr add fd00::2/64 dev eth0 nodad");
        let m = mirror(&scan().unwrap()).unwrap();
        let tap = m.taps()[0].fd().unwrap();
        let peer = in_netns(&peer_ns, || packet_socket("peer0"));

        let own6 = v6("fd00::2");
        let other6 = v6("fd00::3");
        let ll = v6("fe80::42:acff:fe11:2");
        let all_nodes = v6("ff02::1");
        let allowed = [
            ("ipv4", eth(PEER_MAC, MAC, 0x0800, &ipv4(OWN4, GW4))),
            ("arp", eth(BCAST, MAC, 0x0806, &arp(MAC, OWN4, GW4))),
            ("ipv6", eth(PEER_MAC, MAC, 0x86dd, &ipv6(own6, other6, 253))),
            (
                "ipv6-ll",
                eth(PEER_MAC, MAC, 0x86dd, &ipv6(ll, other6, 253)),
            ),
            (
                "na-own",
                eth(
                    BCAST,
                    MAC,
                    0x86dd,
                    &[ipv6(ll, all_nodes, 58), icmpv6(136, own6)].concat(),
                ),
            ),
            (
                "ns-other",
                eth(
                    BCAST,
                    MAC,
                    0x86dd,
                    &[ipv6(own6, all_nodes, 58), icmpv6(135, other6)].concat(),
                ),
            ),
        ];
        let forged = [
            (
                "ipv4-other-src",
                eth(PEER_MAC, MAC, 0x0800, &ipv4(OTHER4, GW4)),
            ),
            (
                "ipv4-other-mac",
                eth(PEER_MAC, OTHER_MAC, 0x0800, &ipv4(OWN4, GW4)),
            ),
            (
                "arp-other-spa",
                eth(BCAST, MAC, 0x0806, &arp(MAC, OTHER4, GW4)),
            ),
            (
                "arp-other-sha",
                eth(BCAST, MAC, 0x0806, &arp(OTHER_MAC, OWN4, GW4)),
            ),
            (
                "arp-other-mac",
                eth(BCAST, OTHER_MAC, 0x0806, &arp(OTHER_MAC, OWN4, GW4)),
            ),
            (
                "ipv6-other-src",
                eth(PEER_MAC, MAC, 0x86dd, &ipv6(other6, own6, 253)),
            ),
            (
                "ipv6-other-mac",
                eth(PEER_MAC, OTHER_MAC, 0x86dd, &ipv6(own6, other6, 253)),
            ),
            (
                "na-other-target",
                eth(
                    BCAST,
                    MAC,
                    0x86dd,
                    &[ipv6(own6, all_nodes, 58), icmpv6(136, other6)].concat(),
                ),
            ),
            (
                "ra",
                eth(
                    BCAST,
                    MAC,
                    0x86dd,
                    &[ipv6(ll, all_nodes, 58), icmpv6(134, [0; 16])].concat(),
                ),
            ),
            (
                "hop-by-hop",
                eth(BCAST, MAC, 0x86dd, &ipv6(ll, all_nodes, 0)),
            ),
            ("ethertype", eth(PEER_MAC, MAC, 0x88b5, b"x")),
            (
                "vlan",
                eth(
                    PEER_MAC,
                    MAC,
                    0x8100,
                    &[vec![0, 5, 0x08, 0x00], ipv4(OWN4, GW4)].concat(),
                ),
            ),
        ];
        for (tag, f) in allowed.iter().chain(forged.iter()) {
            let mut with_hdr = vec![0u8; VNET_HDR_LEN];
            with_hdr.extend(tagged(f.clone(), tag));
            write_all(tap, &with_hdr);
        }
        let end = tagged(eth(PEER_MAC, MAC, 0x0800, &ipv4(OWN4, GW4)), "end");
        write_all(tap, &[vec![0u8; VNET_HDR_LEN], end].concat());

        let seen = tags_until(peer.as_fd(), "end");
        let mut want: BTreeSet<String> = allowed.iter().map(|(t, _)| t.to_string()).collect();
        want.insert("end".into());
        assert_eq!(
            seen, want,
            "forged frames passed or own frames were dropped"
        );
        drop(m);
    });
}
