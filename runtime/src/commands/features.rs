//! `features`: what this runtime supports, as runc prints it.

/// `features`: what this runtime supports, in the OCI features format.
pub fn features() -> String {
    let v = serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.2.0",
        "hooks": ["prestart", "createRuntime", "poststart", "poststop"],
        "mountOptions": ["bind", "rbind", "ro", "rw"],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "uts"],
        },
        "annotations": {
            "io.github.rootcell.isolation": "microvm",
        },
    });
    serde_json::to_string_pretty(&v).unwrap_or_default()
}
