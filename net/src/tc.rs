//! tc plumbing: ingress qdiscs, u32 match-all filters that redirect every frame, and classic
//! BPF filters that drop frames (direct action).

use crate::netlink::Netlink;
use netlink_packet_core::{DefaultNla, NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionMirrorOption, TcActionOption, TcActionType, TcAttribute,
    TcBpfFlags, TcFilterBpfOption, TcFilterU32Option, TcHandle, TcMessage, TcMirror,
    TcMirrorActionType, TcOption, TcU32Key, TcU32Selector, TcU32SelectorFlags,
};
use netlink_packet_route::RouteNetlinkMessage;
use std::io;

/// `ETH_P_ALL`: the filter matches frames of every protocol.
const ETH_P_ALL: u16 = 0x0003;
/// Priority of the redirect filter in its ingress block (after [`GUARD_PRIO`]).
const FILTER_PRIO: u16 = 2;
/// Priority of a BPF guard filter: it runs before the redirect.
pub(crate) const GUARD_PRIO: u16 = 1;

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

/// The links the ingress filters of link `index` redirect frames to (the targets of their mirred
/// actions, by index); empty when it has no ingress qdisc or no such filter.
pub(crate) fn ingress_redirects(nl: &mut Netlink, index: u32) -> io::Result<Vec<u32>> {
    let mut msg = TcMessage::with_index(index as i32);
    msg.header.parent = INGRESS_HANDLE;
    let mut targets = Vec::new();
    for answer in nl.dump(RouteNetlinkMessage::GetTrafficFilter(msg))? {
        let RouteNetlinkMessage::NewTrafficFilter(filter) = answer else {
            continue;
        };
        let options = filter.attributes.iter().filter_map(|a| match a {
            TcAttribute::Options(o) => Some(o),
            _ => None,
        });
        let actions = options.flatten().filter_map(|o| match o {
            TcOption::U32(TcFilterU32Option::Action(actions)) => Some(actions),
            _ => None,
        });
        for action in actions.flatten() {
            for attr in &action.attributes {
                let TcActionAttribute::Options(opts) = attr else {
                    continue;
                };
                for o in opts {
                    if let TcActionOption::Mirror(TcActionMirrorOption::Parms(m)) = o {
                        targets.push(m.ifindex);
                    }
                }
            }
        }
    }
    Ok(targets)
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

/// `TCA_BPF_OPS_LEN` and `TCA_BPF_OPS`: a classic BPF program (netlink-packet-route only
/// knows eBPF programs by fd).
const TCA_BPF_OPS_LEN: u16 = 4;
const TCA_BPF_OPS: u16 = 5;

/// Adds to the ingress qdisc of link `dev`, at priority [`GUARD_PRIO`], a `bpf` filter in
/// direct-action mode running the classic BPF program `prog` (`tc filter add dev DEV parent
/// ffff: prio 1 protocol all bpf da bytecode ...`). At ingress cls_bpf runs the program with
/// the Ethernet header pushed back, so its offsets count from the frame's first byte; its
/// return value is the verdict: `TC_ACT_SHOT` drops the frame, `TC_ACT_UNSPEC` hands it to
/// the next filter. Direct action needs no action module (this host's kernel has cls_bpf and
/// act_mirred built in, and no act_gact).
pub(crate) fn add_bpf(nl: &mut Netlink, dev: u32, prog: &[libc::sock_filter]) -> io::Result<()> {
    let mut msg = TcMessage::with_index(dev as i32);
    msg.header.parent = INGRESS_HANDLE;
    msg.header.info = (u32::from(GUARD_PRIO) << 16) | u32::from(ETH_P_ALL.to_be());
    msg.attributes.push(TcAttribute::Kind("bpf".to_string()));
    let len = u16::try_from(prog.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    let mut ops = Vec::with_capacity(prog.len() * 8);
    for i in prog {
        ops.extend_from_slice(&i.code.to_ne_bytes());
        ops.push(i.jt);
        ops.push(i.jf);
        ops.extend_from_slice(&i.k.to_ne_bytes());
    }
    msg.attributes.push(TcAttribute::Options(vec![
        TcOption::Bpf(TcFilterBpfOption::Other(DefaultNla::new(
            TCA_BPF_OPS_LEN,
            len.to_ne_bytes().to_vec(),
        ))),
        TcOption::Bpf(TcFilterBpfOption::Other(DefaultNla::new(TCA_BPF_OPS, ops))),
        TcOption::Bpf(TcFilterBpfOption::Flags(TcBpfFlags::DirectAction)),
    ]));
    nl.request(
        RouteNetlinkMessage::NewTrafficFilter(msg),
        NLM_F_CREATE | NLM_F_EXCL,
    )
}
