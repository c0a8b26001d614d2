//! The guest physical address map and interrupt lines.

/// Start of the 32-bit MMIO hole (RAM above 3 GiB moves to 4 GiB).
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_BASE: u64 = 0xD000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First GSI for virtio-mmio devices (0-4 are legacy: timer, keyboard, cascade, COM2, COM1).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Last usable GSI of the in-kernel IOAPIC.
pub const IRQ_MAX: u32 = 23;
// The configuration accepts one virtio device per interrupt line.
const _: () =
    assert!((IRQ_MAX - VIRTIO_IRQ_BASE + 1) as usize == crate::config::MAX_VIRTIO_DEVICES);
/// IOAPIC MMIO base.
pub const IOAPIC_ADDR: u64 = 0xFEC0_0000;
/// Local APIC MMIO base.
pub const APIC_ADDR: u64 = 0xFEE0_0000;
/// KVM's TSS needs three pages below 4 GiB that the guest never uses.
pub const KVM_TSS_ADDR: u64 = 0xFFFB_D000;
/// KVM's identity map page, just below the TSS.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xFFFB_C000;
/// COM1 port base.
pub const COM1_PORT: u64 = 0x3f8;
/// COM1 interrupt line.
pub const COM1_IRQ: u32 = 4;
/// i8042 data/command ports span.
pub const I8042_PORT: u64 = 0x60;
/// The GDT the boot vCPU starts with.
pub const BOOT_GDT_ADDR: u64 = 0x500;
/// An empty IDT (interrupts stay off until the kernel loads its own).
pub const BOOT_IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH module list (the initramfs), right after the start info.
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
/// PVH memory map, or the Linux boot protocol's zero page.
pub const MEMMAP_ADDR: u64 = 0x7000;
/// Long-mode identity page tables for the Linux 64-bit boot protocol: PML4, PDPT, PD.
pub const PML4_ADDR: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// Page directory (2 MiB pages: the first GiB identity-mapped).
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line (x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX: usize = 2048;
/// Start of the extended BIOS data area; the MP table lives here, RAM below it.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of RAM above the legacy hole.
pub const HIMEM_START: u64 = 0x10_0000;
/// Initial stack of the boot vCPU (64-bit protocol; PVH sets up its own).
pub const BOOT_STACK: u64 = 0x8ff0;
