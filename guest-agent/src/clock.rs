//! The guest's wall clock. A microVM has no battery-backed clock the guest kernel reads at boot
//! (it would start at 1970), and an emulated CPU's clock can fall behind, so the host sets it:
//! after the handshake, before each start and exec, after a resume and periodically.

use crate::alog;
use rootcell_protocol::{ErrorCode, Response};

/// Smaller differences are left alone: stepping the clock for them would only add jitter.
const TOLERANCE_NANOS: u128 = 1_000_000;
/// Steps larger than this are logged (the first one at boot always is).
const LOGGED_STEP_NANOS: u128 = 1_000_000_000;

/// The current `CLOCK_REALTIME` in nanoseconds since the epoch (0 before the epoch).
pub fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Sets `CLOCK_REALTIME` to `unix_nanos` unless it is already that within the tolerance.
pub fn set(unix_nanos: u64) -> Response {
    let target = u128::from(unix_nanos);
    let now = now_nanos();
    let step = target.abs_diff(now);
    if step < TOLERANCE_NANOS {
        return Response::Ok;
    }
    let ts = libc::timespec {
        tv_sec: (unix_nanos / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_nanos % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: clock_settime reads a valid timespec; it has no other effect on memory.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Response::Error {
            code: ErrorCode::Other,
            message: format!(
                "cannot set the guest clock: {}",
                std::io::Error::last_os_error()
            ),
        };
    }
    if step >= LOGGED_STEP_NANOS {
        let dir = if target > now { "forward" } else { "back" };
        alog!(
            "clock: stepped {dir} by {:.3} s to the host's time",
            step as f64 / 1e9
        );
    }
    Response::Ok
}
