//! The boot GDT: flat segments for 32-bit protected mode (PVH) or long mode (64-bit protocol).

use kvm_bindings::kvm_segment;

/// Flat 32-bit code segment (PVH entry).
pub const CODE32: u64 = gdt_entry(0xc09b, 0, 0xfffff);
/// Flat 64-bit code segment (Linux 64-bit boot protocol).
pub const CODE64: u64 = gdt_entry(0xa09b, 0, 0xfffff);
/// Flat data segment.
pub const DATA: u64 = gdt_entry(0xc093, 0, 0xfffff);
/// 32-bit busy TSS (KVM requires a usable TR).
pub const TSS: u64 = gdt_entry(0x808b, 0, 0xfffff);

/// Builds one descriptor from its flags (type/S/DPL/P in the low byte, AVL/L/DB/G in bits 12-15),
/// base and 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The KVM view of descriptor `index` of `table`.
pub fn segment(table: &[u64], index: u8) -> kvm_segment {
    let entry = table.get(usize::from(index)).copied().unwrap_or(0);
    let bit = |n: u32| u8::from((entry >> n) & 1 == 1);
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let g = bit(55);
    let limit = if g == 1 {
        (limit_raw << 12) | 0xfff
    } else {
        limit_raw
    };
    kvm_segment {
        base,
        limit: u32::try_from(limit).unwrap_or(u32::MAX),
        selector: u16::from(index) * 8,
        type_: u8::try_from((entry >> 40) & 0xf).unwrap_or(0),
        present: bit(47),
        dpl: u8::try_from((entry >> 45) & 3).unwrap_or(0),
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        padding: 0,
        unusable: u8::from(bit(47) == 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_segments_decode() {
        let table = [0, CODE32, DATA, TSS, CODE64];
        let cs = segment(&table, 1);
        assert_eq!(
            (cs.base, cs.limit, cs.type_, cs.db, cs.l, cs.g),
            (0, 0xffff_ffff, 0xb, 1, 0, 1)
        );
        assert_eq!(cs.selector, 8);
        let ds = segment(&table, 2);
        assert_eq!((ds.type_, ds.s, ds.present), (3, 1, 1));
        let cs64 = segment(&table, 4);
        assert_eq!((cs64.l, cs64.db), (1, 0));
        assert_eq!(segment(&table, 0).unusable, 1);
        assert_eq!(segment(&table, 9).present, 0);
    }
}
