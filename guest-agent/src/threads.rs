//! What a panic in one of the agent's own threads does.
//!
//! A panic ends only the thread it happens in; the hook in main.rs logs it. For a thread that
//! serves one connection that is the right end: its connection closes, and the host sees that
//! (server.rs and terminal.rs make sure it does). For a thread whose work no other thread does,
//! it is not: without the reaper no process exit is reported again (the host waits for ever for
//! an exit), without the stream acceptor no later process gets its stdio, without a
//! container's OOM watch its OOM kills go unreported. The agent would live on with its events
//! lost for good and nothing to show for it but a console line.
//!
//! So such a thread is started with [`vital`], and a panic in it ends the agent
//! ([`end_agent`]). As the guest's init, the agent syncs and reboots, which ends the VM (QEMU
//! runs with `-no-reboot`, the built-in VMM ends at the guest's reset); the host's sandbox sees
//! the VM stop and ends the container with status 137, as when the guest dies in any other way.
//! Outside a guest (`--unix`, the tests), it aborts.

use crate::alog;
use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Starts thread `name` running `body`; a panic in `body` ends the agent (see the module docs).
/// `lost` says what would be lost without the thread, for the log line.
pub fn vital(
    name: &str,
    lost: &'static str,
    body: impl FnOnce() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let thread = name.to_string();
    std::thread::Builder::new()
        .name(thread.clone())
        .spawn(move || {
            // AssertUnwindSafe: nothing the body held is used again; the agent ends.
            if let Err(payload) = catch_unwind(AssertUnwindSafe(body)) {
                end_agent(&format!(
                    "thread {thread} panicked ({}); without it {lost}",
                    panic_message(payload.as_ref())
                ));
            }
        })
}

/// Ends the agent for `why` (logged): as the guest's init by ending the VM, else by aborting.
pub fn end_agent(why: &str) -> ! {
    alog!("fatal: {why}; ending the agent");
    if std::process::id() == 1 {
        crate::pid1::end_vm();
    }
    // Not init, or the reboot failed: as init, the abort makes the kernel panic, and the
    // guest's panic=-1 reboots it all the same.
    std::process::abort()
}

/// The message of a panic's payload (`panic!` gives a `&str` or a `String`).
// Also in shim/src/guard.rs and vmm/src/exit.rs (panic_text): six lines of std downcasts, not
// shared, as their only common crate is rootcell-protocol (the wire protocol; the shim lacks it).
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string())
}
