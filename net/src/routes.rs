//! Converting between kernel route messages and [`Route`], and writing routes as text.

use crate::error::NetError;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use netlink_packet_route::AddressFamily;
use rootcell_protocol::net::{IpPrefix, Route};
use std::net::IpAddr;

/// A route the way `ip route` writes it, for error messages (no `dev` if the device is
/// unknown).
pub(crate) fn route_text(r: &Route) -> String {
    let mut s = match r.destination {
        Some(d) => d.to_string(),
        None => "default".to_string(),
    };
    if let Some(gw) = r.gateway {
        s.push_str(&format!(" via {gw}"));
    }
    if !r.device.is_empty() {
        s.push_str(&format!(" dev {}", r.device));
    }
    if let Some(src) = r.source {
        s.push_str(&format!(" src {src}"));
    }
    if let Some(m) = r.metric {
        s.push_str(&format!(" metric {m}"));
    }
    s
}

/// What a kernel route message became.
pub(crate) enum Scanned {
    /// A route the guest must get, with the index of its outgoing link.
    Keep(u32, RouteDraft),
    /// A route the kernel makes on its own or that is not in the main table.
    Skip,
}

/// A route before its outgoing link index is turned into a name.
pub(crate) struct RouteDraft {
    /// See [`Route::destination`].
    pub destination: Option<IpPrefix>,
    /// See [`Route::gateway`].
    pub gateway: Option<IpAddr>,
    /// See [`Route::source`].
    pub source: Option<IpAddr>,
    /// See [`Route::metric`].
    pub metric: Option<u32>,
}

impl RouteDraft {
    /// The route with its device named.
    pub(crate) fn named(self, device: String) -> Route {
        Route {
            destination: self.destination,
            gateway: self.gateway,
            device,
            source: self.source,
            metric: self.metric,
        }
    }
}

fn ip(addr: &RouteAddress) -> Option<IpAddr> {
    match addr {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

/// Sorts out one route of a dump: kept (main table, unicast, not made by the kernel for an
/// address) or skipped; a kept route that cannot be described is an error.
///
/// `name_of` turns a link index into its name for error messages.
pub(crate) fn from_message(
    msg: &RouteMessage,
    name_of: impl Fn(u32) -> Option<String>,
) -> Result<Scanned, NetError> {
    let h = &msg.header;
    let mut table = u32::from(h.table);
    let mut draft = RouteDraft {
        destination: None,
        gateway: None,
        source: None,
        metric: None,
    };
    let mut oif = None;
    let mut problem = None;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(a) => {
                draft.destination =
                    ip(a).and_then(|a| IpPrefix::new(a, h.destination_prefix_length).ok())
            }
            RouteAttribute::Gateway(a) => draft.gateway = ip(a),
            RouteAttribute::PrefSource(a) => draft.source = ip(a),
            RouteAttribute::Priority(m) => draft.metric = Some(*m),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::MultiPath(_) => problem = Some("multipath routes are not supported"),
            RouteAttribute::Via(_) => {
                problem = Some("routes via another address family are not supported")
            }
            RouteAttribute::Encap(_) => problem = Some("encapsulating routes are not supported"),
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN)
        || h.protocol == RouteProtocol::Kernel
        || h.kind != RouteType::Unicast
        || h.flags.contains(RouteFlags::Cloned)
    {
        return Ok(Scanned::Skip);
    }
    if h.source_prefix_length != 0 {
        problem = Some("source-specific routes are not supported");
    }
    if h.flags.contains(RouteFlags::Onlink) {
        problem = Some("onlink gateway routes are not supported");
    }
    let Some(oif) = oif else {
        problem = problem.or(Some("the route has no outgoing interface"));
        return Err(route_error(
            draft.named(String::new()),
            problem.unwrap_or_default(),
        ));
    };
    if let Some(why) = problem {
        return Err(route_error(
            draft.named(name_of(oif).unwrap_or_else(|| format!("#{oif}"))),
            why,
        ));
    }
    Ok(Scanned::Keep(oif, draft))
}

fn route_error(r: Route, why: &str) -> NetError {
    NetError::Route {
        route: route_text(&r),
        why: why.to_string(),
    }
}

/// Whether `route` is an IPv6 route (a default route takes the family of its gateway).
pub(crate) fn is_ipv6(route: &Route) -> bool {
    match (route.destination, route.gateway) {
        (Some(d), _) => d.addr.is_ipv6(),
        (None, Some(g)) => g.is_ipv6(),
        (None, None) => route.source.is_some_and(|s| s.is_ipv6()),
    }
}

/// The kernel message that adds `route` through link `index` to the main table.
pub(crate) fn to_message(route: &Route, index: u32) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = if is_ipv6(route) {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    msg.header.table = RouteHeader::RT_TABLE_MAIN;
    msg.header.protocol = RouteProtocol::Boot;
    msg.header.kind = RouteType::Unicast;
    // Like `ip route add`: a route without a next hop to a network is on link.
    msg.header.scope = if route.gateway.is_none() && route.destination.is_some() {
        RouteScope::Link
    } else {
        RouteScope::Universe
    };
    if let Some(d) = route.destination {
        msg.header.destination_prefix_length = d.len;
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(d.addr)));
    }
    if let Some(g) = route.gateway {
        msg.attributes
            .push(RouteAttribute::Gateway(RouteAddress::from(g)));
    }
    if let Some(s) = route.source {
        msg.attributes
            .push(RouteAttribute::PrefSource(RouteAddress::from(s)));
    }
    if let Some(m) = route.metric {
        msg.attributes.push(RouteAttribute::Priority(m));
    }
    msg.attributes.push(RouteAttribute::Oif(index));
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(dest: Option<&str>, gw: Option<&str>) -> Route {
        Route {
            destination: dest.map(|d| d.parse().unwrap()),
            gateway: gw.map(|g| g.parse().unwrap()),
            device: "eth0".into(),
            source: None,
            metric: Some(5),
        }
    }

    #[test]
    fn routes_read_like_ip_route() {
        assert_eq!(
            route_text(&route(None, Some("10.0.0.1"))),
            "default via 10.0.0.1 dev eth0 metric 5"
        );
        assert_eq!(
            route_text(&route(Some("10.1.0.0/16"), None)),
            "10.1.0.0/16 dev eth0 metric 5"
        );
    }

    #[test]
    fn messages_round_trip_and_kernel_routes_are_skipped() {
        let r = route(Some("fd00:1::/64"), Some("fd00::1"));
        let mut msg = to_message(&r, 7);
        assert_eq!(msg.header.address_family, AddressFamily::Inet6);
        match from_message(&msg, |_| None).unwrap() {
            Scanned::Keep(7, d) => assert_eq!(d.named("eth0".into()), r),
            _ => panic!("route was not kept"),
        }
        msg.header.protocol = RouteProtocol::Kernel;
        assert!(matches!(
            from_message(&msg, |_| None).unwrap(),
            Scanned::Skip
        ));
    }

    #[test]
    fn on_link_routes_get_link_scope() {
        let msg = to_message(&route(Some("10.1.0.0/16"), None), 3);
        assert_eq!(msg.header.scope, RouteScope::Link);
        let msg = to_message(&route(None, Some("10.0.0.1")), 3);
        assert_eq!(msg.header.scope, RouteScope::Universe);
        assert_eq!(msg.header.address_family, AddressFamily::Inet);
    }
}
