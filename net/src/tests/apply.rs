use super::*;
use crate::{apply, Interface, NetError, NetworkConfig, Route};

fn route(dest: Option<&str>, gw: Option<&str>, dev: &str, metric: Option<u32>) -> Route {
    Route {
        destination: dest.map(|d| d.parse().unwrap()),
        gateway: gw.map(|g| g.parse().unwrap()),
        device: dev.into(),
        source: None,
        metric,
    }
}

fn guest_config() -> NetworkConfig {
    NetworkConfig {
        interfaces: vec![
            Interface {
                card: None,
                name: "eth0".into(),
                mac: "02:42:ac:11:00:02".parse().unwrap(),
                mtu: 1400,
                addresses: vec![
                    "172.17.0.2/16".parse().unwrap(),
                    "fd00::2/64".parse().unwrap(),
                ],
            },
            Interface {
                card: None,
                name: "eth1".into(),
                mac: "02:42:ac:12:00:02".parse().unwrap(),
                mtu: 9000,
                addresses: vec!["10.5.0.2/24".parse().unwrap()],
            },
        ],
        // The gateway route comes first: apply must add the on-link one before it.
        routes: vec![
            route(None, Some("172.17.0.1"), "eth0", None),
            route(Some("10.6.0.0/16"), Some("10.7.0.1"), "eth1", Some(20)),
            route(Some("10.7.0.0/24"), None, "eth1", Some(5)),
            route(None, Some("fd00::1"), "eth0", Some(1024)),
        ],
    }
}

/// Two "virtio cards" named the wrong way round: apply must swap their names.
fn make_cards(peer_ns: &File) {
    veth_to(peer_ns, "eth1", "02:42:ac:11:00:02", 1500, "peer0");
    veth_to(peer_ns, "eth0", "02:42:ac:12:00:02", 1500, "peer1");
}

#[test]
fn apply_configures_the_cards_by_mac() {
    let peer_ns = other_netns();
    let (addrs, routes4, routes6) = in_new_netns(move || {
        make_cards(&peer_ns);
        apply(&guest_config()).unwrap();
        (
            json(&sh("ip -j addr show")),
            json(&sh("ip -j -4 route show")),
            json(&sh("ip -j -6 route show")),
        )
    });
    let links: Vec<_> = addrs
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["ifname"] != "lo")
        .collect();
    let summary: Vec<String> = links
        .iter()
        .map(|l| {
            let mut s = format!(
                "{} {} {}",
                l["ifname"].as_str().unwrap(),
                l["address"].as_str().unwrap(),
                l["mtu"]
            );
            for a in l["addr_info"].as_array().unwrap() {
                if a["scope"] != "link" {
                    s.push_str(&format!(
                        " {}/{}",
                        a["local"].as_str().unwrap(),
                        a["prefixlen"]
                    ));
                }
            }
            let up = l["flags"].as_array().unwrap().contains(&"UP".into());
            s + if up { " up" } else { " down" }
        })
        .collect();
    assert_eq!(
        summary,
        [
            // In index order: the card first named eth1 is now eth0.
            "eth0 02:42:ac:11:00:02 1400 172.17.0.2/16 fd00::2/64 up",
            "eth1 02:42:ac:12:00:02 9000 10.5.0.2/24 up",
        ]
    );
    let eth0 = links.iter().find(|l| l["ifname"] == "eth0").unwrap();
    assert_eq!(eth0["addr_info"][0]["broadcast"], "172.17.255.255");

    let text = |r: &serde_json::Value| {
        let mut s = r["dst"].as_str().unwrap().to_string();
        if let Some(gw) = r["gateway"].as_str() {
            s += &format!(" via {gw}");
        }
        s += &format!(" dev {}", r["dev"].as_str().unwrap());
        if let Some(m) = r["metric"].as_u64() {
            s += &format!(" metric {m}");
        }
        s
    };
    let mut got: Vec<String> = routes4.as_array().unwrap().iter().map(text).collect();
    got.extend(
        routes6
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["dst"] == "default")
            .map(text),
    );
    got.sort();
    assert_eq!(
        got,
        [
            "10.5.0.0/24 dev eth1",
            "10.6.0.0/16 via 10.7.0.1 dev eth1 metric 20",
            "10.7.0.0/24 dev eth1 metric 5",
            "172.17.0.0/16 dev eth0",
            "default via 172.17.0.1 dev eth0",
            "default via fd00::1 dev eth0 metric 1024",
        ]
    );
}

#[test]
fn an_unknown_mac_is_refused_with_the_macs_present() {
    let peer_ns = other_netns();
    let err = in_new_netns(move || {
        make_cards(&peer_ns);
        let mut config = guest_config();
        config.interfaces[1].mac = "02:00:00:00:00:99".parse().unwrap();
        let err = apply(&config).unwrap_err();
        // Nothing was changed before the error.
        assert!(!sh("ip -br link").contains("UP"));
        err
    });
    assert!(matches!(err, NetError::NoSuchMac { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "no interface with MAC 02:00:00:00:00:99 for eth1; present: \
         eth1=02:42:ac:11:00:02, eth0=02:42:ac:12:00:02"
    );
}

#[test]
fn a_route_through_an_unreachable_gateway_is_named() {
    let peer_ns = other_netns();
    let err = in_new_netns(move || {
        make_cards(&peer_ns);
        let mut config = guest_config();
        config.routes.push(route(
            Some("10.8.0.0/16"),
            Some("192.168.99.1"),
            "eth0",
            None,
        ));
        apply(&config).unwrap_err()
    });
    assert!(matches!(err, NetError::Route { .. }), "{err:?}");
    assert!(
        err.to_string().starts_with(
            "route 10.8.0.0/16 via 192.168.99.1 dev eth0: gateway 192.168.99.1 is not reachable on eth0"
        ),
        "{err}"
    );
}
