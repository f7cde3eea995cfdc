//! Guest `/init` for the vsock end-to-end test (built by the test with plain `rustc`, static).
//!
//! - port 1024: echo server; on EOF from the host it shuts down its own write side, so the host
//!   sees the complete echo followed by EOF (half-close in both directions).
//! - port 1025: any connection reboots the guest, which makes QEMU (-no-reboot) exit.
//! - at start it connects to host port 5000 (CID 2), sends a greeting, half-closes and prints
//!   the host's reply: exercises guest-initiated connections.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;

const AF_VSOCK: i32 = 40;
const SOCK_STREAM: i32 = 1;
const SHUT_WR: i32 = 1;
const VMADDR_CID_ANY: u32 = u32::MAX;
const HOST_CID: u32 = 2;
const RB_AUTOBOOT: i32 = 0x0123_4567;

extern "C" {
    fn socket(domain: i32, ty: i32, proto: i32) -> i32;
    fn bind(fd: i32, addr: *const SockaddrVm, len: u32) -> i32;
    fn connect(fd: i32, addr: *const SockaddrVm, len: u32) -> i32;
    fn listen(fd: i32, backlog: i32) -> i32;
    fn accept(fd: i32, addr: *mut u8, len: *mut u32) -> i32;
    fn shutdown(fd: i32, how: i32) -> i32;
    fn reboot(cmd: i32) -> i32;
    fn sync();
}

#[repr(C)]
struct SockaddrVm {
    family: u16,
    reserved1: u16,
    port: u32,
    cid: u32,
    flags: u8,
    zero: [u8; 3],
}

fn addr(cid: u32, port: u32) -> SockaddrVm {
    SockaddrVm { family: AF_VSOCK as u16, reserved1: 0, port, cid, flags: 0, zero: [0; 3] }
}

fn listener(port: u32) -> i32 {
    // SAFETY: plain socket syscalls on a fresh fd with a correctly sized address.
    unsafe {
        let fd = socket(AF_VSOCK, SOCK_STREAM, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let a = addr(VMADDR_CID_ANY, port);
        assert!(bind(fd, &a, 16) == 0, "bind {port}: {}", std::io::Error::last_os_error());
        assert!(listen(fd, 16) == 0, "listen: {}", std::io::Error::last_os_error());
        fd
    }
}

fn accept_one(lfd: i32) -> i32 {
    loop {
        // SAFETY: null address pointers are allowed by accept(2).
        let fd = unsafe { accept(lfd, std::ptr::null_mut(), std::ptr::null_mut()) };
        if fd >= 0 {
            return fd;
        }
    }
}

fn echo(fd: i32) {
    // SAFETY: `fd` is a connected socket owned from here on.
    let mut sock = unsafe { File::from_raw_fd(fd) };
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if sock.write_all(&buf[..n]).is_err() {
                    println!("vsock-echo: write failed after {total} bytes");
                    return;
                }
                total += n as u64;
            }
            Err(e) => {
                println!("vsock-echo: read failed after {total} bytes: {e}");
                return;
            }
        }
    }
    // SAFETY: shutdown on an fd we own.
    unsafe { shutdown(fd, SHUT_WR) };
    println!("vsock-echo: echoed {total} bytes");
}

fn greet_host() {
    for _ in 0..50 {
        // SAFETY: plain socket syscalls.
        let fd = unsafe { socket(AF_VSOCK, SOCK_STREAM, 0) };
        let a = addr(HOST_CID, 5000);
        // SAFETY: correctly sized address.
        if unsafe { connect(fd, &a, 16) } == 0 {
            // SAFETY: connected socket owned from here on.
            let mut sock = unsafe { File::from_raw_fd(fd) };
            let _ = sock.write_all(b"hello from guest\n");
            // SAFETY: shutdown on an fd we own.
            unsafe { shutdown(fd, SHUT_WR) };
            let mut reply = String::new();
            let _ = sock.read_to_string(&mut reply);
            println!("vsock-echo: host replied {reply:?}");
            return;
        }
        // SAFETY: closing the failed socket.
        drop(unsafe { File::from_raw_fd(fd) });
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    println!("vsock-echo: could not reach host port 5000");
}

fn main() {
    let echo_fd = listener(1024);
    let stop_fd = listener(1025);
    println!("vsock-echo: listening on 1024");
    std::thread::spawn(greet_host);
    std::thread::spawn(move || {
        let _ = accept_one(stop_fd);
        println!("vsock-echo: rebooting");
        // SAFETY: flushing and rebooting is the intended end of this init.
        unsafe {
            sync();
            reboot(RB_AUTOBOOT);
        }
    });
    loop {
        let fd = accept_one(echo_fd);
        std::thread::spawn(move || echo(fd));
    }
}
