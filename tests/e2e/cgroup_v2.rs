//! The runtime's cgroup v2 code, run for real inside a guest: these hosts are cgroup v1, the
//! guest kernel is cgroup v2 with the memory controller. `scripts/test.sh` links the runtime's
//! unit tests statically (`ROOTCELL_STATIC_UNIT_TESTS`) so they run in the busybox rootfs.

use rootcell_e2e::*;
use serde_json::json;

/// The statically linked unit-test binary of the runtime.
fn static_unit_tests() -> String {
    std::env::var("ROOTCELL_STATIC_UNIT_TESTS").unwrap_or_else(|_| {
        panic!("ROOTCELL_STATIC_UNIT_TESTS is not set: run the end-to-end tests through scripts/test.sh, which builds it")
    })
}

#[test]
fn oom_relay_works_on_cgroup_v2_in_a_guest() {
    artifacts();
    let test = "oom::tests::relays_a_real_oom_kill_on_cgroup_v2_and_the_vm_stand_in_survives";
    let args = [
        "/unit-tests",
        "--exact",
        test,
        "--nocapture",
        "--test-threads=1",
    ];
    // Root with every capability and the guest's cgroup2 mounted read-write, as the sandbox
    // process has on a cgroup v2 host.
    let b = Bundle::new(&args).edit(|s| {
        set_caps(s, ALL_CAPS);
        s["mounts"].as_array_mut().unwrap().push(json!({
            "destination": "/sys/fs/cgroup", "type": "cgroup2", "source": "cgroup2",
            "options": ["nosuid", "noexec", "nodev", "rw"],
        }));
    });
    std::fs::copy(static_unit_tests(), b.rootfs().join("unit-tests")).unwrap();
    let rt = Runtime::new();
    let id = unique_id("cg2");
    let o = rt.run(&["run", "--bundle", b.path().to_str().unwrap(), &id]);
    let out = format!("{}{}", text(&o.stdout), text(&o.stderr));
    assert_eq!(code(&o), 0, "{out}");
    // Not skipped: the guest has what the test needs.
    assert!(
        out.contains("1 passed") && !out.contains("skipped"),
        "{out}"
    );
    assert_no_leftovers(&rt, &id);
}
