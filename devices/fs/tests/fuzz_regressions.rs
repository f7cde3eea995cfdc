//! The FUSE request fuzz target's inputs replayed as plain tests: the seed corpus and every
//! input a fuzzing run found (`fuzz/regressions/fs_request/`, one file each), through the same
//! code (`test_driver::fuzz_input::run`): a fresh device on a share in a private tmpfs, the
//! chain handed back well formed, the canary outside the share untouched, no fd left open.
//!
//! Needs root (a mount namespace for the arena's thread), as `rootcell-test-support` says.

use std::path::Path;
use std::sync::Mutex;

use rootcell_fs::test_driver::arena::Arena;
use rootcell_fs::test_driver::fuzz_input;

/// Runs `f` on a thread of its own with a fresh arena (the thread's mount namespace, and the
/// arena's tmpfs with it, ends with the thread).
/// One arena at a time: the oracle counts the process's fds, which a test running beside it
/// would change.
fn in_arena(f: impl FnOnce(&mut Arena) + Send + 'static) {
    static ONE: Mutex<()> = Mutex::new(());
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    std::thread::spawn(move || {
        let mut arena = Arena::new().expect("arena");
        f(&mut arena);
        arena.check_content().expect("canary intact");
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e));
}

#[test]
fn seed_corpus_runs_clean() {
    if !rootcell_test_support::require_root("seed_corpus_runs_clean") {
        return;
    }
    in_arena(|arena| {
        for (name, input) in fuzz_input::seeds() {
            eprintln!("seed {name}");
            fuzz_input::run(arena, &input);
        }
    });
}

#[test]
fn saved_fuzz_findings_run_clean() {
    if !rootcell_test_support::require_root("saved_fuzz_findings_run_clean") {
        return;
    }
    in_arena(move |arena| {
        // Listed under in_arena's lock: the directory's fd, open while another test's oracle
        // counts fds, made that count wrong by one (seen once in a full run).
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions/fs_request");
        let mut inputs: Vec<_> = std::fs::read_dir(&dir)
            .expect("fuzz/regressions/fs_request")
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        inputs.sort();
        for path in inputs {
            eprintln!("replaying {}", path.display());
            fuzz_input::run(arena, &std::fs::read(&path).unwrap());
        }
    });
}

/// Writes the seed corpus to `$ROOTCELL_FUZZ_SEEDS` (how `fuzz/seeds/fs_request` was made);
/// does nothing without it.
#[test]
fn write_seed_corpus() {
    let Some(dir) = std::env::var_os("ROOTCELL_FUZZ_SEEDS") else {
        return;
    };
    std::fs::create_dir_all(&dir).unwrap();
    for (name, input) in fuzz_input::seeds() {
        std::fs::write(Path::new(&dir).join(name), input).unwrap();
    }
}
