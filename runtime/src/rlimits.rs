//! Resource limits the spec does not set are the caller's, as under runc (whose container
//! process inherits them from the runtime). A guest process would otherwise get the guest
//! kernel's defaults, which scale with the VM's small memory: RLIMIT_NPROC is 566 in a 100 MiB
//! guest, so a program raising it to 1000 (INGInious does) fails with EPERM.

use oci_spec::runtime::{PosixRlimit, PosixRlimitBuilder, PosixRlimitType, Process};
use std::sync::OnceLock;

/// Every resource OCI names, with its `getrlimit` number.
const RESOURCES: [(PosixRlimitType, libc::__rlimit_resource_t); 16] = [
    (PosixRlimitType::RlimitCpu, libc::RLIMIT_CPU),
    (PosixRlimitType::RlimitFsize, libc::RLIMIT_FSIZE),
    (PosixRlimitType::RlimitData, libc::RLIMIT_DATA),
    (PosixRlimitType::RlimitStack, libc::RLIMIT_STACK),
    (PosixRlimitType::RlimitCore, libc::RLIMIT_CORE),
    (PosixRlimitType::RlimitRss, libc::RLIMIT_RSS),
    (PosixRlimitType::RlimitNproc, libc::RLIMIT_NPROC),
    (PosixRlimitType::RlimitNofile, libc::RLIMIT_NOFILE),
    (PosixRlimitType::RlimitMemlock, libc::RLIMIT_MEMLOCK),
    (PosixRlimitType::RlimitAs, libc::RLIMIT_AS),
    (PosixRlimitType::RlimitLocks, libc::RLIMIT_LOCKS),
    (PosixRlimitType::RlimitSigpending, libc::RLIMIT_SIGPENDING),
    (PosixRlimitType::RlimitMsgqueue, libc::RLIMIT_MSGQUEUE),
    (PosixRlimitType::RlimitNice, libc::RLIMIT_NICE),
    (PosixRlimitType::RlimitRtprio, libc::RLIMIT_RTPRIO),
    (PosixRlimitType::RlimitRttime, libc::RLIMIT_RTTIME),
];

/// This process's limit of `resource` as (soft, hard).
fn own_limit(resource: libc::__rlimit_resource_t) -> Option<(u64, u64)> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid struct it is given.
    (unsafe { libc::getrlimit(resource, &mut rl) } == 0).then_some((rl.rlim_cur, rl.rlim_max))
}

/// The limits this process started with, by index in [`RESOURCES`].
static CALLERS: OnceLock<Vec<Option<(u64, u64)>>> = OnceLock::new();

/// Records the limits this process was started with: the caller's (`create` passes them on to
/// the sandbox it spawns). Call first thing in `main`: later, the virtio-fs back end raises
/// RLIMIT_NOFILE for itself.
pub fn remember_callers() {
    CALLERS.get_or_init(|| RESOURCES.iter().map(|(_, r)| own_limit(*r)).collect());
}

/// Adds to `process` every limit it does not set, with the value the caller had (see
/// [`remember_callers`]). Set limits win.
pub fn inherit(process: &mut Process) {
    remember_callers();
    let callers = CALLERS.get().cloned().unwrap_or_default();
    let mut limits: Vec<PosixRlimit> = process.rlimits().clone().unwrap_or_default();
    for (i, (typ, _)) in RESOURCES.into_iter().enumerate() {
        if limits.iter().any(|l| l.typ() == typ) {
            continue;
        }
        let Some((soft, hard)) = callers.get(i).copied().flatten() else {
            continue;
        };
        match PosixRlimitBuilder::default()
            .typ(typ)
            .soft(soft)
            .hard(hard)
            .build()
        {
            Ok(l) => limits.push(l),
            Err(e) => tracing::warn!(?typ, "cannot pass on the caller's limit: {e}"),
        }
    }
    process.set_rlimits(Some(limits));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(rlimits: &str) -> Process {
        serde_json::from_str(&format!(
            r#"{{"args":["sh"],"cwd":"/","user":{{"uid":0,"gid":0}}{rlimits}}}"#
        ))
        .unwrap()
    }

    fn find(p: &Process, t: PosixRlimitType) -> (u64, u64) {
        let l = p
            .rlimits()
            .as_ref()
            .unwrap()
            .iter()
            .find(|l| l.typ() == t)
            .unwrap_or_else(|| panic!("{t:?} missing"));
        (l.soft(), l.hard())
    }

    #[test]
    fn unset_limits_are_the_callers() {
        let mut p = process("");
        inherit(&mut p);
        assert_eq!(p.rlimits().as_ref().unwrap().len(), RESOURCES.len());
        assert_eq!(
            find(&p, PosixRlimitType::RlimitNproc),
            own_limit(libc::RLIMIT_NPROC).unwrap()
        );
        assert_eq!(
            find(&p, PosixRlimitType::RlimitNofile),
            own_limit(libc::RLIMIT_NOFILE).unwrap()
        );
    }

    #[test]
    fn a_set_limit_wins_and_is_not_duplicated() {
        let mut p = process(r#","rlimits":[{"type":"RLIMIT_NOFILE","soft":123,"hard":456}]"#);
        inherit(&mut p);
        assert_eq!(find(&p, PosixRlimitType::RlimitNofile), (123, 456));
        let n = p
            .rlimits()
            .as_ref()
            .unwrap()
            .iter()
            .filter(|l| l.typ() == PosixRlimitType::RlimitNofile)
            .count();
        assert_eq!(n, 1);
    }
}
