//! Docker networking reaches the guest: the container's veth is mirrored into the VM, so the
//! default bridge, published ports and user-defined networks work as with runc (real dockerd,
//! real guests).
//!
//! `docker26.rs` includes this file as a module with its own `daemon()` (Debian 13's Docker 26);
//! the tests reach theirs as `crate::daemon()`.

use rootcell_e2e::docker::{inspect, ok, run_detached, run_rm, wait_until, DockerDaemon, IMAGE};
use rootcell_e2e::*;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The daemon the tests drive when this file is its own test binary: the host's Docker.
#[allow(dead_code)] // unused where docker26.rs includes this file with a daemon of its own
fn daemon() -> &'static DockerDaemon {
    rootcell_e2e::docker::daemon()
}

/// A busybox httpd answering `GET /` with `body` on port 8080.
fn httpd_script(body: &str) -> String {
    format!("mkdir -p /tmp/www && echo {body} > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www")
}

/// `GET /` over plain TCP from the host; the response body, or the error.
fn http_get(addr: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET / HTTP/1.0\r\nHost: x\r\n\r\n").map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("read {addr}: {e}"))?;
    Ok(out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string())
}

/// Polls `GET /` until the server answers (it is still booting), then returns the body.
fn http_get_when_up(addr: SocketAddr) -> String {
    let mut last = String::new();
    for _ in 0..300 {
        match http_get(addr) {
            Ok(body) if !body.is_empty() => return body,
            Ok(_) => last = "empty body".into(),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("no answer from {addr} within 60 s: {last}");
}

/// The container's address on the default bridge.
fn ip_of(d: &DockerDaemon, id: &str) -> Ipv4Addr {
    inspect(
        d,
        id,
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
    )
    .parse()
    .unwrap_or_else(|e| panic!("no IPv4 address for {id}: {e}"))
}

/// A host TCP port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A busybox httpd on the host, bound to `addr`, stopped on drop.
struct HostServer(Child, #[allow(dead_code)] tempfile::TempDir);

impl HostServer {
    fn start(addr: SocketAddr, body: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("index.html"), format!("{body}\n")).unwrap();
        let child = Command::new("busybox")
            .args(["httpd", "-f", "-p", &addr.to_string(), "-h"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("busybox httpd on the host");
        HostServer(child, dir)
    }
}

impl Drop for HostServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The host's address on Docker's default bridge: IPAM's gateway, or, where dockerd found the
/// bridge already there and records no gateway (seen when another daemon made docker0 first),
/// the bridge interface's own IPv4 address.
fn bridge_gateway(d: &DockerDaemon) -> Ipv4Addr {
    let ipam = ok(
        d,
        &[
            "network",
            "inspect",
            "bridge",
            "-f",
            "{{range .IPAM.Config}}{{.Gateway}}{{end}}",
        ],
    );
    if let Ok(ip) = ipam.trim().parse() {
        return ip;
    }
    let name = ok(
        d,
        &[
            "network",
            "inspect",
            "bridge",
            "-f",
            "{{index .Options \"com.docker.network.bridge.name\"}}",
        ],
    );
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "dev", name.trim()])
        .output()
        .expect("ip addr");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next()?.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no gateway for the default bridge: IPAM says {ipam:?}, {} has {text:?}",
                name.trim()
            )
        })
}

#[test]
fn default_bridge_gives_the_docker_address_and_reaches_host_and_peers() {
    let d = crate::daemon();
    let gateway = bridge_gateway(d);
    let host_port = free_port();
    let _host = HostServer::start(SocketAddr::from((gateway, host_port)), "hello-from-host");
    let runc = ok(
        d,
        &[
            "run",
            "-d",
            "--runtime",
            "runc",
            IMAGE,
            "sh",
            "-c",
            &httpd_script("hello-from-runc"),
        ],
    )
    .trim()
    .to_string();
    let peer = run_detached(d, &[], &httpd_script("hello-from-rootcell"));
    let (runc_ip, peer_ip) = (ip_of(d, &runc), ip_of(d, &peer));
    // The host reaches the rootcell server at the address Docker gave it.
    assert_eq!(
        http_get_when_up(SocketAddr::from((peer_ip, 8080))).trim(),
        "hello-from-rootcell"
    );

    let script = format!(
        "ip -o -4 addr show eth0; cat /sys/class/net/eth0/address; \
         wget -qO- http://{gateway}:{host_port}/; wget -qO- http://{runc_ip}:8080/; wget -qO- http://{peer_ip}:8080/"
    );
    let client = run_detached(d, &[], &format!("{script}; sleep 30"));
    let want_ip = ip_of(d, &client);
    let want_mac = inspect(
        d,
        &client,
        "{{range .NetworkSettings.Networks}}{{.MacAddress}}{{end}}",
    );
    let mut out = String::new();
    wait_until("the client's output", Duration::from_secs(120), || {
        out = rootcell_e2e::docker::logs(d, &client);
        out.contains("hello-from-rootcell") || out.contains("wget:")
    });
    assert!(
        out.contains(&format!("inet {want_ip}/")),
        "guest eth0 lacks {want_ip}:\n{out}"
    );
    assert!(
        out.contains(&want_mac),
        "guest eth0 lacks MAC {want_mac}:\n{out}"
    );
    for body in ["hello-from-host", "hello-from-runc", "hello-from-rootcell"] {
        assert!(out.contains(body), "{body} missing:\n{out}");
    }
    ok(d, &["rm", "-f", &runc, &peer, &client]);
}

