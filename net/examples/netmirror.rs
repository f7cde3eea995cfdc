//! Development tool: mirrors the current network namespace to taps and runs a command
//! (e.g. QEMU) with the tap descriptors inherited; `{tap0}`, `{tap1}`, ... in its arguments
//! become the descriptor numbers and `{mac0}`, ... the MACs. Prints the scanned
//! configuration as JSON on stderr, and into the file `$NETMIRROR_CONFIG_OUT` if set.
//! Usage: `netmirror CMD ARGS...`.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = rootcell_net::scan()?;
    let json = serde_json::to_string_pretty(&config)?;
    eprintln!("{json}");
    if let Some(path) = std::env::var_os("NETMIRROR_CONFIG_OUT") {
        std::fs::write(path, &json)?;
    }
    let mut mirror = rootcell_net::mirror(&config)?;
    let macs: Vec<String> = mirror.taps().iter().map(|t| t.mac.to_string()).collect();
    let fds: Vec<OwnedFd> = mirror.take_fds();
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            let mut a = a.clone();
            for (n, (fd, mac)) in raw.iter().zip(&macs).enumerate() {
                a = a.replace(&format!("{{tap{n}}}"), &fd.to_string());
                a = a.replace(&format!("{{mac{n}}}"), mac);
            }
            a
        })
        .collect();
    let (prog, rest) = args.split_first().ok_or("usage: netmirror CMD ARGS...")?;
    let mut cmd = Command::new(prog);
    cmd.args(rest);
    // SAFETY: between fork and exec only fcntl is called, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            for fd in &raw {
                if libc::fcntl(*fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let status = cmd.status()?;
    drop(fds);
    mirror.teardown()?;
    std::process::exit(status.code().unwrap_or(1));
}
