//! Host side: a tap per container interface, joined to it by tc redirect filters.

use crate::error::NetError;
use crate::links::{self, LinkChange};
use crate::netlink::Netlink;
use crate::scan::check_mirrorable;
use crate::{guard, netns, tap, tc};
use rootcell_protocol::net::{MacAddr, NetworkConfig};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

/// The tap that stands for one container interface.
#[derive(Debug)]
pub struct Tap {
    /// Name of the tap device (`rctap0`, `rctap1`, ...).
    pub name: String,
    /// Name of the container interface it mirrors (`eth0`).
    pub interface: String,
    /// MAC the VM's virtio-net card must use: the container interface's.
    pub mac: MacAddr,
    /// MTU of the interface (and of the tap).
    pub mtu: u32,
    fd: Option<OwnedFd>,
}

impl Tap {
    /// The tap's descriptor (frames with a 10-byte virtio-net header), unless taken.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(|f| f.as_fd())
    }

    /// The tap's raw descriptor number, unless taken.
    pub fn raw_fd(&self) -> Option<RawFd> {
        self.fd.as_ref().map(|f| f.as_raw_fd())
    }

    /// Takes the descriptor, e.g. to hand it to a VMM; the tap lives as long as it is open.
    pub fn take_fd(&mut self) -> Option<OwnedFd> {
        self.fd.take()
    }
}

/// The taps of a network namespace and the tc plumbing that joins them to its interfaces.
///
/// Dropping it (or [`Mirror::teardown`]) deletes the ingress qdiscs it added to the
/// container's interfaces, with their filters; each tap disappears when the last copy of
/// its descriptor closes.
#[derive(Debug)]
pub struct Mirror {
    taps: Vec<Tap>,
    /// Container interfaces that got an ingress qdisc from us: (index, name).
    qdiscs: Vec<(u32, String)>,
    netns: File,
}

/// Mirrors every interface of `config` (as [`crate::scan`] found it in the calling thread's
/// network namespace) to a new tap `rctap<N>` in the same namespace.
///
/// For each interface: open the tap (not persistent, with a virtio-net header), give it the
/// interface's MTU, bring it up, add an ingress qdisc to both, a u32 match-all filter on the
/// interface that redirects every frame to the tap's egress, and on the tap the anti-spoofing
/// filter of `guard` (drops what does not carry the interface's MAC and addresses) followed
/// by a match-all filter that redirects the rest to the interface's egress. Fails if an interface already has
/// an ingress qdisc. On error everything done so far is undone and the error names the step
/// and the interface.
pub fn mirror(config: &NetworkConfig) -> Result<Mirror, NetError> {
    mirror_onto(config, &[])
}

/// [`mirror`], except that interface `n` is joined to the tap named `spares[n]`, already in
/// this namespace and open elsewhere (a VM booted ahead of need holds its descriptor, see
/// [`crate::spare_tap`]), where one is given; the [`Tap`] then holds no descriptor.
pub fn mirror_onto(config: &NetworkConfig, spares: &[String]) -> Result<Mirror, NetError> {
    let netns =
        netns::current().map_err(|e| NetError::io("opening the current network namespace", e))?;
    let mut nl = Netlink::open().map_err(|e| NetError::netlink("opening a netlink socket", e))?;
    let mut m = Mirror {
        taps: Vec::new(),
        qdiscs: Vec::new(),
        netns,
    };
    // On an early return `m` is dropped, which undoes what it holds.
    for (n, iface) in config.interfaces.iter().enumerate() {
        let step = |what: &str| format!("interface {}: {what}", iface.name);
        let present =
            links::links(&mut nl).map_err(|e| NetError::netlink(step("listing links"), e))?;
        let link = present
            .iter()
            .find(|l| l.name == iface.name)
            .ok_or_else(|| NetError::Mismatch(step("there is no such interface here")))?;
        let mac = check_mirrorable(link)?;
        if mac != iface.mac {
            return Err(NetError::Mismatch(step(&format!(
                "its MAC is {mac}, the configuration says {}",
                iface.mac
            ))));
        }

        let (tap_name, fd) = match spares.get(n) {
            Some(spare) => (spare.clone(), None),
            None => {
                let name = format!("rctap{n}");
                let fd = tap::open_tap(&name)
                    .map_err(|e| NetError::io(step(&format!("creating tap {name}")), e))?;
                (name, Some(fd))
            }
        };
        m.taps.push(Tap {
            name: tap_name.clone(),
            interface: iface.name.clone(),
            mac: iface.mac,
            mtu: iface.mtu,
            fd,
        });
        let tap_index = links::links(&mut nl)
            .map_err(|e| NetError::netlink(step("listing links"), e))?
            .into_iter()
            .find(|l| l.name == tap_name)
            .map(|l| l.index)
            .ok_or_else(|| {
                NetError::io(
                    step(&format!("finding tap {tap_name}")),
                    std::io::Error::from_raw_os_error(libc::ENODEV),
                )
            })?;
        links::set_link(
            &mut nl,
            tap_index,
            LinkChange {
                up: Some(true),
                mtu: Some(iface.mtu),
                ..LinkChange::default()
            },
        )
        .map_err(|e| {
            NetError::netlink(
                step(&format!("setting MTU {} and up on {tap_name}", iface.mtu)),
                e,
            )
        })?;

        let _ = remove_stale_ingress(&mut nl, link.index, &iface.name);
        tc::add_ingress(&mut nl, link.index).map_err(|e| {
            NetError::netlink(
                step(&format!("adding an ingress qdisc to {}", iface.name)),
                e,
            )
        })?;
        m.qdiscs.push((link.index, iface.name.clone()));
        tc::add_ingress(&mut nl, tap_index).map_err(|e| {
            NetError::netlink(step(&format!("adding an ingress qdisc to {tap_name}")), e)
        })?;
        tc::add_redirect(&mut nl, link.index, tap_index).map_err(|e| {
            NetError::netlink(
                step(&format!("redirecting {} to {tap_name}", iface.name)),
                e,
            )
        })?;
        // Guest -> network: only what carries the container's own MAC and addresses.
        guard::protect(&mut nl, tap_index, iface).map_err(|e| {
            NetError::netlink(
                step(&format!("adding the anti-spoofing filter to {tap_name}")),
                e,
            )
        })?;
        tc::add_redirect(&mut nl, tap_index, link.index).map_err(|e| {
            NetError::netlink(
                step(&format!("redirecting {tap_name} to {}", iface.name)),
                e,
            )
        })?;
        tracing::debug!(interface = %iface.name, tap = %tap_name, "interface mirrored to tap");
    }
    Ok(m)
}

