//! A hand-assembled guest driver brings up a virtio-mmio device through KVM: MMIO exits reach
//! the transport, DRIVER_OK activates the device, and the QueueNotify write is delivered through
//! the ioeventfd (KVM signals the eventfd without the write reaching user space).

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rootcell_vmm::devices::virtio::{ActivateError, ActiveQueue, Interrupt, VirtioDevice};
use rootcell_vmm::memory::GuestMemoryMmap;
use rootcell_vmm::{SerialOutput, Vm, VmConfig, VmExit};
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;

use common::guest_driver::{bring_up, store_all};

#[derive(Default)]
struct Seen {
    queues: Vec<ActiveQueue>,
}

struct Probe(Arc<Mutex<Seen>>);

impl VirtioDevice for Probe {
    fn device_type(&self) -> u32 {
        19
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 16]
    }
    fn features(&self) -> u64 {
        0
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(
        &mut self,
        _m: GuestMemoryMmap,
        _i: Arc<Interrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        self.0.lock().unwrap().queues = queues;
        Ok(())
    }
}

fn program(base: u64) -> Vec<u8> {
    let mut c = Vec::new();
    // mov eax, [base] (magic); cmp eax, "virt"; jne fail
    c.push(0xa1);
    c.extend_from_slice(&base.to_le_bytes());
    c.extend_from_slice(&[0x3d, 0x76, 0x69, 0x72, 0x74]);
    let jne_at = c.len();
    c.extend_from_slice(&[0x0f, 0x85, 0, 0, 0, 0]); // jne rel32, patched below
                                                    // mov dx, 0x3f8; mov al, 'V'; out dx, al
    c.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03, 0xb0, b'V', 0xee]);
    let mut writes = bring_up(&[(0, 16, 0x20_0000)]);
    // QueueNotify(0): handled by the ioeventfd.
    writes.push((VIRTIO_MMIO_QUEUE_NOTIFY, 0));
    store_all(&mut c, base, &writes);
    let fail = c.len();
    let rel = (fail - (jne_at + 6)) as i32;
    c[jne_at + 2..jne_at + 6].copy_from_slice(&rel.to_le_bytes());
    // mov al, 0xfe; out 0x64, al; hlt
    c.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64, 0xf4]);
    c
}

#[test]
fn guest_driver_activates_device_and_notifies_through_ioeventfd() {
    if !common::kvm_present("guest_driver_activates_device_and_notifies_through_ioeventfd") {
        return;
    }
    let kernel = common::write_tiny_kernel("virtio.elf", &program(0xd000_0000));
    let console = common::Console::default();
    let mut config = VmConfig::new(&kernel, "console=ttyS0");
    config.mem_mib = 32;
    config.serial = SerialOutput::Writer(Box::new(console.clone()));
    config.seccomp = true;
    let vm = Vm::create(config);
    std::fs::remove_file(&kernel).unwrap();
    let mut vm = vm.expect("create VM");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let slot = vm.add_virtio_device(Box::new(Probe(seen.clone()))).unwrap();
    assert_eq!(slot.base, 0xd000_0000);
    assert!(
        vm.cmdline().ends_with("virtio_mmio.device=4K@0xd0000000:5"),
        "{}",
        vm.cmdline()
    );
    let running = vm.start().unwrap();
    let exit = running.wait_timeout(Duration::from_secs(30));
    let report = running.stop();
    assert_eq!(exit, Some(VmExit::Reset), "{report:?}");
    assert_eq!(console.text(), "V", "guest read the virtio magic");
    let s = seen.lock().unwrap();
    assert_eq!(
        s.queues.len(),
        1,
        "device activated with the one ready queue"
    );
    let q = &s.queues[0];
    assert_eq!(
        q.notify.read().unwrap(),
        1,
        "QueueNotify arrived on the eventfd"
    );
    // The notify never became an MMIO exit: 1 magic read + 1 serial write + 12 register writes
    // + 1 i8042 write = 15 exits; a notify handled in user space would make it 16.
    assert_eq!(report.vcpus[0].exits, 15, "{:?}", report.vcpus[0]);
}
