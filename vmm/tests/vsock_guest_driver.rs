//! A hand-assembled guest driver brings up the real virtio-vsock device through KVM with the
//! vCPU thread under the seccomp allowlist (violations kill the process): DRIVER_OK activates
//! the device from inside the vCPU's MMIO exit, the QueueNotify reaches the device's I/O thread
//! through the ioeventfd, a guest REQUEST (placed in the TX ring) connects to a host listener,
//! the guest spins until the RESPONSE lands in its RX used ring, then resets the device (again
//! from the vCPU thread), which closes the host end.

mod common;

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use rootcell_vmm::devices::virtio::vsock::VsockDevice;
use rootcell_vmm::{SerialOutput, Vm, VmConfig, VmExit};
use rootcell_vsock::VsockConfig;
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_QUEUE_NOTIFY, VIRTIO_MMIO_STATUS};
use vm_memory::{Bytes, GuestAddress};

use common::guest_driver::{bring_up, store, store_all};

const RX_RINGS: u64 = 0x20_0000;
const TX_RINGS: u64 = 0x21_0000;
const TX_PACKET: u64 = 0x22_0000;
const RX_BUFFERS: u64 = 0x23_0000;
const QSIZE: u32 = 16;

/// `mov dx, 0x3f8; mov al, c; out dx, al`
fn putc(code: &mut Vec<u8>, c: u8) {
    code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03, 0xb0, c, 0xee]);
}

fn program(base: u64) -> Vec<u8> {
    let mut c = Vec::new();
    putc(&mut c, b'V');
    let mut writes = bring_up(&[(0, QSIZE, RX_RINGS as u32), (1, QSIZE, TX_RINGS as u32)]);
    // DRIVER_OK (the last of those) activates on this vCPU thread; QueueNotify(TX) goes
    // through the ioeventfd.
    writes.push((VIRTIO_MMIO_QUEUE_NOTIFY, 1));
    store_all(&mut c, base, &writes);
    // spin: mov ax, [rx used idx]; test ax, ax; jz spin
    let spin = c.len();
    c.extend_from_slice(&[0x66, 0xa1]);
    c.extend_from_slice(&(RX_RINGS + 0x8002).to_le_bytes());
    c.extend_from_slice(&[0x66, 0x85, 0xc0, 0x74]);
    let rel = spin as i64 - (c.len() as i64 + 1);
    c.push(rel as i8 as u8);
    putc(&mut c, b'R');
    // Device reset: also on this vCPU thread.
    store(&mut c, base + u64::from(VIRTIO_MMIO_STATUS), 0);
    putc(&mut c, b'Z');
    // mov al, 0xfe; out 0x64, al; hlt
    c.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64, 0xf4]);
    c
}

/// Writes one descriptor.
fn desc(mem: &impl Bytes<GuestAddress>, table: u64, i: u64, addr: u64, len: u32, flags: u16) {
    let d = table + i * 16;
    mem.write_obj(addr, GuestAddress(d)).ok().unwrap();
    mem.write_obj(len, GuestAddress(d + 8)).ok().unwrap();
    mem.write_obj(flags, GuestAddress(d + 12)).ok().unwrap();
}

/// A REQUEST from guest CID 3 port 4000 to host port `port`.
fn request(port: u32) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&3u64.to_le_bytes());
    v.extend_from_slice(&2u64.to_le_bytes());
    v.extend_from_slice(&4000u32.to_le_bytes());
    v.extend_from_slice(&port.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes()); // len
    v.extend_from_slice(&1u16.to_le_bytes()); // stream
    v.extend_from_slice(&1u16.to_le_bytes()); // REQUEST
    v.extend_from_slice(&0u32.to_le_bytes()); // flags
    v.extend_from_slice(&65536u32.to_le_bytes()); // buf_alloc
    v.extend_from_slice(&0u32.to_le_bytes()); // fwd_cnt
    v
}

#[test]
fn guest_driver_connects_over_vsock_with_seccomp_on_vcpu() {
    if !common::kvm_present("guest_driver_connects_over_vsock_with_seccomp_on_vcpu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock.sock");
    let listener = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    listener.set_nonblocking(true).unwrap();

    let kernel = common::write_tiny_kernel("vsock.elf", &program(0xd000_0000));
    let console = common::Console::default();
    let mut config = VmConfig::new(&kernel, "console=ttyS0");
    config.mem_mib = 32;
    config.serial = SerialOutput::Writer(Box::new(console.clone()));
    config.seccomp = true;
    let vm = Vm::create(config);
    std::fs::remove_file(&kernel).unwrap();
    let mut vm = vm.expect("create VM");
    let dev = VsockDevice::new(&VsockConfig::new(&uds)).unwrap();
    vm.add_virtio_device(Box::new(dev)).unwrap();

    // What the guest driver would have set up before DRIVER_OK: one TX chain with the REQUEST,
    // four writable RX buffers.
    let mem = vm.memory().clone();
    let pkt = request(5000);
    mem.write_slice(&pkt, GuestAddress(TX_PACKET)).unwrap();
    desc(&mem, TX_RINGS, 0, TX_PACKET, pkt.len() as u32, 0);
    mem.write_obj(0u16, GuestAddress(TX_RINGS + 0x4004))
        .unwrap();
    mem.write_obj(1u16, GuestAddress(TX_RINGS + 0x4002))
        .unwrap();
    for i in 0..4u16 {
        desc(
            &mem,
            RX_RINGS,
            i.into(),
            RX_BUFFERS + u64::from(i) * 0x2000,
            0x1000,
            2,
        );
        mem.write_obj(i, GuestAddress(RX_RINGS + 0x4004 + u64::from(i) * 2))
            .unwrap();
    }
    mem.write_obj(4u16, GuestAddress(RX_RINGS + 0x4002))
        .unwrap();

    let running = vm.start().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let accepted = loop {
        match listener.accept() {
            Ok((s, _)) => break Some(s),
            Err(_)
                if Instant::now() < deadline && running.wait_timeout(Duration::ZERO).is_none() =>
            {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(_) => break None,
        }
    };
    let exit = running.wait_timeout(Duration::from_secs(60));
    let report = running.stop();
    assert_eq!(
        exit,
        Some(VmExit::Reset),
        "{report:?} console {:?}",
        console.text()
    );
    let mut host = accepted.expect("guest REQUEST reached the host listener");
    host.set_nonblocking(false).unwrap();
    assert_eq!(
        console.text(),
        "VRZ",
        "guest saw the RESPONSE, then reset the device"
    );

    // The RESPONSE the device wrote into the first RX buffer.
    let used_len: u32 = mem.read_obj(GuestAddress(RX_RINGS + 0x8008)).unwrap();
    let op: u16 = mem.read_obj(GuestAddress(RX_BUFFERS + 30)).unwrap();
    let (src, dst): (u32, u32) = (
        mem.read_obj(GuestAddress(RX_BUFFERS + 16)).unwrap(),
        mem.read_obj(GuestAddress(RX_BUFFERS + 20)).unwrap(),
    );
    assert_eq!((used_len, op, src, dst), (44, 2, 5000, 4000));
    let tx_used: u16 = mem.read_obj(GuestAddress(TX_RINGS + 0x8002)).unwrap();
    assert_eq!(tx_used, 1, "TX chain returned");

    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 4];
    assert_eq!(
        host.read(&mut b).unwrap(),
        0,
        "device reset closed the host end"
    );
}
