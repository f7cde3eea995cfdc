//! Per-process setup that does not depend on credentials: executable lookup, environment,
//! rlimits, OOM score, working directory.

use super::error::{Context, SetupError};
use oci_spec::runtime::{PosixRlimit, PosixRlimitType, Process};
use rootcell_protocol::ErrorCode;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// PATH used for lookup when the process environment has none (runc/Docker default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why a candidate cannot be executed.
enum Candidate {
    Ok,
    Missing,
    NotExecutable,
}

fn check(path: &Path) -> Candidate {
    match std::fs::metadata(path) {
        Err(_) => Candidate::Missing,
        Ok(m) if m.is_dir() || m.permissions().mode() & 0o111 == 0 => Candidate::NotExecutable,
        Ok(_) => Candidate::Ok,
    }
}

/// Finds the program to execute like runc (Go's `exec.LookPath`): names with a `/` are taken
/// as paths (relative to `cwd`), others are searched in `path_env`. The error class tells the
/// host which exit code to use (NotFound -> 127, PermissionDenied -> 126).
pub fn resolve_executable(name: &str, path_env: &str, cwd: &Path) -> Result<PathBuf, SetupError> {
    if name.contains('/') {
        let p = cwd.join(name);
        return match check(&p) {
            Candidate::Ok => Ok(p),
            Candidate::Missing => Err(SetupError::new(
                ErrorCode::NotFound,
                format!("exec: \"{name}\": stat {name}: no such file or directory"),
            )),
            Candidate::NotExecutable => Err(SetupError::new(
                ErrorCode::PermissionDenied,
                format!("exec: \"{name}\": permission denied"),
            )),
        };
    }
    let mut denied = false;
    for dir in path_env.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let p = cwd.join(dir).join(name);
        match check(&p) {
            Candidate::Ok => return Ok(p),
            Candidate::NotExecutable => denied = true,
            Candidate::Missing => {}
        }
    }
    if name.is_empty() {
        return Err(SetupError::new(
            ErrorCode::NotFound,
            "exec: \"\": executable file not found in $PATH",
        ));
    }
    if denied {
        Err(SetupError::new(
            ErrorCode::PermissionDenied,
            format!("exec: \"{name}\": permission denied"),
        ))
    } else {
        Err(SetupError::new(
            ErrorCode::NotFound,
            format!("exec: \"{name}\": executable file not found in $PATH"),
        ))
    }
}

/// The value of `key` in a `KEY=VALUE` list (last one wins, as getenv would see it).
pub fn env_get<'a>(env: &'a [String], key: &str) -> Option<&'a str> {
    env.iter()
        .rev()
        .find_map(|e| e.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// The home directory of `uid` in an /etc/passwd text, if listed.
pub fn home_from_passwd(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 6 && f[2].parse() == Ok(uid)).then(|| f[5].to_string())
    })
}

/// The process environment, with HOME added (from the container's /etc/passwd, else "/")
/// when missing, as runc does.
pub fn build_env(process: &Process) -> Vec<String> {
    let mut env = process.env().clone().unwrap_or_default();
    if env_get(&env, "HOME").is_none() {
        let uid = process.user().uid();
        let home = std::fs::read_to_string("/etc/passwd")
            .ok()
            .and_then(|p| home_from_passwd(&p, uid))
            .unwrap_or_else(|| "/".into());
        env.push(format!("HOME={home}"));
    }
    env
}

/// The `setrlimit` resource of an OCI rlimit type.
pub fn rlimit_resource(t: PosixRlimitType) -> libc::__rlimit_resource_t {
    match t {
        PosixRlimitType::RlimitCpu => libc::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => libc::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => libc::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => libc::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => libc::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => libc::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => libc::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => libc::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => libc::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => libc::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => libc::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => libc::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => libc::RLIMIT_RTTIME,
    }
}

