use super::*;
use crate::{scan, Interface, NetError, NetworkConfig, Route};

#[test]
fn scan_describes_a_docker_like_namespace() {
    let peer_ns = other_netns();
    let config = in_new_netns(move || {
        veth_to(&peer_ns, "eth0", "02:42:ac:11:00:02", 1400, "peer0");
        sh("ip link set lo up
            ip link set eth0 up
            ip addr add 172.17.0.2/16 dev eth0
            ip -6 addr add fd00::2/64 dev eth0 nodad
            ip route add default via 172.17.0.1
            ip route add 10.9.0.0/16 via 172.17.0.5 metric 7 src 172.17.0.2
            ip -6 route add default via fd00::1
            # Down and without an address, like the kernel's sit0/tunl0: skipped, even
            # a kind that could not be mirrored.
            ip link add down0 type veth peer name down1
            ip link add br9 type bridge");
        scan().unwrap()
    });
    let expected = NetworkConfig {
        interfaces: vec![Interface {
            card: None,
            name: "eth0".into(),
            mac: "02:42:ac:11:00:02".parse().unwrap(),
            mtu: 1400,
            addresses: vec![
                "172.17.0.2/16".parse().unwrap(),
                "fd00::2/64".parse().unwrap(),
            ],
        }],
        routes: vec![
            Route {
                destination: None,
                gateway: Some("172.17.0.1".parse().unwrap()),
                device: "eth0".into(),
                source: None,
                metric: None,
            },
            Route {
                destination: Some("10.9.0.0/16".parse().unwrap()),
                gateway: Some("172.17.0.5".parse().unwrap()),
                device: "eth0".into(),
                source: Some("172.17.0.2".parse().unwrap()),
                metric: Some(7),
            },
            Route {
                destination: None,
                gateway: Some("fd00::1".parse().unwrap()),
                device: "eth0".into(),
                source: None,
                metric: Some(1024),
            },
        ],
    };
    assert_eq!(config, expected);
}

#[test]
fn scan_refuses_a_bridge_and_names_it() {
    let err = in_new_netns(|| {
        sh("ip link add br0 type bridge && ip link set br0 up");
        scan().unwrap_err()
    });
    assert!(matches!(err, NetError::Unsupported { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "interface br0 (kind bridge) cannot be mirrored into the VM: only veth, macvlan, \
         macvtap, ipvlan, dummy and physical Ethernet devices are mirrored to a tap"
    );
}

#[test]
fn scan_of_an_empty_namespace_is_empty() {
    let config = in_new_netns(|| {
        sh("ip link set lo up");
        scan().unwrap()
    });
    assert_eq!(config, NetworkConfig::default());
}

#[test]
fn scan_accepts_a_macvlan_moved_into_the_namespace() {
    let container = other_netns();
    let path = ns_path(&container);
    let config = in_new_netns(move || {
        sh(&format!(
            "ip link add parent0 type veth peer name parent1
             ip link add mv0 link parent0 address 02:42:ac:11:00:09 type macvlan mode bridge
             ip link set mv0 netns {path}"
        ));
        in_netns(&container, || {
            sh("ip link set mv0 up && ip addr add 192.168.5.2/24 dev mv0");
            scan().unwrap()
        })
    });
    assert_eq!(config.interfaces.len(), 1, "{config:?}");
    assert_eq!(config.interfaces[0].name, "mv0");
    assert_eq!(config.interfaces[0].mac.to_string(), "02:42:ac:11:00:09");
    assert_eq!(
        config.interfaces[0].addresses,
        ["192.168.5.2/24".parse().unwrap()]
    );
}

#[test]
fn scan_refuses_a_multipath_route_and_names_it() {
    let peer_ns = other_netns();
    let err = in_new_netns(move || {
        veth_to(&peer_ns, "eth0", "02:42:ac:11:00:02", 1500, "peer0");
        veth_to(&peer_ns, "eth1", "02:42:ac:11:00:03", 1500, "peer1");
        sh("ip link set eth0 up && ip link set eth1 up
            ip addr add 10.0.0.2/24 dev eth0 && ip addr add 10.1.0.2/24 dev eth1
            ip route add 10.9.0.0/16 nexthop via 10.0.0.1 dev eth0 nexthop via 10.1.0.1 dev eth1");
        scan().unwrap_err()
    });
    assert!(matches!(err, NetError::Route { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "route 10.9.0.0/16: multipath routes are not supported"
    );
}

#[test]
fn scan_refuses_an_onlink_route_and_names_it() {
    let peer_ns = other_netns();
    let err = in_new_netns(move || {
        veth_to(&peer_ns, "eth0", "02:42:ac:11:00:02", 1500, "peer0");
        sh("ip link set eth0 up && ip addr add 10.0.0.2/24 dev eth0
            ip route add 10.9.0.0/16 via 192.168.1.1 dev eth0 onlink");
        scan().unwrap_err()
    });
    assert_eq!(
        err.to_string(),
        "route 10.9.0.0/16 via 192.168.1.1 dev eth0: onlink gateway routes are not supported"
    );
}
