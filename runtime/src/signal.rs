//! Parsing of signal names and numbers as `runc kill` accepts them.

use crate::error::RuntimeError;

/// Signal names without the `SIG` prefix, with their x86_64 Linux numbers.
const SIGNALS: &[(&str, i32)] = &[
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("ILL", 4),
    ("TRAP", 5),
    ("ABRT", 6),
    ("IOT", 6),
    ("BUS", 7),
    ("FPE", 8),
    ("KILL", 9),
    ("USR1", 10),
    ("SEGV", 11),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
    ("STKFLT", 16),
    ("CHLD", 17),
    ("CONT", 18),
    ("STOP", 19),
    ("TSTP", 20),
    ("TTIN", 21),
    ("TTOU", 22),
    ("URG", 23),
    ("XCPU", 24),
    ("XFSZ", 25),
    ("VTALRM", 26),
    ("PROF", 27),
    ("WINCH", 28),
    ("IO", 29),
    ("POLL", 29),
    ("PWR", 30),
    ("SYS", 31),
];

/// Parses `TERM`, `SIGTERM`, `term`, `15` (and real-time `RTMIN+n`) into a signal number.
pub fn parse(s: &str) -> Result<i32, RuntimeError> {
    let bad = || RuntimeError::InvalidSignal(s.to_string());
    if let Ok(n) = s.parse::<i32>() {
        return if (1..=64).contains(&n) {
            Ok(n)
        } else {
            Err(bad())
        };
    }
    let upper = s.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    if let Some(&(_, n)) = SIGNALS.iter().find(|(k, _)| *k == name) {
        return Ok(n);
    }
    let rt = |base: i32, rest: &str| -> Result<i32, RuntimeError> {
        let off: i32 = if rest.is_empty() {
            0
        } else {
            rest.parse().map_err(|_| bad())?
        };
        let n = base + off;
        if (34..=64).contains(&n) {
            Ok(n)
        } else {
            Err(bad())
        }
    };
    if let Some(rest) = name.strip_prefix("RTMIN") {
        return rt(34, rest.strip_prefix('+').unwrap_or(rest));
    }
    if let Some(rest) = name.strip_prefix("RTMAX") {
        return rt(64, rest);
    }
    Err(bad())
}

/// Signals that end a `create` or `run` whose container does not exist yet. While the guest
/// boots there is no process to forward them to (runc forwards signals only to a container
/// that runs), so they abort the boot instead: the sandbox and its VM are stopped and
/// everything the command made is removed, as a failed create does.
pub const ABORT: &[i32] = &[libc::SIGHUP, libc::SIGINT, libc::SIGQUIT, libc::SIGTERM];

/// A signal's name as `kill -l` prints it, with the `SIG` prefix (`SIGTERM`), or its number.
pub fn name(sig: i32) -> String {
    match SIGNALS.iter().find(|(_, n)| *n == sig) {
        Some((name, _)) => format!("SIG{name}"),
        None => format!("signal {sig}"),
    }
}

/// Signals the sandbox forwards to the container's init when it receives them itself.
pub const FORWARDED: &[i32] = &[
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGTERM,
    libc::SIGALRM,
    libc::SIGCONT,
    libc::SIGTSTP,
    libc::SIGTTIN,
    libc::SIGTTOU,
    libc::SIGVTALRM,
    libc::SIGPROF,
    libc::SIGPWR,
    libc::SIGSYS,
    libc::SIGURG,
    libc::SIGXCPU,
    libc::SIGXFSZ,
];

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn names_and_numbers() {
        assert_eq!(parse("TERM").unwrap(), 15);
        assert_eq!(parse("SIGTERM").unwrap(), 15);
        assert_eq!(parse("term").unwrap(), 15);
        assert_eq!(parse("15").unwrap(), 15);
        assert_eq!(parse("9").unwrap(), 9);
        assert_eq!(parse("KILL").unwrap(), 9);
        assert_eq!(parse("SIGKILL").unwrap(), 9);
        assert_eq!(parse("USR1").unwrap(), 10);
        assert_eq!(parse("RTMIN+2").unwrap(), 36);
    }

    #[test]
    fn names_for_messages() {
        assert_eq!(super::name(15), "SIGTERM");
        assert_eq!(super::name(6), "SIGABRT");
        assert_eq!(super::name(40), "signal 40");
    }

    #[test]
    fn rejects_garbage() {
        for s in ["", "0", "65", "-1", "FOO", "SIG", "RTMIN+40"] {
            assert!(parse(s).is_err(), "{s:?}");
        }
    }
}
