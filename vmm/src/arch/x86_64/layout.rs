//! Guest physical memory map for x86_64 direct boot.
//!
//! Everything the VMM writes before the first instruction lives below 1 MiB, in the order the
//! Linux boot protocol and the MP specification expect; the kernel goes at 1 MiB (bzImage) or
//! where its ELF headers say (vmlinux, normally 16 MiB); the initramfs goes as high as possible
//! below the MMIO hole. RAM larger than the space below the hole continues from 4 GiB up.

/// The GDT, read by the CPU when entering 64-bit mode.
pub const GDT_ADDR: u64 = 0x500;
/// An empty IDT (the kernel installs its own before enabling interrupts).
pub const IDT_ADDR: u64 = 0x520;
/// The "zero page": `struct boot_params` handed to the kernel in RSI.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer for the boot CPU (grows down, below the page tables).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level 4 table.
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// First of four page directories (2 MiB pages), together mapping 4 GiB.
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line we accept, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the Extended BIOS Data Area; the MP table lives here and RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of high memory: bzImage protected-mode code is loaded here.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole: RAM below it ends here, the rest of RAM starts at
/// [`HIGH_RAM_START`] (see [`crate::memory::ram_regions`]).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole, where RAM beyond the first 3 GiB is placed.
pub const HIGH_RAM_START: u64 = 1 << 32;
/// First virtio-mmio device window; each device gets [`MMIO_DEVICE_SIZE`] bytes after it.
pub const MMIO_DEVICES_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// Where the IO-APIC is (the in-kernel irqchip decodes this address).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Where the local APICs are.
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// KVM's TSS needs three pages of guest-physical address space not backed by RAM.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// Legacy IRQ of the first serial port.
pub const SERIAL_IRQ: u32 = 4;
/// First IRQ handed to virtio-mmio devices (IRQs 5..=23 are free on the IO-APIC).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Last IRQ the IO-APIC routes.
pub const IRQ_MAX: u32 = 23;
