//! Host side: describing the interfaces and routes of the current network namespace.

use crate::error::NetError;
use crate::links::{self, Link};
use crate::netlink::Netlink;
use crate::routes::{self, Scanned};
use netlink_packet_route::link::{LinkFlags, LinkLayerType};
use netlink_packet_route::route::RouteMessage;
use netlink_packet_route::RouteNetlinkMessage;
use rootcell_protocol::net::{Interface, IpPrefix, NetworkConfig};
use std::net::IpAddr;

/// Link kinds whose frames can be moved to a tap with tc redirect and back unchanged.
/// `None` is a physical Ethernet device moved into the namespace.
const MIRRORABLE_KINDS: &[&str] = &["veth", "macvlan", "macvtap", "ipvlan", "dummy"];

/// Describes every interface of the calling thread's network namespace (except `lo`, and
/// except devices that are down and have no address, such as the kernel's `sit0`), with the
/// main-table routes the guest must be given.
///
/// IPv6 link-local addresses are left out (the guest derives the same one from the MAC), as
/// are routes the kernel makes itself for addresses and local/broadcast/multicast routes.
/// Mirrored are Ethernet devices of kind veth, macvlan, macvtap, ipvlan (L2 mode), dummy, or
/// without a kind (a physical NIC); anything else is refused with [`NetError::Unsupported`].
pub fn scan() -> Result<NetworkConfig, NetError> {
    let mut nl = Netlink::open().map_err(|e| NetError::netlink("opening a netlink socket", e))?;
    let links = links::links(&mut nl).map_err(|e| NetError::netlink("listing links", e))?;
    let mut addresses =
        links::addresses(&mut nl).map_err(|e| NetError::netlink("listing addresses", e))?;

    let mut config = NetworkConfig::default();
    let mut chosen: Vec<(u32, String)> = Vec::new();
    for link in &links {
        let addrs: Vec<IpPrefix> = addresses
            .remove(&link.index)
            .unwrap_or_default()
            .into_iter()
            .filter(|p| !is_ipv6_link_local(p.addr))
            .collect();
        if link.flags.contains(LinkFlags::Loopback) {
            continue;
        }
        if !link.flags.contains(LinkFlags::Up) && addrs.is_empty() {
            continue;
        }
        let mac = check_mirrorable(link)?;
        chosen.push((link.index, link.name.clone()));
        config.interfaces.push(Interface {
            card: None,
            name: link.name.clone(),
            mac,
            mtu: link.mtu,
            addresses: addrs,
        });
    }

    let answers = nl
        .dump(RouteNetlinkMessage::GetRoute(RouteMessage::default()))
        .map_err(|e| NetError::netlink("listing routes", e))?;
    for m in answers {
        let RouteNetlinkMessage::NewRoute(r) = m else {
            continue;
        };
        let Scanned::Keep(oif, draft) = routes::from_message(&r, |i| {
            links.iter().find(|l| l.index == i).map(|l| l.name.clone())
        })?
        else {
            continue;
        };
        match chosen.iter().find(|(i, _)| *i == oif) {
            Some((_, name)) => config.routes.push(draft.named(name.clone())),
            // A route on `lo` or another interface the VM does not get.
            None => tracing::debug!(oif, "route on an interface that is not mirrored, skipped"),
        }
    }
    Ok(config)
}

/// The link's MAC if the link can be mirrored, or why not.
pub(crate) fn check_mirrorable(link: &Link) -> Result<rootcell_protocol::net::MacAddr, NetError> {
    let refuse = |why: String| NetError::Unsupported {
        name: link.name.clone(),
        kind: link.kind_text().to_string(),
        why,
    };
    let mac = match (link.link_type, link.mac()) {
        (LinkLayerType::Ether, Some(mac)) => mac,
        (t, _) => {
            return Err(refuse(format!(
                "it is not an Ethernet device (link type {t:?}, {}-byte hardware address); \
                 a virtio-net card carries Ethernet frames",
                link.hwaddr.len()
            )))
        }
    };
    if let Some(kind) = &link.kind {
        if !MIRRORABLE_KINDS.contains(&kind.as_str()) {
            return Err(refuse(format!(
                "only {} and physical Ethernet devices are mirrored to a tap",
                MIRRORABLE_KINDS.join(", ")
            )));
        }
    }
    // A dummy never talks ARP anyway; on anything else NOARP (e.g. ipvlan in L3 mode) means
    // the guest's ARP requests would go unanswered.
    if link.flags.contains(LinkFlags::Noarp) && link.kind.as_deref() != Some("dummy") {
        return Err(refuse(
            "it does not use ARP (e.g. ipvlan in L3 mode), so the guest could not reach its neighbours"
                .into(),
        ));
    }
    Ok(mac)
}

fn is_ipv6_link_local(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(kind: Option<&str>, link_type: LinkLayerType, hw: usize, flags: LinkFlags) -> Link {
        Link {
            index: 2,
            name: "eth0".into(),
            hwaddr: vec![2; hw],
            mtu: 1500,
            flags,
            link_type,
            kind: kind.map(str::to_string),
        }
    }

    #[test]
    fn ethernet_kinds_are_accepted_and_others_refused_with_reasons() {
        let up = LinkFlags::Up;
        for kind in [Some("veth"), Some("macvlan"), Some("ipvlan"), None] {
            assert!(
                check_mirrorable(&link(kind, LinkLayerType::Ether, 6, up)).is_ok(),
                "{kind:?}"
            );
        }
        assert!(check_mirrorable(&link(
            Some("dummy"),
            LinkLayerType::Ether,
            6,
            up | LinkFlags::Noarp
        ))
        .is_ok());
        let e = check_mirrorable(&link(Some("bridge"), LinkLayerType::Ether, 6, up)).unwrap_err();
        assert!(e.to_string().contains("eth0 (kind bridge)"), "{e}");
        let e = check_mirrorable(&link(Some("wireguard"), LinkLayerType::None, 0, up)).unwrap_err();
        assert!(e.to_string().contains("not an Ethernet device"), "{e}");
        let e = check_mirrorable(&link(
            Some("ipvlan"),
            LinkLayerType::Ether,
            6,
            up | LinkFlags::Noarp,
        ))
        .unwrap_err();
        assert!(e.to_string().contains("ARP"), "{e}");
    }

    #[test]
    fn only_fe80_slash_10_is_link_local() {
        assert!(is_ipv6_link_local("fe80::1".parse().unwrap()));
        assert!(is_ipv6_link_local("febf::1".parse().unwrap()));
        assert!(!is_ipv6_link_local("fec0::1".parse().unwrap()));
        assert!(!is_ipv6_link_local("169.254.1.1".parse().unwrap()));
    }
}
