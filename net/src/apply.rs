//! Guest side: giving the virtio-net cards the names, MTUs, addresses and routes the
//! container's interfaces had on the host.

use crate::error::NetError;
use crate::links::{self, Link, LinkChange};
use crate::netlink::Netlink;
use crate::routes;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::address::{AddressAttribute, AddressHeaderFlags, AddressMessage};
use netlink_packet_route::link::LinkFlags;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rootcell_protocol::net::{IpPrefix, NetworkConfig};
use std::net::{IpAddr, Ipv4Addr};

/// Configures the calling thread's network namespace after `config`: for each interface the
/// link with its MAC (or with [`rootcell_protocol::net::Interface::card`], which then takes the
/// interface's MAC) is taken down, renamed, given the MTU and addresses and brought up;
/// then the routes are added, routes without a gateway first. Loopback is left alone.
pub fn apply(config: &NetworkConfig) -> Result<(), NetError> {
    let mut nl = Netlink::open().map_err(|e| NetError::netlink("opening a netlink socket", e))?;
    let present = links::links(&mut nl).map_err(|e| NetError::netlink("listing links", e))?;

    // Find every card first, so a missing one fails before anything changes.
    let mut cards: Vec<&Link> = Vec::new();
    for iface in &config.interfaces {
        let card = present
            .iter()
            .find(|l| !l.flags.contains(LinkFlags::Loopback) && l.mac() == Some(iface.card_mac()))
            .ok_or_else(|| NetError::NoSuchMac {
                mac: iface.card_mac().to_string(),
                name: iface.name.clone(),
                present: present_macs(&present),
            })?;
        cards.push(card);
    }

    // Renaming goes through temporary names, so two cards can swap names (eth0 <-> eth1).
    for (n, (iface, card)) in config.interfaces.iter().zip(&cards).enumerate() {
        let step = |what: &str| format!("interface {} ({}): {what}", iface.name, iface.mac);
        let temp = format!("rcnet{n}");
        let rename = (card.name != iface.name).then_some(temp.as_str());
        links::set_link(
            &mut nl,
            card.index,
            LinkChange {
                up: Some(false),
                name: rename,
                // A card booted before the interface existed takes the interface's MAC.
                mac: iface.card.map(|_| iface.mac),
                ..LinkChange::default()
            },
        )
        .map_err(|e| NetError::netlink(step(&format!("taking {} down", card.name)), e))?;
    }
    for (iface, card) in config.interfaces.iter().zip(&cards) {
        let step = |what: &str| format!("interface {} ({}): {what}", iface.name, iface.mac);
        links::set_link(
            &mut nl,
            card.index,
            LinkChange {
                mtu: Some(iface.mtu),
                name: (card.name != iface.name).then_some(iface.name.as_str()),
                ..LinkChange::default()
            },
        )
        .map_err(|e| NetError::netlink(step(&format!("setting name and MTU {}", iface.mtu)), e))?;
        for addr in &iface.addresses {
            nl.request(
                RouteNetlinkMessage::NewAddress(address_message(card.index, addr)),
                NLM_F_CREATE | NLM_F_REPLACE,
            )
            .map_err(|e| {
                NetError::netlink(
                    step(&format!(
                        "adding address {addr}{}",
                        no_ipv6_hint(addr.addr.is_ipv6(), &e)
                    )),
                    e,
                )
            })?;
        }
        links::set_link(
            &mut nl,
            card.index,
            LinkChange {
                up: Some(true),
                ..LinkChange::default()
            },
        )
        .map_err(|e| NetError::netlink(step("bringing it up"), e))?;
    }

    // On-link routes first: a gateway must be reachable when its route is added.
    let (on_link, via): (Vec<_>, Vec<_>) = config.routes.iter().partition(|r| r.gateway.is_none());
    for route in on_link.into_iter().chain(via) {
        let index = config
            .interfaces
            .iter()
            .zip(&cards)
            .find(|(i, _)| i.name == route.device)
            .map(|(_, c)| c.index)
            .ok_or_else(|| NetError::Route {
                route: routes::route_text(route),
                why: format!(
                    "device {} is not among the configured interfaces",
                    route.device
                ),
            })?;
        nl.request(
            RouteNetlinkMessage::NewRoute(routes::to_message(route, index)),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map_err(|e| NetError::Route {
            route: routes::route_text(route),
            why: match (e.raw_os_error(), route.gateway) {
                (Some(libc::ENETUNREACH), Some(gw)) => {
                    format!("gateway {gw} is not reachable on {} ({e})", route.device)
                }
                _ => format!("{e}{}", no_ipv6_hint(routes::is_ipv6(route), &e)),
            },
        })?;
    }
    Ok(())
}

/// Explains the kernel's answer to an IPv6 request when the kernel was built without IPv6.
fn no_ipv6_hint(ipv6: bool, e: &std::io::Error) -> &'static str {
    if ipv6 && e.raw_os_error() == Some(libc::EAFNOSUPPORT) {
        " (this kernel has no IPv6 support, CONFIG_IPV6)"
    } else {
        ""
    }
}

/// `name=mac` of every non-loopback link, for the error when a MAC is missing.
fn present_macs(links: &[Link]) -> String {
    let list: Vec<String> = links
        .iter()
        .filter(|l| !l.flags.contains(LinkFlags::Loopback))
        .map(|l| match l.mac() {
            Some(mac) => format!("{}={mac}", l.name),
            None => format!("{}=(no MAC)", l.name),
        })
        .collect();
    if list.is_empty() {
        "none".to_string()
    } else {
        list.join(", ")
    }
}

/// The RTM_NEWADDR message for `addr` on link `index`, as `ip addr add ADDR brd +` makes it.
fn address_message(index: u32, addr: &IpPrefix) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.index = index;
    msg.header.prefix_len = addr.len;
    match addr.addr {
        IpAddr::V4(v4) => {
            msg.header.family = AddressFamily::Inet;
            msg.attributes.push(AddressAttribute::Local(addr.addr));
            msg.attributes.push(AddressAttribute::Address(addr.addr));
            if addr.len <= 30 {
                msg.attributes
                    .push(AddressAttribute::Broadcast(broadcast(v4, addr.len)));
            }
        }
        IpAddr::V6(_) => {
            msg.header.family = AddressFamily::Inet6;
            // The host already owns this address on the same link; duplicate address
            // detection would only hold it back for a second.
            msg.header.flags = AddressHeaderFlags::Nodad;
            msg.attributes.push(AddressAttribute::Address(addr.addr));
        }
    }
    msg
}

fn broadcast(addr: Ipv4Addr, len: u8) -> Ipv4Addr {
    let host_bits = u32::MAX.checked_shr(u32::from(len)).unwrap_or(0);
    Ipv4Addr::from(u32::from(addr) | host_bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_sets_the_host_bits() {
        let a: Ipv4Addr = "172.17.0.2".parse().unwrap();
        assert_eq!(broadcast(a, 16), Ipv4Addr::new(172, 17, 255, 255));
        assert_eq!(broadcast(a, 24), Ipv4Addr::new(172, 17, 0, 255));
        assert_eq!(broadcast(a, 0), Ipv4Addr::BROADCAST);
    }
}
