//! tc plumbing: ingress qdiscs and u32 match-all filters that redirect every frame.

use crate::netlink::Netlink;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionMirrorOption, TcActionOption, TcActionType, TcAttribute,
    TcFilterU32Option, TcHandle, TcMessage, TcMirror, TcMirrorActionType, TcOption, TcU32Key,
    TcU32Selector, TcU32SelectorFlags,
};
use netlink_packet_route::RouteNetlinkMessage;
use std::io;

/// `ETH_P_ALL`: the filter matches frames of every protocol.
const ETH_P_ALL: u16 = 0x0003;
/// Priority of the redirect filter in its ingress block.
const FILTER_PRIO: u16 = 1;

/// The handle of an ingress qdisc and the parent of its filters: `ffff:`.
const INGRESS_HANDLE: TcHandle = TcHandle {
    major: 0xffff,
    minor: 0,
};

fn ingress_qdisc(index: u32) -> TcMessage {
    let mut msg = TcMessage::with_index(index as i32);
    msg.header.parent = TcHandle::INGRESS;
    msg.header.handle = INGRESS_HANDLE;
    msg.attributes
        .push(TcAttribute::Kind("ingress".to_string()));
    msg
}

/// Adds an ingress qdisc to link `index`; fails with `EEXIST` if it already has one, so a
/// qdisc somebody else put there is never taken over (or later deleted) by us.
pub(crate) fn add_ingress(nl: &mut Netlink, index: u32) -> io::Result<()> {
    nl.request(
        RouteNetlinkMessage::NewQueueDiscipline(ingress_qdisc(index)),
        NLM_F_CREATE | NLM_F_EXCL,
    )
}

/// Deletes the ingress qdisc of link `index`, and with it every ingress filter.
pub(crate) fn del_ingress(nl: &mut Netlink, index: u32) -> io::Result<()> {
    nl.request(
        RouteNetlinkMessage::DelQueueDiscipline(ingress_qdisc(index)),
        0,
    )
}

/// Adds to the ingress qdisc of link `from` a filter that matches every frame and redirects
/// it to the egress of link `to` (`tc filter add dev FROM parent ffff: protocol all u32 match
/// u32 0 0 action mirred egress redirect dev TO`).
pub(crate) fn add_redirect(nl: &mut Netlink, from: u32, to: u32) -> io::Result<()> {
    let mut msg = TcMessage::with_index(from as i32);
    msg.header.parent = INGRESS_HANDLE;
    // tcm_info holds the priority in its upper half and the protocol (network order) below.
    msg.header.info = (u32::from(FILTER_PRIO) << 16) | u32::from(ETH_P_ALL.to_be());
    msg.attributes.push(TcAttribute::Kind("u32".to_string()));

    let mut key = TcU32Key::default();
    key.mask = 0;
    key.val = 0;
    let mut selector = TcU32Selector::default();
    selector.flags = TcU32SelectorFlags::Terminal;
    selector.nkeys = 1;
    selector.keys = vec![key];

    let mut mirror = TcMirror::default();
    mirror.generic.action = TcActionType::Stolen;
    mirror.eaction = TcMirrorActionType::EgressRedir;
    mirror.ifindex = to;
    let mut action = TcAction::default();
    action.attributes = vec![
        TcActionAttribute::Kind("mirred".to_string()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
            mirror,
        ))]),
    ];

    msg.attributes.push(TcAttribute::Options(vec![
        TcOption::U32(TcFilterU32Option::Selector(selector)),
        TcOption::U32(TcFilterU32Option::Action(vec![action])),
    ]));
    nl.request(
        RouteNetlinkMessage::NewTrafficFilter(msg),
        NLM_F_CREATE | NLM_F_EXCL,
    )
}
