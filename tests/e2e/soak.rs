//! Soak and fault test: many containers in a row and at once with their own exit codes, an exec
//! storm, and SIGKILL of the sandbox, the VMM and an exec relay at random points of create,
//! start and exec, each followed by `delete --force`. After each container: its status is the
//! one its process gave (or the kill's), and nothing of it is left on the host.
//!
//! Short by default (the README's test command). The long form is `bench/soak.sh`, or set
//! `ROOTCELL_SOAK_SEQUENTIAL`, `ROOTCELL_SOAK_CONCURRENT`, `ROOTCELL_SOAK_STORMS`,
//! `ROOTCELL_SOAK_FAULTS` (rounds of the three kills); `ROOTCELL_SOAK_SEED` repeats a run.

use rootcell_e2e::*;
use serde_json::json;
use std::io::BufRead;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A small xorshift generator: random kill points, repeatable from the printed seed.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        let seed = std::env::var("ROOTCELL_SOAK_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("soak: ROOTCELL_SOAK_SEED={seed}");
        Rng(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Host cgroup parent of the soak's containers (`linux.cgroupsPath` = PARENT/<id>).
const CGROUP_PARENT: &str = "rootcell-soak";

/// Every host cgroup directory of container `id`, in v1 and v2 layouts.
fn host_cgroup_dirs(id: &str) -> Vec<String> {
    let base = Path::new("/sys/fs/cgroup");
    let mut dirs = vec![base.join(CGROUP_PARENT).join(id)];
    for e in std::fs::read_dir(base).into_iter().flatten().flatten() {
        dirs.push(e.path().join(CGROUP_PARENT).join(id));
    }
    dirs.into_iter()
        .filter(|d| d.exists())
        .map(|d| d.display().to_string())
        .collect()
}

/// rootcell's taps (`rctapN`) in the host's network namespace. The sandbox makes them in the
/// container's namespace, where they vanish with it; one appearing here would be a leak.
fn host_links() -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("rctap"))
        .collect()
}

/// Asserts that nothing of `id` is left: processes, mounts, state dir (assert_no_leftovers),
/// and the run dir with its sockets, host cgroup directories and host network links.
fn assert_gone(rt: &Runtime, id: &str, links_before: &[String]) {
    assert_no_leftovers(rt, id);
    let run = run_dir(&rt.root(), id);
    // The VMM's command line names neither the id nor the root, but its run dir; it carries
    // the test's scope like every helper.
    let run_s = run.display().to_string();
    let vmm: Vec<_> = scope_processes(&rt.scope)
        .into_iter()
        .filter(|(_, cmd)| cmd.contains(&run_s))
        .collect();
    assert!(
        vmm.is_empty(),
        "VMM or helper processes left behind for {id}: {vmm:#?}"
    );
    assert!(
        !run.exists(),
        "run dir (sockets, share) left behind for {id}: {}",
        run.display()
    );
    let cg = host_cgroup_dirs(id);
    assert!(
        cg.is_empty(),
        "host cgroup directories left behind for {id}: {cg:#?}"
    );
    let new_links: Vec<String> = host_links()
        .into_iter()
        .filter(|l| !links_before.contains(l))
        .collect();
    assert!(
        new_links.is_empty(),
        "taps appeared on the host with {id}: {new_links:?}"
    );
}

fn bundle(args: &[&str], cgroup_id: Option<&str>) -> Bundle {
    Bundle::new(args).edit(|s| {
        if let Some(id) = cgroup_id {
            s["linux"]["cgroupsPath"] = json!(format!("/{CGROUP_PARENT}/{id}"));
        }
    })
}

/// `run` of a process that exits with `want`; returns the status `run` gave.
fn run_exit(rt: &Runtime, id: &str, want: i32, cgroup: bool) -> i32 {
    let b = bundle(&["sh", "-c", &format!("exit {want}")], cgroup.then_some(id));
    let o = rt.run(&["run", "--bundle", b.path().to_str().unwrap(), id]);
    code(&o)
}

/// Pid of the first process of `rt`'s scope whose command line contains `needle`.
fn find_process(rt: &Runtime, needle: &str) -> Option<i32> {
    scope_processes(&rt.scope)
        .into_iter()
        .find(|(_, cmd)| cmd.contains(needle))
        .map(|(pid, _)| pid)
}

#[derive(Default)]
struct Tally {
    containers: usize,
    execs: usize,
    kills: usize,
}