/// Deletes the ingress qdisc of link `index` (named `name`) if a mirror left it behind: its
/// filters redirect frames only to links that are gone. That is what a mirror whose process was
/// killed leaves (its tap closed with the VM, nobody deleted the qdisc); in a namespace that
/// outlives its container (a pod's, one made with `ip netns`) it would refuse the next
/// container's mirror and drop the interface's frames. A qdisc without redirects, or with one
/// to a link that is there, is somebody else's: it stays, and `add_ingress` refuses it. True if
/// it deleted one.
pub(crate) fn remove_stale_ingress(nl: &mut Netlink, index: u32, name: &str) -> bool {
    let Ok(targets) = tc::ingress_redirects(nl, index) else {
        return false;
    };
    if targets.is_empty() {
        return false;
    }
    let Ok(present) = links::links(nl) else {
        return false;
    };
    if targets
        .iter()
        .any(|t| present.iter().any(|l| l.index == *t))
    {
        return false;
    }
    match tc::del_ingress(nl, index) {
        Ok(()) => {
            tracing::info!(
                interface = name,
                gone = ?targets,
                "removed the ingress qdisc a killed mirror left (its redirects led to links that are gone)"
            );
            true
        }
        Err(e) => {
            tracing::warn!(interface = name, "cannot remove a stale ingress qdisc: {e}");
            false
        }
    }
}

/// Removes from every interface of network namespace `netns` the ingress qdisc a killed
/// mirror left (see [`mirror`]: its redirects lead to taps that are gone); returns the names
/// of the interfaces cleaned. For `delete` of a container whose sandbox was killed, once its
/// VMM (and with it the tap) is gone.
pub fn remove_stale_mirrors(netns: &File) -> Result<Vec<String>, NetError> {
    let mut nl = netns::netlink_in(netns)
        .map_err(|e| NetError::netlink("opening a netlink socket in the namespace", e))?;
    let present = links::links(&mut nl).map_err(|e| NetError::netlink("listing links", e))?;
    Ok(present
        .into_iter()
        .filter(|l| remove_stale_ingress(&mut nl, l.index, &l.name))
        .map(|l| l.name)
        .collect())
}

impl Mirror {
    /// One tap per interface, in the order of the configuration.
    pub fn taps(&self) -> &[Tap] {
        &self.taps
    }

    /// The taps, to take their descriptors one by one.
    pub fn taps_mut(&mut self) -> &mut [Tap] {
        &mut self.taps
    }

    /// Takes every tap descriptor still held, in order.
    pub fn take_fds(&mut self) -> Vec<OwnedFd> {
        self.taps.iter_mut().filter_map(Tap::take_fd).collect()
    }

    /// Deletes the ingress qdiscs added to the container's interfaces and closes the tap
    /// descriptors still held; reports the first failure after trying every interface.
    pub fn teardown(mut self) -> Result<(), NetError> {
        self.undo()
    }

    fn undo(&mut self) -> Result<(), NetError> {
        self.taps.clear();
        if self.qdiscs.is_empty() {
            return Ok(());
        }
        let mut nl = netns::netlink_in(&self.netns).map_err(|e| {
            NetError::netlink("opening a netlink socket in the mirrored namespace", e)
        })?;
        let mut first = None;
        for (index, name) in self.qdiscs.drain(..) {
            match tc::del_ingress(&mut nl, index) {
                // The interface is gone (e.g. the namespace is being destroyed): nothing left.
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
                Err(e) => {
                    first.get_or_insert(NetError::netlink(
                        format!("interface {name}: deleting its ingress qdisc"),
                        e,
                    ));
                }
                Ok(()) => {}
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        if let Err(e) = self.undo() {
            tracing::warn!(error = %e, "tearing down the network mirror");
        }
    }
}
