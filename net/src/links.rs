//! Reading links and addresses from the kernel into plain structs.

use crate::netlink::Netlink;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage};
use netlink_packet_route::RouteNetlinkMessage;
use rootcell_protocol::net::{IpPrefix, MacAddr};
use std::collections::BTreeMap;
use std::io;

/// One network link as the kernel lists it.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Hardware address, any length (6 bytes on Ethernet).
    pub hwaddr: Vec<u8>,
    /// MTU in bytes.
    pub mtu: u32,
    /// `IFF_*` flags.
    pub flags: LinkFlags,
    /// `ARPHRD_*` type.
    pub link_type: LinkLayerType,
    /// `IFLA_INFO_KIND` (`veth`, `bridge`, ...); `None` for physical devices and loopback.
    pub kind: Option<String>,
}

impl Link {
    /// The hardware address as a MAC, if it is 6 bytes long.
    pub fn mac(&self) -> Option<MacAddr> {
        <[u8; 6]>::try_from(self.hwaddr.as_slice())
            .ok()
            .map(MacAddr)
    }

    /// The kind for messages: the kernel's name, or `none` for a device without one.
    pub fn kind_text(&self) -> &str {
        self.kind.as_deref().unwrap_or("none")
    }

    fn from_message(msg: LinkMessage) -> Self {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            hwaddr: Vec::new(),
            mtu: 0,
            flags: msg.header.flags,
            link_type: msg.header.link_layer_type,
            kind: None,
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n,
                LinkAttribute::Address(a) => link.hwaddr = a,
                LinkAttribute::Mtu(m) => link.mtu = m,
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(k) = info {
                            link.kind = Some(k.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

/// Every link of the socket's network namespace, in index order.
pub(crate) fn links(nl: &mut Netlink) -> io::Result<Vec<Link>> {
    let answers = nl.dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))?;
    let mut links: Vec<Link> = answers
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => Some(Link::from_message(l)),
            _ => None,
        })
        .collect();
    links.sort_by_key(|l| l.index);
    Ok(links)
}

/// The addresses of every link, by link index, in the kernel's order.
pub(crate) fn addresses(nl: &mut Netlink) -> io::Result<BTreeMap<u32, Vec<IpPrefix>>> {
    let answers = nl.dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))?;
    let mut out: BTreeMap<u32, Vec<IpPrefix>> = BTreeMap::new();
    for m in answers {
        let RouteNetlinkMessage::NewAddress(a) = m else {
            continue;
        };
        // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer on
        // point-to-point links); IPv6 only sends IFA_ADDRESS.
        let mut local = None;
        let mut address = None;
        for attr in &a.attributes {
            match attr {
                AddressAttribute::Local(ip) => local = Some(*ip),
                AddressAttribute::Address(ip) => address = Some(*ip),
                _ => {}
            }
        }
        if let Some(ip) = local.or(address) {
            if let Ok(p) = IpPrefix::new(ip, a.header.prefix_len) {
                out.entry(a.header.index).or_default().push(p);
            }
        }
    }
    Ok(out)
}

/// Changes of one link, applied by [`set_link`]; `None` leaves a property alone.
#[derive(Debug, Default)]
pub(crate) struct LinkChange<'a> {
    /// Bring the link up (`true`) or down.
    pub up: Option<bool>,
    /// New MTU.
    pub mtu: Option<u32>,
    /// New name.
    pub name: Option<&'a str>,
    /// New hardware address.
    pub mac: Option<MacAddr>,
    /// Move the link into the network namespace this descriptor refers to.
    pub netns_fd: Option<std::os::fd::RawFd>,
}

/// Applies `change` to link `index` in one RTM_SETLINK request.
pub(crate) fn set_link(nl: &mut Netlink, index: u32, change: LinkChange<'_>) -> io::Result<()> {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    if let Some(up) = change.up {
        msg.header.change_mask = LinkFlags::Up;
        if up {
            msg.header.flags = LinkFlags::Up;
        }
    }
    if let Some(mtu) = change.mtu {
        msg.attributes.push(LinkAttribute::Mtu(mtu));
    }
    if let Some(name) = change.name {
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
    }
    if let Some(mac) = change.mac {
        msg.attributes.push(LinkAttribute::Address(mac.0.to_vec()));
    }
    if let Some(fd) = change.netns_fd {
        msg.attributes.push(LinkAttribute::NetNsFd(fd));
    }
    nl.request(RouteNetlinkMessage::SetLink(msg), 0)
}
