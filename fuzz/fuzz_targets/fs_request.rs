//! Fuzzes the virtio-fs device's FUSE request path: each input is a sequence of request
//! chains (bytes and chain shape chosen by the fuzzer, see
//! `rootcell_fs::test_driver::fuzz_input`) served by a fresh `FsDevice` over a real share in a
//! private nodev tmpfs, through `FsDevice::process_queue` as the transports call it. Oracle:
//! no panic, every chain handed back with a well-formed reply or nothing, the canary file
//! outside the share never read or written, no fd left open once the device is dropped.
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use rootcell_fs::test_driver::arena::Arena;
use rootcell_fs::test_driver::fuzz_input;

thread_local! {
    // libFuzzer calls the target on one thread: the arena's mount namespace is that thread's.
    static ARENA: RefCell<Option<Arena>> = const { RefCell::new(None) };
}

/// At exit (libFuzzer ends a timed run with exit(3)), drops the arena on the exiting thread,
/// which is the fuzzing thread: unmounting it lets its directory be removed, so a run leaves
/// nothing in /tmp. A crash leaves an empty directory behind.
extern "C" fn drop_arena() {
    let _ = ARENA.try_with(|cell| cell.borrow_mut().take());
}

fuzz_target!(|data: &[u8]| {
    ARENA.with(|cell| {
        let mut cell = cell.borrow_mut();
        let arena = cell.get_or_insert_with(|| {
            // SAFETY: registers a plain extern "C" function; called once.
            unsafe { libc::atexit(drop_arena) };
            Arena::new().expect("arena (needs root)")
        });
        fuzz_input::run(arena, data);
    });
});
