//! Named network namespaces (`ip netns`) for tests that hand rootcell a prepared network, the
//! way CNI plugins do; deleted on drop.

use crate::{text, unique_id};
use std::process::{Child, Command, Stdio};

/// A network namespace at /run/netns/NAME.
pub struct NetNs {
    name: String,
    children: Vec<Child>,
}

impl NetNs {
    /// Creates a namespace named `prefix-<unique>` (loopback only, down).
    pub fn new(prefix: &str) -> Self {
        // `ip netns` names must stay short; unique_id adds the pid and a counter.
        let name = unique_id(prefix);
        let o = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("ip netns add");
        assert!(
            o.status.success(),
            "ip netns add {name}: {}",
            text(&o.stderr)
        );
        NetNs {
            name,
            children: Vec::new(),
        }
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its bind-mounted path, for config.json.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs `script` with sh inside the namespace, asserting success; returns stdout.
    pub fn sh(&self, script: &str) -> String {
        let o = Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", script])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "in {}: {script}: {}",
            self.name,
            text(&o.stderr)
        );
        text(&o.stdout)
    }

    /// Starts `args` inside the namespace in the background; it is killed on drop.
    pub fn spawn(&mut self, args: &[&str]) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .expect("ip netns exec");
        self.children.push(child);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
