//! The Intel MultiProcessor table: how a guest without ACPI finds its CPUs, IOAPIC and IRQ wiring.
//!
//! Layout at [`EBDA_START`](super::layout::EBDA_START): a 16-byte floating pointer ("_MP_") that
//! points right after itself to the configuration table ("PCMP"), followed by one processor entry
//! per vCPU, one ISA bus, the IOAPIC, an I/O interrupt entry per IOAPIC pin (ISA IRQ n → pin n) and
//! the two local interrupt entries (ExtINT on LINT0, NMI on LINT1). Both headers carry a checksum
//! that makes their bytes sum to zero.

use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_ADDR, EBDA_START, IOAPIC_ADDR, IRQ_MAX};
use crate::memory::GuestMemoryMmap;

/// Most vCPUs the table (and the VMM) supports.
pub const MAX_VCPUS: u8 = 16;
// The configuration accepts what the table can describe.
const _: () = assert!(MAX_VCPUS == crate::config::MAX_VCPUS);

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201; // FPU + APIC

/// The MP table could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// Zero or too many vCPUs.
    #[error("{0} vCPUs: the MP table supports 1 to {MAX_VCPUS}")]
    VcpuCount(u8),
    /// The table does not fit guest memory.
    #[error("writing the MP table")]
    Write(#[from] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the table bytes for `vcpus` CPUs, to be placed at `base`.
pub fn build(vcpus: u8, base: u64) -> Result<Vec<u8>, MpTableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MpTableError::VcpuCount(vcpus));
    }
    let ioapic_id = vcpus + 1;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..vcpus {
        entries.extend_from_slice(&[0, cpu, APIC_VERSION]);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BSP } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, CPU_ENABLED]);
    entries.extend_from_slice(&u32::try_from(IOAPIC_ADDR).unwrap_or(0).to_le_bytes());
    count += 1;
    for irq in 0..=IRQ_MAX {
        let irq = u8::try_from(irq).unwrap_or(0);
        // type 3 (I/O interrupt), INT, flags 0 (bus-conforming), bus 0, source irq, IOAPIC, pin.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // type 4 (local interrupt): ExtINT → LINT0 and NMI → LINT1 of every local APIC (0xff).
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = base + 16;
    let table_len = u16::try_from(44 + entries.len()).unwrap_or(u16::MAX);
    let mut table = Vec::with_capacity(usize::from(table_len));
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&table_len.to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"PANGOLIN");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&u32::try_from(APIC_ADDR).unwrap_or(0).to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(16 + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&u32::try_from(table_addr).unwrap_or(0).to_le_bytes());
    out.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length in 16-byte units, rev 1.4, checksum
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the table for `vcpus` CPUs at [`EBDA_START`].
pub fn write(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), MpTableError> {
    let bytes = build(vcpus, EBDA_START)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_checksums_and_counts() {
        let bytes = build(4, EBDA_START).expect("table");
        assert_eq!(&bytes[..4], b"_MP_");
        assert_eq!(bytes[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let table = &bytes[16..];
        assert_eq!(&table[..4], b"PCMP");
        let len = usize::from(u16::from_le_bytes([table[4], table[5]]));
        assert_eq!(len, table.len());
        assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 4 + 1 + 1 + 24 + 2);
        // processor entries: BSP flag only on the first
        assert_eq!(table[44 + 3], CPU_ENABLED | CPU_BSP);
        assert_eq!(table[44 + 20 + 3], CPU_ENABLED);
        assert!(build(0, 0).is_err());
        assert!(build(17, 0).is_err());
        assert!(build(16, 0).is_ok());
    }
}
