//! Anti-spoofing on the tap: what the guest sends leaves only with the container's own
//! addresses.
//!
//! Frames the VM writes to its tap enter the tap's ingress, where a classic BPF program (a tc
//! `bpf` filter in direct-action mode, before the filter that redirects to the container
//! interface) drops what the container may not send. Root in the guest owns the guest's
//! network stack (it may change the card's MAC, add addresses, write raw frames), so the host
//! takes nothing the guest says about itself on trust. A frame passes only if:
//!
//! * its Ethernet source is the interface's MAC, and
//! * it is IPv4 from one of the interface's IPv4 addresses; or
//! * it is an Ethernet/IPv4 ARP packet whose sender MAC is the interface's and whose sender
//!   address is one of its IPv4 addresses (requests and replies: it can only speak for
//!   itself); or
//! * it is IPv6 from one of its IPv6 addresses or from the link-local address the kernel
//!   derives from the MAC (EUI-64, used by NDP and MLD), and it is not a router
//!   advertisement or redirect (the guest is no router of the network), not a neighbour
//!   advertisement for a target that is not its own, and its first header is not an
//!   extension header (hop-by-hop, routing, destination options) that could hide one.
//!
//! Everything else is dropped: other MACs or addresses, other EtherTypes, VLAN tags, IPv6
//! from the unspecified address (duplicate address detection then simply finds no
//! duplicate), VLAN-tagged frames. Frames toward the guest are not filtered.

use crate::netlink::Netlink;
use crate::tc;
use libc::sock_filter;
use rootcell_protocol::net::{Interface, MacAddr};
use std::io;
use std::net::{IpAddr, Ipv6Addr};

/// `TC_ACT_SHOT`: drop the frame.
const DROP: u32 = 2;
/// `TC_ACT_UNSPEC` (-1): no verdict, the next filter (the redirect) takes the frame.
const PASS: u32 = u32::MAX;

const ETH_P_IP: u32 = 0x0800;
const ETH_P_ARP: u32 = 0x0806;
const ETH_P_IPV6: u32 = 0x86dd;

/// Offsets from the start of the frame.
const ETH_SRC: u32 = 6;
const ETH_TYPE: u32 = 12;
const L3: u32 = 14;

/// IPv6 next-header values.
const IPPROTO_HOPOPTS: u32 = 0;
const IPPROTO_ROUTING: u32 = 43;
const IPPROTO_ICMPV6: u32 = 58;
const IPPROTO_DSTOPTS: u32 = 60;

/// ICMPv6 types.
const ND_ROUTER_ADVERT: u32 = 134;
const ND_NEIGHBOR_ADVERT: u32 = 136;
const ND_REDIRECT: u32 = 137;

/// The link-local address Linux gives an interface with `mac` (EUI-64, RFC 4291 appendix A).
pub(crate) fn link_local(mac: MacAddr) -> Ipv6Addr {
    let m = mac.0;
    Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        m[0] ^ 0x02,
        m[1],
        m[2],
        0xff,
        0xfe,
        m[3],
        m[4],
        m[5],
    ])
}

/// A tiny classic BPF assembler whose forward jumps name labels; conditional jumps must land
/// within 255 instructions, which the program below keeps by dropping right after a failed
/// check rather than jumping to a shared exit.
#[derive(Default)]
struct Asm {
    code: Vec<(u16, Jump, Jump, u32)>,
    labels: Vec<Option<usize>>,
}

#[derive(Clone, Copy)]
enum Jump {
    /// The next instruction.
    Next,
    /// Skip this many instructions.
    Skip(u8),
    /// A label.
    To(usize),
}

impl Asm {
    fn label(&mut self) -> usize {
        self.labels.push(None);
        self.labels.len() - 1
    }

    fn bind(&mut self, label: usize) {
        self.labels[label] = Some(self.code.len());
    }

    fn load(&mut self, size: u16, off: u32) {
        self.code.push((
            (libc::BPF_LD as u16 | size | libc::BPF_ABS as u16),
            Jump::Next,
            Jump::Next,
            off,
        ));
    }