#[test]
fn published_port_reaches_a_server_in_the_guest() {
    let d = crate::daemon();
    let port = free_port();
    let id = run_detached(
        d,
        &["-p", &format!("{port}:8080")],
        &httpd_script("hello-through-p"),
    );
    assert_eq!(
        http_get_when_up(SocketAddr::from(([127, 0, 0, 1], port))).trim(),
        "hello-through-p"
    );
    ok(d, &["rm", "-f", &id]);
}

#[test]
fn user_defined_network_resolves_rootcell_peers_by_name() {
    let d = crate::daemon();
    let net = unique_id("rcnet");
    ok(d, &["network", "create", &net]);
    let server = unique_id("rc-srv");
    let srv = run_detached(
        d,
        &["--network", &net, "--name", &server],
        &httpd_script("hello-by-name"),
    );
    // By name over UDP (wget), then the same question over DNS-over-TCP, which resolvers use for
    // answers too long for UDP: a hand-made query through nc, the answer's bytes printed by od.
    let tcp_query: String = dns_tcp_query(&server)
        .iter()
        .map(|b| format!("\\{b:03o}"))
        .collect();
    let script = format!(
        "for i in $(seq 60); do wget -qO- http://{server}:8080/ && break; sleep 1; done; echo; \
         printf '{tcp_query}' | nc -w 5 127.0.0.11 53 | od -An -tu1 -v"
    );
    let o = run_rm(d, &["--network", &net], &["sh", "-c", &script]);
    let server_ip = inspect(
        d,
        &srv,
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
    );
    let _ = d.docker(&["rm", "-f", &srv]);
    let _ = d.docker(&["network", "rm", &net]);
    let out = text(&o.stdout);
    let report = format!("stdout:\n{out}\nstderr:\n{}", text(&o.stderr));
    assert_eq!(code(&o), 0, "{report}");
    assert_eq!(out.lines().next(), Some("hello-by-name"), "{report}");
    let answer: Vec<u8> = out
        .lines()
        .skip(1)
        .flat_map(|l| l.split_whitespace())
        .map(|n| n.parse().unwrap())
        .collect();
    let ip: Vec<u8> = server_ip.split('.').map(|n| n.parse().unwrap()).collect();
    assert_eq!(ip.len(), 4, "{server_ip}");
    assert!(
        answer.len() > 2 && answer[2..4] == [0x12, 0x34],
        "no TCP DNS answer: {report}"
    );
    assert!(
        answer.windows(4).any(|w| w == ip),
        "the TCP answer lacks {server_ip}: {report}"
    );
}

/// A DNS-over-TCP query (u16 length first) for the A record of `name`, id 0x1234.
fn dns_tcp_query(name: &str) -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend(q);
    framed
}

#[test]
fn root_changes_the_guest_network_not_the_host() {
    let d = crate::daemon();
    let id = run_detached(
        d,
        &["--cap-add", "NET_ADMIN"],
        "ip link add rcdummy0 type dummy && ip addr add 10.213.0.1/24 dev rcdummy0 && ip link set rcdummy0 up \
         && ip route add 10.214.0.0/16 via 10.213.0.2 && echo configured && sleep 60",
    );
    let mut out = String::new();
    wait_until(
        "the guest to configure its network",
        Duration::from_secs(120),
        || {
            out = rootcell_e2e::docker::logs(d, &id);
            !out.is_empty()
        },
    );
    assert_eq!(out.trim(), "configured", "{out}");
    let inside = ok(d, &["exec", &id, "sh", "-c", "ip -o link; ip route"]);
    assert!(
        inside.contains("rcdummy0") && inside.contains("10.214.0.0/16 via 10.213.0.2"),
        "{inside}"
    );
    // Neither the host nor the container's network namespace on the host (where the VM's tap
    // lives) sees any of it.
    let sandbox_pid = inspect(d, &id, "{{.State.Pid}}");
    for (where_, prefix) in [
        ("host", vec![]),
        (
            "container netns on the host",
            vec![
                "nsenter".to_string(),
                format!("--net=/proc/{sandbox_pid}/ns/net"),
            ],
        ),
    ] {
        let mut args = prefix.clone();
        args.extend(["ip", "-o", "link"].map(String::from));
        let links = text(
            &Command::new(&args[0])
                .args(&args[1..])
                .output()
                .unwrap()
                .stdout,
        );
        args.truncate(prefix.len());
        args.extend(["ip", "route"].map(String::from));
        let routes = text(
            &Command::new(&args[0])
                .args(&args[1..])
                .output()
                .unwrap()
                .stdout,
        );
        assert!(
            !links.contains("rcdummy0"),
            "{where_} has the guest's interface:\n{links}"
        );
        assert!(
            !routes.contains("10.214.0.0"),
            "{where_} has the guest's route:\n{routes}"
        );
    }
    ok(d, &["rm", "-f", &id]);
}

