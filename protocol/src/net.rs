//! The network a container had on the host, as the guest agent must rebuild it.
//!
//! The host finds each interface in the container's network namespace, mirrors it to a tap
//! device the VM's virtio-net card is backed by, and sends this description; the agent gives
//! the guest card with the same MAC the same name, MTU, addresses and routes.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// Everything the agent configures before the container is created.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// Interfaces, each matched to a guest card by its MAC address.
    pub interfaces: Vec<Interface>,
    /// Routes, added after every interface is up.
    pub routes: Vec<Route>,
}

/// One network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    /// Name the guest interface gets (the host interface's name, e.g. `eth0`).
    pub name: String,
    /// Hardware address, shared by the host interface and the guest card.
    pub mac: MacAddr,
    /// MTU in bytes.
    pub mtu: u32,
    /// Addresses with their prefix lengths.
    pub addresses: Vec<IpPrefix>,
    /// The MAC of the guest card that stands for this interface, when it is not `mac`: a VM
    /// booted ahead of need (a pool's) has cards with MACs of its own, and the agent gives the
    /// card `mac` before anything else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card: Option<MacAddr>,
}

impl Interface {
    /// The MAC the guest card has before it is configured.
    pub fn card_mac(&self) -> MacAddr {
        self.card.unwrap_or(self.mac)
    }
}

/// A route of the container's main routing table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Destination network; `None` is the default route.
    pub destination: Option<IpPrefix>,
    /// Next hop, if the destination is not on link.
    pub gateway: Option<IpAddr>,
    /// Name of the outgoing interface (an [`Interface::name`]).
    pub device: String,
    /// Preferred source address.
    pub source: Option<IpAddr>,
    /// Route metric (priority).
    pub metric: Option<u32>,
}

/// An address with a prefix length, written `10.0.0.2/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpPrefix {
    /// The address.
    pub addr: IpAddr,
    /// Prefix length in bits.
    pub len: u8,
}

/// A 48-bit Ethernet address, written `02:42:ac:11:00:02`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

/// A text form of [`IpPrefix`] or [`MacAddr`] that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {text:?}")]
pub struct ParseError {
    what: &'static str,
    text: String,
}

impl ParseError {
    fn new(what: &'static str, text: &str) -> Self {
        Self {
            what,
            text: text.to_string(),
        }
    }
}

impl IpPrefix {
    /// Builds a prefix, refusing a length longer than the address.
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, ParseError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(ParseError::new("prefix length", &len.to_string()));
        }
        Ok(Self { addr, len })
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for IpPrefix {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let err = || ParseError::new("address/prefix", s);
        let (addr, len) = s.split_once('/').ok_or_else(err)?;
        let addr: IpAddr = addr.parse().map_err(|_| err())?;
        let len: u8 = len.parse().map_err(|_| err())?;
        Self::new(addr, len).map_err(|_| err())
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for MacAddr {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let err = || ParseError::new("MAC address", s);
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut out {
            let p = parts.next().ok_or_else(err)?;
            if p.len() != 2 {
                return Err(err());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(Self(out))
    }
}

/// Serialises a `Display + FromStr` type as its text form.
macro_rules! serde_as_text {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_as_text!(IpPrefix);
serde_as_text!(MacAddr);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_and_macs_round_trip_as_text() {
        let cfg = NetworkConfig {
            interfaces: vec![Interface {
                card: None,
                name: "eth0".into(),
                mac: "02:42:ac:11:00:02".parse().unwrap(),
                mtu: 1500,
                addresses: vec![
                    "172.17.0.2/16".parse().unwrap(),
                    "fd00::2/64".parse().unwrap(),
                ],
            }],
            routes: vec![Route {
                destination: None,
                gateway: Some("172.17.0.1".parse().unwrap()),
                device: "eth0".into(),
                source: None,
                metric: None,
            }],
        };
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(json.contains(r#""mac":"02:42:ac:11:00:02""#), "{json}");
        assert!(json.contains(r#""172.17.0.2/16""#), "{json}");
        assert_eq!(serde_json::from_str::<NetworkConfig>(&json).unwrap(), cfg);
    }

    #[test]
    fn bad_text_forms_are_refused() {
        for bad in ["10.0.0.1", "10.0.0.1/33", "x/8", "fd00::1/129", "10.0.0.1/"] {
            assert!(bad.parse::<IpPrefix>().is_err(), "{bad}");
        }
        for bad in [
            "02:42:ac:11:00",
            "02:42:ac:11:00:02:03",
            "2:42:ac:11:00:02",
            "zz:42:ac:11:00:02",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<MacAddr>(r#""nope""#).is_err());
    }
}
