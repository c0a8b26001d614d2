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
