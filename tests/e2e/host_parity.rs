//! Inside its guest a container behaves like one on the host machine, as INGInious' grading
//! containers expect: the caller's resource limits where config.json sets none, the host's wall
//! clock (after create, in an exec, after a long pause), and, with the opt-in
//! `--guest-privileged` policy, what root is for (mount, network, sysctl, hostname).

use rootcell_e2e::*;
use serde_json::json;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Gives the command's process these (soft, hard) limits before it runs.
fn with_limits(c: &mut Command, limits: &'static [(libc::__rlimit_resource_t, u64, u64)]) {
    // SAFETY: only async-signal-safe setrlimit calls between fork and exec.
    unsafe {
        c.pre_exec(move || {
            for &(res, soft, hard) in limits {
                let rl = libc::rlimit {
                    rlim_cur: soft,
                    rlim_max: hard,
                };
                if libc::setrlimit(res, &rl) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

fn run_limited(
    rt: &Runtime,
    args: &[&str],
    limits: &'static [(libc::__rlimit_resource_t, u64, u64)],
) -> Output {
    let mut c = rt.command(args);
    c.stdin(Stdio::null());
    with_limits(&mut c, limits);
    output_with_timeout(c, None, COMMAND_TIMEOUT)
}

const CALLER_LIMITS: &[(libc::__rlimit_resource_t, u64, u64)] = &[
    (libc::RLIMIT_NPROC, 3000, 4000),
    (libc::RLIMIT_NOFILE, 2345, 3456),
];

#[test]
fn unset_rlimits_are_the_callers_and_set_ones_win() {
    let rt = Runtime::new();
    // INGInious' step: raise RLIMIT_NPROC to 1000 in a container limited to 100 MiB, where the
    // guest kernel's own default is about 560.
    let script = "ulimit -u; ulimit -n; ulimit -Hn; ulimit -u 1000 && echo raised";
    let b = Bundle::new(&["sh", "-c", script]).edit(|s| {
        s["process"].as_object_mut().unwrap().remove("rlimits");
        s["linux"]["resources"] = json!({"memory": {"limit": 100 * 1024 * 1024}});
    });
    let id = unique_id("rlim");
    let o = run_limited(
        &rt,
        &["run", "--bundle", b.path().to_str().unwrap(), &id],
        CALLER_LIMITS,
    );
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "3000\n2345\n3456\nraised\n");
    assert_no_leftovers(&rt, &id);

    // A limit config.json sets is the one the container gets.
    let b = Bundle::new(&["sh", "-c", "ulimit -n; ulimit -Hn; ulimit -u"]);
    let id = unique_id("rlim");
    let o = run_limited(
        &rt,
        &["run", "--bundle", b.path().to_str().unwrap(), &id],
        CALLER_LIMITS,
    );
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "1024\n1024\n3000\n");
    assert_no_leftovers(&rt, &id);
}

#[test]
fn exec_gets_the_limits_of_its_caller() {
    let rt = Runtime::new();
    // An exec without --process runs with the container's process settings, rlimits included
    // (as runc's): none here, so the exec caller's apply.
    let b = Bundle::new(&["sleep", "600"]).edit(|s| {
        s["process"].as_object_mut().unwrap().remove("rlimits");
    });
    let id = unique_id("rlimx");
    let (o, _, _) = rt.create(&b, &id);
    assert_eq!(code(&o), 0, "create: {}", text(&o.stderr));
    assert!(rt.run(&["start", &id]).status.success());
    const EXEC_LIMITS: &[(libc::__rlimit_resource_t, u64, u64)] = &[
        (libc::RLIMIT_NPROC, 3100, 4100),
        (libc::RLIMIT_NOFILE, 777, 888),
    ];
    let o = run_limited(
        &rt,
        &["exec", &id, "sh", "-c", "ulimit -u; ulimit -n; ulimit -Hn"],
        EXEC_LIMITS,
    );
    let out = text(&o.stdout);
    rt.run(&["delete", "--force", &id]);
    assert_eq!(code(&o), 0, "exec stderr: {}", text(&o.stderr));
    assert_eq!(out, "3100\n777\n888\n");
    assert_no_leftovers(&rt, &id);
}

/// The host's time now, in seconds.
fn host_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Asserts that `guest` (output of `date +%s`) lies within 1 s of the host's time between
/// `before` and `after` (`date +%s` truncates, hence the floor).
fn assert_clock(what: &str, guest: &str, before: f64, after: f64) {
    let g: f64 = guest
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{what}: `date +%s` printed {guest:?}"));
    assert!(
        g >= before.floor() - 1.0 && g <= after + 1.0,
        "{what}: guest clock {g} is not within 1 s of the host's ({before:.1}..{after:.1})"
    );
}

fn exec_date(rt: &Runtime, id: &str) -> (String, f64, f64) {
    let before = host_now();
    let o = rt.run(&["exec", id, "date", "+%s"]);
    let after = host_now();
    assert_eq!(code(&o), 0, "exec date: {}", text(&o.stderr));
    (text(&o.stdout), before, after)
}

#[test]
fn guest_clock_follows_the_host_after_create_in_exec_and_after_a_long_pause() {
    let rt = Runtime::new();
    let b = Bundle::new(&["sh", "-c", "date +%s; exec sleep 600"]);
    let id = unique_id("clock");
    let before = host_now();
    let (o, out, _) = rt.create(&b, &id);
    assert_eq!(code(&o), 0, "create: {}", text(&o.stderr));
    assert!(rt.run(&["start", &id]).status.success());
    let mut first = String::new();
    for _ in 0..300 {
        first = std::fs::read_to_string(&out).unwrap_or_default();
        if first.ends_with('\n') {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_clock("container start", &first, before, host_now());

    let (g, b0, a0) = exec_date(&rt, &id);
    assert_clock("exec", &g, b0, a0);

    let pause = std::env::var("ROOTCELL_TEST_PAUSE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    assert!(rt.run(&["pause", &id]).status.success());
    std::thread::sleep(Duration::from_secs(pause));
    assert!(rt.run(&["resume", &id]).status.success());
    let (g, b1, a1) = exec_date(&rt, &id);
    rt.run(&["delete", "--force", &id]);
    assert_clock(&format!("exec after a {pause} s pause"), &g, b1, a1);
    assert_no_leftovers(&rt, &id);
}

#[test]
fn file_times_on_a_bind_mount_are_the_hosts() {
    let rt = Runtime::new();
    let shared = tempfile::tempdir().unwrap();
    let b = Bundle::new(&[
        "sh",
        "-c",
        "touch /data/now && touch -d @1234567890 /data/fixed",
    ])
    .edit(|s| {
        s["mounts"].as_array_mut().unwrap().push(json!({
            "destination": "/data", "type": "bind",
            "source": shared.path(), "options": ["rbind", "rw"]
        }));
    });
    let id = unique_id("mtime");
    let before = host_now();
    let o = rt.run(&["run", "--bundle", b.path().to_str().unwrap(), &id]);
    let after = host_now();
    assert_eq!(code(&o), 0, "stderr: {}", text(&o.stderr));
    let mtime = |name: &str| {
        std::fs::metadata(shared.path().join(name))
            .unwrap_or_else(|e| panic!("{name} on the host: {e}"))
            .modified()
            .unwrap()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    assert_eq!(mtime("fixed"), 1234567890.0);
    let now = mtime("now");
    assert!(
        now >= before - 1.0 && now <= after + 1.0,
        "a file touched in the container has mtime {now}, host time was {before:.1}..{after:.1}"
    );
    assert_no_leftovers(&rt, &id);
}

/// What a need_root grader does; each line printed only if the step worked.
const ROOT_SCRIPT: &str = "mount -t tmpfs t /mnt && echo mount-ok; \
    ip link add rcd0 type dummy && ip addr add 10.77.0.1/24 dev rcd0 && echo ip-ok; \
    echo 1 > /proc/sys/net/ipv4/ip_forward && echo sysctl-ok; \
    hostname graded && echo hostname-ok; \
    grep CapEff /proc/self/status";
const ROOT_STEPS: [&str; 4] = ["mount-ok", "ip-ok", "sysctl-ok", "hostname-ok"];

fn run_root_script(rt: &Runtime, global: &[&str]) -> (i32, String) {
    // Docker's default spec: default capabilities, masked and read-only paths, /sys read-only.
    let b = Bundle::new(&["sh", "-c", ROOT_SCRIPT]);
    let id = unique_id("priv");
    let mut args: Vec<&str> = global.to_vec();
    args.extend(["run", "--bundle", b.path().to_str().unwrap(), &id]);
    let o = rt.run(&args);
    assert_no_leftovers(rt, &id);
    (code(&o), text(&o.stdout) + &text(&o.stderr))
}

#[test]
fn guest_privileged_gives_root_its_powers_inside_the_guest_only_when_asked() {
    let rt = Runtime::new();
    let (st, out) = run_root_script(&rt, &["--guest-privileged"]);
    assert_eq!(st, 0, "{out}");
    for step in ROOT_STEPS {
        assert!(
            out.contains(step),
            "{step} missing with --guest-privileged: {out}"
        );
    }
    let capeff = out
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(str::trim)
        .unwrap_or_default();
    let bits = u64::from_str_radix(capeff, 16).unwrap_or(0);
    assert!(
        bits.count_ones() >= 40,
        "CapEff {capeff} is not every capability: {out}"
    );

    // Without the policy the spec's capabilities hold, as under runc.
    let (_, out) = run_root_script(&rt, &[]);
    for step in ROOT_STEPS {
        assert!(
            !out.contains(step),
            "{step} worked without --guest-privileged: {out}"
        );
    }

    // The same policy from the config file.
    let cfg = rt.dir.path().join("config.json");
    std::fs::write(&cfg, r#"{"guest_privileged": true}"#).unwrap();
    let rt_cfg = Runtime::new().env("ROOTCELL_CONFIG", cfg.to_str().unwrap());
    let (st, out) = run_root_script(&rt_cfg, &[]);
    assert_eq!(st, 0, "{out}");
    for step in ROOT_STEPS {
        assert!(
            out.contains(step),
            "{step} missing with guest_privileged in the config: {out}"
        );
    }
}

#[test]
fn guest_privileged_exec_has_every_capability() {
    // The policy from the config file this time.
    let cfg = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(cfg.path(), r#"{"guest_privileged": true}"#).unwrap();
    let rt = Runtime::new().env("ROOTCELL_CONFIG", cfg.path().to_str().unwrap());
    let b = Bundle::new(&["sleep", "600"]);
    let id = unique_id("privx");
    let (o, _, _) = rt.create(&b, &id);
    assert_eq!(code(&o), 0, "create: {}", text(&o.stderr));
    assert!(rt.run(&["start", &id]).status.success());
    // Docker's exec process carries the default capabilities; the policy still gives it all.
    let o = rt.run(&[
        "exec",
        &id,
        "sh",
        "-c",
        "mount -t tmpfs t /mnt && echo mount-ok",
    ]);
    rt.run(&["delete", "--force", &id]);
    assert!(
        text(&o.stdout).contains("mount-ok"),
        "exec: {}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    assert_no_leftovers(&rt, &id);
}

#[test]
fn guest_privileged_refuses_a_user_namespace_and_a_bad_config_names_itself() {
    let rt = Runtime::new();
    let b = Bundle::new(&["true"]).edit(|s| {
        s["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "user"}));
    });
    let id = unique_id("privu");
    let o = rt.run(&[
        "--guest-privileged",
        "run",
        "--bundle",
        b.path().to_str().unwrap(),
        &id,
    ]);
    assert_ne!(code(&o), 0);
    let err = text(&o.stderr);
    assert!(
        err.contains("--guest-privileged") && err.contains("user namespace"),
        "{err}"
    );
    assert_no_leftovers(&rt, &id);

    let cfg = rt.dir.path().join("bad-config.json");
    std::fs::write(&cfg, r#"{"guest_privilege": true}"#).unwrap();
    let rt_bad = Runtime::new().env("ROOTCELL_CONFIG", cfg.to_str().unwrap());
    let b = Bundle::new(&["true"]);
    let id = unique_id("privc");
    let o = rt_bad.run(&["run", "--bundle", b.path().to_str().unwrap(), &id]);
    assert_ne!(code(&o), 0);
    let err = text(&o.stderr);
    assert!(
        err.contains(cfg.to_str().unwrap()) && err.contains("guest_privilege"),
        "the error names the file and the unknown key: {err}"
    );
    assert_no_leftovers(&rt_bad, &id);
}
