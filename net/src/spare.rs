//! Taps made ahead of need: a VM pool boots each VM with a tap in a namespace of its own, and
//! when a container claims the VM the tap moves into the container's namespace, where
//! [`crate::mirror_onto`] joins it to the container's interface.

use crate::error::NetError;
use crate::links::{self, LinkChange};
use crate::netns;
use netlink_packet_route::link::LinkMessage;
use netlink_packet_route::RouteNetlinkMessage;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};

/// Opens a new tap `name` in the calling thread's network namespace, as [`crate::mirror`]
/// does (virtio-net header, not persistent: it lives while the descriptor is open), and
/// leaves it down.
pub fn spare_tap(name: &str) -> Result<OwnedFd, NetError> {
    crate::tap::open_tap(name).map_err(|e| NetError::io(format!("creating tap {name}"), e))
}

/// Moves link `name` from network namespace `from` into `to`, keeping its name; it arrives
/// down (the kernel takes a link down to move it).
pub fn move_link(name: &str, from: &File, to: &File) -> Result<(), NetError> {
    let step = |what: &str| format!("moving {name} into the container's namespace: {what}");
    let mut nl = netns::netlink_in(from)
        .map_err(|e| NetError::netlink(step("opening a netlink socket"), e))?;
    let index = links::links(&mut nl)
        .map_err(|e| NetError::netlink(step("listing links"), e))?
        .into_iter()
        .find(|l| l.name == name)
        .map(|l| l.index)
        .ok_or_else(|| NetError::Mismatch(step("there is no such link")))?;
    links::set_link(
        &mut nl,
        index,
        LinkChange {
            netns_fd: Some(to.as_raw_fd()),
            ..LinkChange::default()
        },
    )
    .map_err(|e| NetError::netlink(step("RTM_SETLINK"), e))
}

/// Deletes link `name` from the calling thread's network namespace if it is there; whether it
/// was. A moved tap whose VM was given back goes this way: its hypervisor, killed, closes the
/// tap only when it has exited, which may be after a cold start wants the name.
pub fn remove_link(name: &str) -> Result<bool, NetError> {
    let step = |what: &str| format!("removing {name}: {what}");
    let mut nl = crate::netlink::Netlink::open()
        .map_err(|e| NetError::netlink(step("opening a netlink socket"), e))?;
    let Some(index) = links::links(&mut nl)
        .map_err(|e| NetError::netlink(step("listing links"), e))?
        .into_iter()
        .find(|l| l.name == name)
        .map(|l| l.index)
    else {
        return Ok(false);
    };
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    match nl.request(RouteNetlinkMessage::DelLink(msg), 0) {
        Ok(()) => Ok(true),
        // Gone meanwhile: its last descriptor was closed.
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(true),
        Err(e) => Err(NetError::netlink(step("RTM_DELLINK"), e)),
    }
}
