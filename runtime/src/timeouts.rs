//! Every bound on waiting in the runtime, and how they depend on each other.
//!
//! The rule: whoever waits on someone who is themselves waiting waits longer, so the inner
//! bound fires first and its error (which names what was stuck) is the one the user sees. The
//! relations are checked at compile time at the bottom of this file.
//!
//! ```text
//! create (CLI)  ── readiness ──> sandbox: boot ─> Hello ─> ConfigureNetwork ─> Create
//!   create_ready(boot)            boot_default / ROOTCELL_BOOT_TIMEOUT, HELLO, NETWORK, CREATE
//! start (CLI)   ── CLI_START ──> sandbox: SetClock ─> Start          (CLOCK + START)
//! exec relay    ── CLI_EXEC ───> sandbox: SetClock ─> Exec           (CLOCK + START)
//! kill (CLI)    ── CLI_SIGNAL ─> sandbox: Signal                     (QUICK)
//! update (CLI)  ── CLI_UPDATE ─> sandbox: UpdateLimits               (QUICK)
//! ```

use std::time::Duration;

/// The guest booting to its agent's answer, unless `ROOTCELL_BOOT_TIMEOUT` says otherwise.
pub const BOOT_DEFAULT: Duration = Duration::from_secs(60);
/// The agent's answer to `Hello` once connected.
pub const HELLO: Duration = Duration::from_secs(10);
/// The agent configuring the guest's network (links, addresses, routes).
pub const NETWORK: Duration = Duration::from_secs(30);
/// The agent creating the container: mounts over virtio-fs, namespaces, the init's setup.
pub const CREATE: Duration = Duration::from_secs(60);
/// The agent starting a process: the init (`Start`) or an exec'd one (`Exec`).
pub const START: Duration = Duration::from_secs(30);
/// The agent setting the guest's clock.
pub const CLOCK: Duration = Duration::from_secs(5);
/// Requests the agent answers at once: signal, resize, update, shutdown of a process.
pub const QUICK: Duration = Duration::from_secs(5);
/// The agent listing processes (walks the guest's /proc).
pub const PROCESSES: Duration = Duration::from_secs(10);
/// One request on the sandbox's control socket, read by the sandbox.
pub const CONTROL_READ: Duration = Duration::from_secs(10);

/// `start` waiting for the sandbox, which sets the clock and then starts the init.
pub const CLI_START: Duration = Duration::from_secs(CLOCK.as_secs() + START.as_secs() + 5);
/// The exec relay waiting for the sandbox's first answer (clock, then `Exec`).
pub const CLI_EXEC: Duration = CLI_START;
/// `kill` waiting for the sandbox to deliver a signal.
pub const CLI_SIGNAL: Duration = Duration::from_secs(QUICK.as_secs() + 3);
/// `update` waiting for the sandbox to apply limits in the guest.
pub const CLI_UPDATE: Duration = Duration::from_secs(QUICK.as_secs() + 5);
/// A resize or a signal forwarded by the exec relay, or a pause/resume (best effort).
pub const CLI_QUICK: Duration = QUICK;
/// `delete` waiting for a stopped container's sandbox to finish tearing its VM down (it waits
/// [`SHUTDOWN`] + [`VM_FINISH`] + [`IN_FLIGHT`] itself), or for a killed process to be gone.
pub const PROCESS_GONE: Duration = Duration::from_secs(10);
/// `delete` waiting for the VMM after the sandbox is gone.
pub const VMM_GONE: Duration = Duration::from_secs(5);
/// `delete` waiting for another `delete` of the same container (Docker's shim and containerd
/// may run two at once).
pub const DELETE_LOCK: Duration = Duration::from_secs(60);

/// `create` waiting for the sandbox's readiness report, given the boot bound it uses.
pub fn create_ready(boot: Duration) -> Duration {
    boot + HELLO + CLOCK + NETWORK + CREATE
}

/// After the container's exit: how long its output may still drain to the caller.
pub const OUTPUT_DRAIN: Duration = Duration::from_secs(3);
/// After the container's exit: the agent's answer to `Shutdown`.
pub const SHUTDOWN: Duration = Duration::from_secs(2);
/// After `Shutdown`: the VM stopping by itself before it is killed.
pub const VM_FINISH: Duration = Duration::from_secs(5);
/// After the VM is gone: control requests still being answered (so `start` gets its answer).
pub const IN_FLIGHT: Duration = Duration::from_secs(2);

/// An exec'd process's wait: how often it looks at its relay and the guest.
pub const EXEC_POLL: Duration = Duration::from_millis(500);
/// An exec'd process's wait: how often it asks the guest whether the process still exists.
pub const EXEC_LIVENESS_PERIOD: Duration = Duration::from_secs(10);

// The relations the module's docs promise.
const _: () = assert!(CLI_START.as_secs() > CLOCK.as_secs() + START.as_secs());
const _: () = assert!(CLI_SIGNAL.as_secs() > QUICK.as_secs());
const _: () = assert!(CLI_UPDATE.as_secs() > QUICK.as_secs());
const _: () = assert!(EXEC_LIVENESS_PERIOD.as_secs() >= PROCESSES.as_secs());
const _: () = assert!(
    PROCESS_GONE.as_secs() > SHUTDOWN.as_secs() + VM_FINISH.as_secs() + IN_FLIGHT.as_secs()
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_outwaits_every_step_of_the_sandbox() {
        let boot = Duration::from_secs(1);
        assert!(create_ready(boot) > boot + HELLO + NETWORK + CREATE);
        assert!(create_ready(BOOT_DEFAULT) >= Duration::from_secs(150));
    }
}