#[test]
fn soak_runs_execs_and_kills_leave_nothing_behind() {
    let sequential = setting("ROOTCELL_SOAK_SEQUENTIAL", 10);
    let concurrent = setting("ROOTCELL_SOAK_CONCURRENT", 4);
    let storms = setting("ROOTCELL_SOAK_STORMS", 2);
    let faults = setting("ROOTCELL_SOAK_FAULTS", 1);
    let started = Instant::now();
    let mut rng = Rng::new();
    let rt = Runtime::new();
    let links = host_links();
    let mut tally = Tally::default();

    // Sequential runs with mixed exit codes; every third one with a host cgroup.
    for i in 0..sequential {
        let id = unique_id("soak-seq");
        let want = (i * 37 % 256) as i32;
        let got = run_exit(&rt, &id, want, i % 3 == 0);
        assert_eq!(got, want, "sequential run {i} ({id})");
        assert_gone(&rt, &id, &links);
        tally.containers += 1;
    }
    eprintln!(
        "soak: {sequential} sequential runs in {:?}",
        started.elapsed()
    );

    // Concurrent runs, all at once; every other one with a host cgroup.
    let t = Instant::now();
    let results: Vec<(String, i32, i32)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..concurrent)
            .map(|i| {
                let rt = &rt;
                s.spawn(move || {
                    let id = unique_id("soak-par");
                    let want = (100 + i % 100) as i32;
                    let got = run_exit(rt, &id, want, i % 2 == 0);
                    (id, want, got)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (id, want, got) in results {
        assert_eq!(got, want, "concurrent run {id}");
        assert_gone(&rt, &id, &links);
        tally.containers += 1;
    }
    eprintln!("soak: {concurrent} concurrent runs in {:?}", t.elapsed());

    // Exec storm: 10 concurrent execs into one container, repeated.
    let t = Instant::now();
    let id = unique_id("soak-storm");
    let b = bundle(&["sleep", "100000"], Some(&id));
    let (o, _, _) = rt.create(&b, &id);
    assert_eq!(code(&o), 0, "create {id}: {}", text(&o.stderr));
    assert_eq!(code(&rt.run(&["start", &id])), 0);
    for round in 0..storms {
        let results: Vec<(i32, i32)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..10)
                .map(|i| {
                    let (rt, id) = (&rt, &id);
                    s.spawn(move || {
                        let want = ((round * 10 + i) % 200) as i32;
                        let o = rt.run(&["exec", id, "sh", "-c", &format!("exit {want}")]);
                        (want, code(&o))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (want, got) in results {
            assert_eq!(got, want, "storm round {round}: exec that gave {want}");
            tally.execs += 1;
        }
    }
    assert_eq!(rt.state(&id)["status"], "running");
    assert_eq!(code(&rt.run(&["delete", "--force", &id])), 0);
    assert_gone(&rt, &id, &links);
    tally.containers += 1;
    eprintln!("soak: {storms} exec storms of 10 in {:?}", t.elapsed());

    // Faults: SIGKILL of the sandbox, of the VMM and of an exec relay at random points.
    let t = Instant::now();
    for round in 0..faults {
        for (what, needle) in [("sandbox", " sandbox --id "), ("vmm", "qemu-system")] {
            for phase in ["create", "start", "exec"] {
                let id = unique_id("soak-kill");
                kill_during(&rt, &mut rng, &id, phase, what, needle);
                assert_eq!(
                    code(&rt.run(&["delete", "--force", &id])),
                    0,
                    "delete --force after killing the {what} during {phase}"
                );
                assert_gone(&rt, &id, &links);
                tally.containers += 1;
                tally.kills += 1;
            }
        }
        let id = unique_id("soak-relay");
        kill_relay(&rt, &mut rng, &id);
        assert_eq!(code(&rt.run(&["delete", "--force", &id])), 0);
        assert_gone(&rt, &id, &links);
        tally.containers += 1;
        tally.kills += 1;
        eprintln!("soak: fault round {round} done");
    }
    eprintln!("soak: {faults} fault rounds in {:?}", t.elapsed());
    // The parent the containers' cgroups shared is the test's own (rootcell removes leaves).
    for d in host_cgroup_dirs("") {
        let _ = std::fs::remove_dir(d);
    }
    eprintln!(
        "soak: {} containers, {} execs, {} kills, 0 failures, 0 leaks, {:?}",
        tally.containers,
        tally.execs,
        tally.kills,
        started.elapsed()
    );
}

/// Creates (and for `start`/`exec`, starts) container `id`, killing the process of `what`
/// (found by `needle` within the container's processes) at a random moment of `phase`. The
/// commands involved must end on their own, bounded, with a status that says what happened.
fn kill_during(rt: &Runtime, rng: &mut Rng, id: &str, phase: &str, what: &str, needle: &str) {
    let b = bundle(&["sleep", "100000"], Some(id));
    let run = run_dir(&rt.root(), id).display().to_string();
    // Only processes of this container: the sandbox names its id, QEMU its state dir
    // (`-name guest=<root>/<id>`), an unjailed QEMU also its run dir.
    let mine = |rt: &Runtime| {
        scope_processes(&rt.scope)
            .into_iter()
            .find(|(_, cmd)| cmd.contains(needle) && (cmd.contains(id) || cmd.contains(&run)))
            .map(|(pid, _)| pid)
    };
    let killer = |rt: &Runtime, delay_ms: u64| -> bool {
        let deadline = Instant::now() + Duration::from_millis(delay_ms);
        let mut victim = None;
        while Instant::now() < deadline || victim.is_none() {
            victim = mine(rt).or(victim);
            if Instant::now() > deadline + Duration::from_secs(20) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        match victim {
            // SAFETY: kill(2) of a process of this test's container.
            Some(pid) => unsafe { libc::kill(pid, libc::SIGKILL) == 0 },
            None => false,
        }
    };
    // Up to about one TCG boot: the kill lands anywhere from the sandbox's start to a running
    // container (a create that won the race is killed while it runs).
    let delay = rng.below(2500);
    match phase {
        "create" => {
            let (killed, o) = std::thread::scope(|s| {
                let k = s.spawn(|| killer(rt, delay));
                let o = rt.create(&b, id).0;
                (k.join().unwrap(), o)
            });
            let st = state_status(rt, id);
            eprintln!(
                "soak: {what} killed {delay} ms into create: {killed}; create exit {:?}; state {st}",
                o.status.code()
            );
        }
        "start" => {
            let (o, _, _) = rt.create(&b, id);
            assert_eq!(code(&o), 0, "create {id}: {}", text(&o.stderr));
            let (killed, o) = std::thread::scope(|s| {
                let k = s.spawn(|| killer(rt, delay / 10));
                let o = rt.run(&["start", id]);
                (k.join().unwrap(), o)
            });
            assert!(killed, "the {what} of {id} was running");
            rt.wait_status(id, "stopped", Duration::from_secs(60));
            eprintln!(
                "soak: {what} killed {} ms into start; start exit {:?}",
                delay / 10,
                o.status.code()
            );
        }
        _ => {
            let (o, _, _) = rt.create(&b, id);
            assert_eq!(code(&o), 0, "create {id}: {}", text(&o.stderr));
            assert_eq!(code(&rt.run(&["start", id])), 0);
            let (killed, o) = std::thread::scope(|s| {
                let k = s.spawn(|| killer(rt, delay / 3));
                let o = rt.run(&["exec", id, "sh", "-c", "sleep 2; exit 5"]);
                (k.join().unwrap(), o)
            });
            assert!(killed, "the {what} of {id} was running");
            let got = o.status.code();
            // The exec ends either way: with its own status if it finished first, else with
            // the status of a process that lost its VM.
            assert!(
                matches!(got, Some(5) | Some(137) | Some(1)),
                "exec while the {what} was killed: {got:?}, {}",
                text(&o.stderr)
            );
            rt.wait_status(id, "stopped", Duration::from_secs(60));
            eprintln!(
                "soak: {what} killed {} ms into exec; exec exit {got:?}",
                delay / 3
            );
        }
    }
    // A container that exists after the kill must notice it and stop, on its own.
    if state_status(rt, id) != "(none)" {
        rt.wait_status(id, "stopped", Duration::from_secs(60));
    }
}

fn state_status(rt: &Runtime, id: &str) -> String {
    let o = rt.run(&["state", id]);
    if !o.status.success() {
        return "(none)".into();
    }
    serde_json::from_slice::<serde_json::Value>(&o.stdout)
        .map(|v| v["status"].as_str().unwrap_or("?").to_string())
        .unwrap_or_default()
}

/// Kills an exec's relay while its process runs: `rootcell exec` ends with 137, the process in
/// the guest ends with it, the container lives on.
fn kill_relay(rt: &Runtime, rng: &mut Rng, id: &str) {
    let b = bundle(&["sleep", "100000"], Some(id));
    let (o, _, _) = rt.create(&b, id);
    assert_eq!(code(&o), 0, "create {id}: {}", text(&o.stderr));
    assert_eq!(code(&rt.run(&["start", id])), 0);
    let mut c = rt.command(&["exec", id, "sh", "-c", "echo armed; exec sleep 4242"]);
    c.stdin(Stdio::null()).stdout(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let pid = child.id() as i32;
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    match rx.recv_timeout(COMMAND_TIMEOUT) {
        Ok(l) => assert_eq!(l.trim_end(), "armed"),
        Err(_) => panic!("exec never started; killed {:#?}", kill_tree(pid)),
    }
    std::thread::sleep(Duration::from_millis(rng.below(1000)));
    let relay = find_process(rt, "exec-relay").expect("the exec relay runs");
    // SAFETY: kill(2) of this test's exec relay.
    assert_eq!(unsafe { libc::kill(relay, libc::SIGKILL) }, 0);
    let status = wait_with_timeout(child, COMMAND_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(137),
        "rootcell exec after its relay's SIGKILL"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = rt.run(&["exec", id, "ps", "-o", "args"]);
        assert_eq!(code(&o), 0, "ps: {}", text(&o.stderr));
        if !text(&o.stdout).contains("sleep 4242") {
            break;
        }
        assert!(Instant::now() < deadline, "the exec outlived its relay");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(rt.state(id)["status"], "running");
    eprintln!("soak: exec relay killed; its guest process is gone, the container runs on");
}