/// Applies the process rlimits.
pub fn apply_rlimits(limits: &[PosixRlimit]) -> Result<(), SetupError> {
    for l in limits {
        let rl = libc::rlimit {
            rlim_cur: l.soft(),
            rlim_max: l.hard(),
        };
        // SAFETY: setrlimit with a valid struct.
        if unsafe { libc::setrlimit(rlimit_resource(l.typ()), &rl) } != 0 {
            return Err(SetupError::other(format!(
                "setrlimit {:?}: {}",
                l.typ(),
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

/// Applies `oomScoreAdj`, `rlimits` and the working directory (created if missing, like runc).
pub fn apply_process_basics(process: &Process) -> Result<(), SetupError> {
    if let Some(adj) = process.oom_score_adj() {
        std::fs::write("/proc/self/oom_score_adj", adj.to_string())
            .ctx(|| "write oom_score_adj".into())?;
    }
    apply_rlimits(process.rlimits().as_deref().unwrap_or(&[]))?;
    let cwd = process.cwd();
    if !cwd.is_absolute() {
        return Err(SetupError::other(format!(
            "cwd {} is not absolute",
            cwd.display()
        )));
    }
    if std::fs::metadata(cwd).is_err() {
        std::fs::create_dir_all(cwd).ctx(|| format!("create cwd {}", cwd.display()))?;
    }
    std::env::set_current_dir(cwd).ctx(|| format!("chdir to cwd {}", cwd.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        for d in ["bin", "usr/bin", "noexec", "home/me"] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        let mk = |p: &str, mode: u32| {
            std::fs::write(r.join(p), b"#!/bin/sh\n").unwrap();
            std::fs::set_permissions(r.join(p), std::fs::Permissions::from_mode(mode)).unwrap();
        };
        mk("bin/busybox", 0o755);
        mk("usr/bin/tool", 0o700);
        mk("noexec/data", 0o644);
        mk("home/me/script", 0o755);
        symlink("busybox", r.join("bin/sh")).unwrap();
        symlink("missing", r.join("bin/dangling")).unwrap();
        t
    }

    #[test]
    fn path_search_finds_first_executable() {
        let t = tree();
        let r = t.path();
        let path = format!("{0}/noexec:{0}/bin:{0}/usr/bin", r.display());
        assert_eq!(
            resolve_executable("sh", &path, r).unwrap(),
            r.join("bin/sh")
        );
        assert_eq!(
            resolve_executable("tool", &path, r).unwrap(),
            r.join("usr/bin/tool")
        );
    }

    #[test]
    fn not_found_and_permission_denied() {
        let t = tree();
        let r = t.path();
        let path = format!("{0}/noexec:{0}/bin", r.display());
        let e = resolve_executable("nope", &path, r).unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound);
        assert_eq!(
            e.message,
            "exec: \"nope\": executable file not found in $PATH"
        );
        assert_eq!(
            resolve_executable("dangling", &path, r).unwrap_err().code,
            ErrorCode::NotFound
        );
        assert_eq!(
            resolve_executable("data", &path, r).unwrap_err().code,
            ErrorCode::PermissionDenied
        );
        let abs = r.join("noexec/data");
        assert_eq!(
            resolve_executable(abs.to_str().unwrap(), &path, r)
                .unwrap_err()
                .code,
            ErrorCode::PermissionDenied
        );
        let dir = r.join("bin");
        assert_eq!(
            resolve_executable(dir.to_str().unwrap(), &path, r)
                .unwrap_err()
                .code,
            ErrorCode::PermissionDenied
        );
        let missing = r.join("bin/zzz");
        assert_eq!(
            resolve_executable(missing.to_str().unwrap(), &path, r)
                .unwrap_err()
                .code,
            ErrorCode::NotFound
        );
    }

    #[test]
    fn relative_names_resolve_against_cwd() {
        let t = tree();
        let cwd = t.path().join("home/me");
        assert_eq!(
            resolve_executable("./script", "", &cwd).unwrap(),
            cwd.join("./script")
        );
        assert_eq!(
            resolve_executable("script", "", &cwd).unwrap(),
            cwd.join(".").join("script")
        );
    }

    #[test]
    fn env_and_passwd_helpers() {
        let env = vec![
            "PATH=/a".to_string(),
            "X=1".into(),
            "PATH=/b".into(),
            "PATHX=no".into(),
        ];
        assert_eq!(env_get(&env, "PATH"), Some("/b"));
        assert_eq!(env_get(&env, "HOME"), None);
        let passwd =
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
        assert_eq!(home_from_passwd(passwd, 0).as_deref(), Some("/root"));
        assert_eq!(
            home_from_passwd(passwd, 65534).as_deref(),
            Some("/nonexistent")
        );
        assert_eq!(home_from_passwd(passwd, 1000), None);
    }

    #[test]
    fn rlimit_mapping() {
        assert_eq!(
            rlimit_resource(PosixRlimitType::RlimitNofile),
            libc::RLIMIT_NOFILE
        );
        assert_eq!(
            rlimit_resource(PosixRlimitType::RlimitCore),
            libc::RLIMIT_CORE
        );
    }
}