    fn jeq(&mut self, k: u32, jt: Jump, jf: Jump) {
        self.code.push((
            (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt,
            jf,
            k,
        ));
    }

    fn ja(&mut self, to: usize) {
        self.code.push((
            (libc::BPF_JMP | libc::BPF_JA) as u16,
            Jump::To(to),
            Jump::Next,
            0,
        ));
    }

    fn ret(&mut self, k: u32) {
        self.code.push((
            (libc::BPF_RET | libc::BPF_K) as u16,
            Jump::Next,
            Jump::Next,
            k,
        ));
    }

    /// Goes to `to` if the loaded value is `k` (through a `ja`, which reaches any distance).
    fn goto_if(&mut self, k: u32, to: usize) {
        self.jeq(k, Jump::Next, Jump::Skip(1));
        self.ja(to);
    }

    /// Goes to `to` unless the loaded value is `k`.
    fn goto_unless(&mut self, k: u32, to: usize) {
        self.jeq(k, Jump::Skip(1), Jump::Next);
        self.ja(to);
    }

    /// Drops the frame unless the loaded value is `k`.
    fn require(&mut self, k: u32) {
        self.jeq(k, Jump::Skip(1), Jump::Next);
        self.ret(DROP);
    }

    /// Drops the frame if the loaded value is `k`.
    fn forbid(&mut self, k: u32) {
        self.jeq(k, Jump::Next, Jump::Skip(1));
        self.ret(DROP);
    }

    /// Drops the frame unless the `bytes.len()` bytes at `off` are `bytes` (whole words, then
    /// a half word).
    fn require_bytes(&mut self, off: u32, bytes: &[u8]) {
        for (at, k, size) in words(off, bytes) {
            self.load(size, at);
            self.require(k);
        }
    }

    /// Goes to `to` if the bytes at `off` equal one of `candidates`, else falls through.
    fn goto_if_any(&mut self, off: u32, candidates: &[&[u8]], to: usize) {
        for c in candidates {
            let w = words(off, c);
            let n = w.len();
            for (i, (at, k, size)) in w.into_iter().enumerate() {
                self.load(size, at);
                // On a mismatch skip the rest of this candidate: 2 per remaining word, +1 ja.
                let skip = u8::try_from(2 * (n - 1 - i) + 1).expect("addresses are short");
                self.jeq(k, Jump::Next, Jump::Skip(skip));
            }
            self.ja(to);
        }
    }

    fn finish(self) -> io::Result<Vec<sock_filter>> {
        let too_big = || io::Error::from_raw_os_error(libc::E2BIG);
        let mut out = Vec::with_capacity(self.code.len());
        for (pc, (code, jt, jf, k)) in self.code.iter().enumerate() {
            let resolve = |j: &Jump| -> io::Result<u32> {
                match *j {
                    Jump::Next => Ok(0),
                    Jump::Skip(n) => Ok(u32::from(n)),
                    Jump::To(l) => {
                        let at = self.labels[l].expect("every label is bound");
                        u32::try_from(at - pc - 1).map_err(|_| too_big())
                    }
                }
            };
            let is_ja = *code == (libc::BPF_JMP | libc::BPF_JA) as u16;
            let (jt, jf, k) = if is_ja {
                (0, 0, resolve(jt)?)
            } else {
                let t = u8::try_from(resolve(jt)?).map_err(|_| too_big())?;
                let f = u8::try_from(resolve(jf)?).map_err(|_| too_big())?;
                (t, f, *k)
            };
            out.push(sock_filter {
                code: *code,
                jt,
                jf,
                k,
            });
        }
        if out.len() > libc::BPF_MAXINSNS as usize {
            return Err(too_big());
        }
        Ok(out)
    }
}

/// `bytes` at `off` as loads: (offset, value, size) for each 4-byte word and a 2-byte tail.
fn words(off: u32, bytes: &[u8]) -> Vec<(u32, u32, u16)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let rest = &bytes[at..];
        let (k, size, n) = if rest.len() >= 4 {
            (
                u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]),
                libc::BPF_W as u16,
                4,
            )
        } else if rest.len() >= 2 {
            (
                u32::from(u16::from_be_bytes([rest[0], rest[1]])),
                libc::BPF_H as u16,
                2,
            )
        } else {
            (u32::from(rest[0]), libc::BPF_B as u16, 1)
        };
        out.push((off + at as u32, k, size));
        at += n;
    }
    out
}

