//! Container networking for rootcell.
//!
//! Host side ([`scan`], [`mirror`]): in the container's network namespace, describe each
//! interface and join it to a new tap device with tc redirect filters (Kata's "tcfilter"
//! model), so a VM's virtio-net card backed by the tap sits on the container's network
//! with the interface's MAC; what the guest sends leaves only with the interface's MAC and
//! addresses (see the `guard` module). Guest side ([`apply`]): give the card with that MAC the
//! interface's name, MTU, addresses and routes.
//!
//! Every function works on the calling thread's current network namespace.

mod apply;
mod error;
mod guard;
mod links;
mod mirror;
mod netlink;
mod netns;
mod routes;
mod scan;
mod spare;
mod tap;
mod tc;

pub use apply::apply;
pub use error::NetError;
pub use mirror::{mirror, mirror_onto, remove_stale_mirrors, Mirror, Tap};
pub use rootcell_protocol::net::{Interface, IpPrefix, MacAddr, NetworkConfig, Route};
pub use scan::scan;
pub use spare::{move_link, remove_link, spare_tap};

#[cfg(test)]
mod tests;
