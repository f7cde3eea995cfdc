//! The tap behind a virtio-net device: checked to be a tap opened with the flags the device
//! relies on, then set up (12-byte vnet header, no offloads, non-blocking) by ioctls.

use std::os::fd::RawFd;

use super::{NetDeviceError, NET_HDR_LEN};

fn tap_err(what: &'static str) -> impl FnOnce(std::io::Error) -> NetDeviceError {
    move |source| NetDeviceError::Tap { what, source }
}

/// Checks `fd` is a tap with the flags the device relies on, then sets the 12-byte vnet header,
/// no offloads, and non-blocking I/O.
pub(super) fn prepare_tap(fd: RawFd) -> Result<(), NetDeviceError> {
    // struct ifreq: 16-byte name, then the flags as the first short of the union.
    let mut ifr = [0u8; 40];
    // SAFETY: TUNGETIFF writes at most a struct ifreq (40 bytes) into `ifr`.
    if unsafe { libc::ioctl(fd, libc::TUNGETIFF, ifr.as_mut_ptr()) } < 0 {
        return Err(NetDeviceError::NotATap(format!(
            "TUNGETIFF: {}",
            std::io::Error::last_os_error()
        )));
    }
    let flags = i32::from(u16::from_ne_bytes([ifr[16], ifr[17]]));
    let need = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    if flags & need != need {
        return Err(NetDeviceError::NotATap(format!(
            "flags {flags:#x}, need IFF_TAP|IFF_NO_PI|IFF_VNET_HDR ({need:#x})"
        )));
    }
    let hdr_len = NET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer.
    if unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
        return Err(tap_err("TUNSETVNETHDRSZ")(std::io::Error::last_os_error()));
    }
    // No offloads: the host segments and checksums before a frame reaches the tap, so every
    // frame fits an MTU-sized guest buffer and its header carries nothing to act on.
    // SAFETY: TUNSETOFFLOAD takes its argument by value.
    if unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, 0 as libc::c_ulong) } < 0 {
        return Err(tap_err("TUNSETOFFLOAD")(std::io::Error::last_os_error()));
    }
    // SAFETY: fcntl on an fd we hold.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if fl < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
        return Err(tap_err("fcntl(O_NONBLOCK)")(std::io::Error::last_os_error()));
    }
    Ok(())
}