/// The guard program for the tap of interface `iface` (see the module text).
pub(crate) fn program(iface: &Interface) -> io::Result<Vec<sock_filter>> {
    let mac = iface.mac;
    let v4: Vec<[u8; 4]> = iface
        .addresses
        .iter()
        .filter_map(|p| match p.addr {
            IpAddr::V4(a) => Some(a.octets()),
            IpAddr::V6(_) => None,
        })
        .collect();
    let mut v6: Vec<Ipv6Addr> = iface
        .addresses
        .iter()
        .filter_map(|p| match p.addr {
            IpAddr::V6(a) => Some(a),
            IpAddr::V4(_) => None,
        })
        .collect();
    let ll = link_local(mac);
    if !v6.contains(&ll) {
        v6.push(ll);
    }
    let v6: Vec<[u8; 16]> = v6.iter().map(Ipv6Addr::octets).collect();
    let v4s: Vec<&[u8]> = v4.iter().map(|a| &a[..]).collect();
    let v6s: Vec<&[u8]> = v6.iter().map(|a| &a[..]).collect();

    let mut a = Asm::default();
    let (ipv4, arp, ipv6, pass, v6_source_ok) =
        (a.label(), a.label(), a.label(), a.label(), a.label());

    // A VLAN tag: the kernel has moved it out of the frame (the bytes below show the inner
    // EtherType) and would put it back on the way out, so ask for it separately.
    a.load(
        libc::BPF_W as u16,
        (libc::SKF_AD_OFF + libc::SKF_AD_VLAN_TAG_PRESENT) as u32,
    );
    a.require(0);
    a.require_bytes(ETH_SRC, &mac.0);
    a.load(libc::BPF_H as u16, ETH_TYPE);
    a.goto_if(ETH_P_IP, ipv4);
    a.goto_if(ETH_P_ARP, arp);
    a.goto_if(ETH_P_IPV6, ipv6);
    a.ret(DROP);

    // IPv4: source address at 12.
    a.bind(ipv4);
    a.goto_if_any(L3 + 12, &v4s, pass);
    a.ret(DROP);

    // ARP: htype 1, ptype 0x0800, hlen 6, plen 4; sender MAC at 8, sender address at 14.
    a.bind(arp);
    a.require_bytes(L3, &[0, 1, 0x08, 0x00, 6, 4]);
    a.require_bytes(L3 + 8, &mac.0);
    a.goto_if_any(L3 + 14, &v4s, pass);
    a.ret(DROP);

    // IPv6: next header at 6, source at 8; ICMPv6 type at 40, a neighbour advertisement's
    // target at 48.
    a.bind(ipv6);
    a.goto_if_any(L3 + 8, &v6s, v6_source_ok);
    a.ret(DROP);
    a.bind(v6_source_ok);
    a.load(libc::BPF_B as u16, L3 + 6);
    for next in [IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_DSTOPTS] {
        a.forbid(next);
    }
    a.goto_unless(IPPROTO_ICMPV6, pass);
    a.load(libc::BPF_B as u16, L3 + 40);
    a.forbid(ND_ROUTER_ADVERT);
    a.forbid(ND_REDIRECT);
    a.goto_unless(ND_NEIGHBOR_ADVERT, pass);
    a.goto_if_any(L3 + 48, &v6s, pass);
    a.ret(DROP);

    a.bind(pass);
    a.ret(PASS);
    a.finish()
}

/// Installs [`program`] on the ingress qdisc of tap `tap` (which must have one), ahead of
/// the filter that redirects the tap's frames to the container interface.
pub(crate) fn protect(nl: &mut Netlink, tap: u32, iface: &Interface) -> io::Result<()> {
    let prog = program(iface)?;
    tracing::debug!(interface = %iface.name, instructions = prog.len(), "tap guard program");
    tc::add_bpf(nl, tap, &prog)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rootcell_protocol::net::IpPrefix;

    #[test]
    fn link_local_is_eui64() {
        let mac = MacAddr([0x02, 0x42, 0xac, 0x11, 0x00, 0x02]);
        assert_eq!(
            link_local(mac),
            "fe80::42:acff:fe11:2".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn words_split_into_loads() {
        let w = words(6, &[0x02, 0x42, 0xac, 0x11, 0x00, 0x02]);
        assert_eq!(
            w,
            [
                (6, 0x0242_ac11, libc::BPF_W as u16),
                (10, 0x0002, libc::BPF_H as u16)
            ]
        );
        assert_eq!(words(20, &[58]), [(20, 58, libc::BPF_B as u16)]);
    }

    #[test]
    fn the_program_ends_in_returns_and_grows_with_addresses() {
        let mut iface = Interface {
            card: None,
            name: "eth0".into(),
            mac: MacAddr([0x02, 0x42, 0xac, 0x11, 0x00, 0x02]),
            mtu: 1500,
            addresses: vec![],
        };
        let bare = program(&iface).unwrap();
        let last = bare.last().unwrap();
        assert_eq!(
            (last.code, last.k),
            ((libc::BPF_RET | libc::BPF_K) as u16, PASS)
        );
        iface.addresses =
            (1..=40)
                .map(|n| IpPrefix::new(IpAddr::from([10, 0, 0, n]), 24).unwrap())
                .chain((1..=40u16).map(|n| {
                    IpPrefix::new(IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, n]), 64).unwrap()
                }))
                .collect();
        let big = program(&iface).unwrap();
        assert!(big.len() > bare.len() + 80 * 2, "{}", big.len());
        // Every jump lands inside the program.
        for (pc, i) in big.iter().enumerate() {
            if i.code == (libc::BPF_JMP | libc::BPF_JA) as u16 {
                assert!(pc + 1 + (i.k as usize) < big.len());
            } else if i.code & 0x07 == libc::BPF_JMP as u16 {
                assert!(pc + 1 + (i.jt.max(i.jf) as usize) < big.len());
            }
        }
    }
}