#[test]
fn network_none_is_loopback_only_and_the_hosts_stack_is_refused() {
    let d = crate::daemon();
    let o = run_rm(
        d,
        &["--network", "none"],
        &["sh", "-c", "ls /sys/class/net"],
    );
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    assert_eq!(
        text(&o.stdout).split_whitespace().collect::<Vec<_>>(),
        ["lo"]
    );

    let o = run_rm(d, &["--network", "host"], &["true"]);
    assert_ne!(code(&o), 0);
    assert!(
        text(&o.stderr).contains("host's network"),
        "{}",
        text(&o.stderr)
    );
    // `--network container:` of a rootcell container runs in its VM (tests/e2e/shared_vm.rs).
}

/// Without Docker: a namespace prepared the way CNI plugins do (a veth whose peer sits in a
/// second namespace with a server), given to `rootcell run` by path. The guest gets the
/// address, MTU and routes, reaches the peer, and nothing (tap, qdisc) remains afterwards.
#[test]
fn a_prepared_network_namespace_is_mirrored_into_the_guest() {
    let rt = Runtime::new();
    let container = NetNs::new("rc-ctr");
    let mut peer = NetNs::new("rc-peer");
    container.sh(&format!(
        "ip link add eth0 mtu 1400 type veth peer name rcpeer0 netns {peer} \
         && ip addr add 10.216.0.2/24 dev eth0 && ip link set eth0 up \
         && ip route add 10.217.0.0/16 via 10.216.0.1",
        peer = peer.name()
    ));
    peer.sh("ip addr add 10.216.0.1/24 dev rcpeer0 && ip link set rcpeer0 up && ip link set lo up");
    let www = tempfile::tempdir().unwrap();
    std::fs::write(www.path().join("index.html"), "hello-from-peer\n").unwrap();
    peer.spawn(&[
        "busybox",
        "httpd",
        "-f",
        "-p",
        "10.216.0.1:8080",
        "-h",
        www.path().to_str().unwrap(),
    ]);
    let before = container.sh("ip -o link; tc qdisc show");
    let mac = container
        .sh("cat /sys/class/net/eth0/address")
        .trim()
        .to_string();

    let b = Bundle::new(&[
        "sh",
        "-c",
        "cat /sys/class/net/eth0/address /sys/class/net/eth0/mtu; ip -o -4 addr show eth0; ip route; \
         for i in 1 2 3 4 5; do wget -qO- http://10.216.0.1:8080/ && exit 0; sleep 1; done; exit 1",
    ])
    .edit(|s| {
        let ns = s["linux"]["namespaces"].as_array_mut().unwrap();
        ns.retain(|n| n["type"] != "network");
        ns.push(serde_json::json!({"type": "network", "path": container.path()}));
    });
    let id = unique_id("net");
    let o = rt.run(&["run", "--bundle", b.path().to_str().unwrap(), &id]);
    let out = text(&o.stdout);
    assert_eq!(code(&o), 0, "stdout:\n{out}\nstderr:\n{}", text(&o.stderr));
    assert!(out.starts_with(&format!("{mac}\n1400\n")), "{out}");
    assert!(out.contains("inet 10.216.0.2/24"), "{out}");
    assert!(
        out.contains("10.217.0.0/16 via 10.216.0.1 dev eth0"),
        "{out}"
    );
    assert!(out.trim_end().ends_with("hello-from-peer"), "{out}");
    rt.run(&["delete", &id]);
    assert_eq!(
        container.sh("ip -o link; tc qdisc show"),
        before,
        "tap or tc filter left behind"
    );
    assert_no_leftovers(&rt, &id);
}
