//! Initial vCPU state for each boot protocol: segments, control registers, general registers,
//! FPU and the local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::gdt::{self, CODE32, CODE64, DATA, TSS};
use super::layout::{BOOT_GDT_ADDR, BOOT_IDT_ADDR, BOOT_STACK, PDPT_ADDR, PD_ADDR, PML4_ADDR};
use crate::memory::GuestMemoryMmap;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Which entry the kernel is started at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode, paging off, EBX = start info.
    Pvh {
        /// Entry point from the ELF note.
        entry: u64,
        /// Guest address of `hvm_start_info`.
        start_info: u64,
    },
    /// Linux 64-bit boot protocol: long mode on identity page tables, RSI = zero page.
    Linux64 {
        /// `startup_64`.
        entry: u64,
        /// Guest address of `boot_params`.
        zero_page: u64,
    },
}

/// Setting vCPU state failed.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM vCPU ioctl failed.
    #[error("{0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Writing the GDT or page tables failed.
    #[error("writing boot tables")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Writes the boot GDT (and for long mode, identity page tables for the first GiB).
pub fn write_tables(mem: &GuestMemoryMmap, entry: BootEntry) -> Result<[u64; 5], RegsError> {
    let table = [0, CODE32, DATA, TSS, CODE64];
    for (i, e) in table.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_ADDR + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_ADDR))?;
    if let BootEntry::Linux64 { .. } = entry {
        mem.write_obj(PDPT_ADDR | 0x3, GuestAddress(PML4_ADDR))?;
        mem.write_obj(PD_ADDR | 0x3, GuestAddress(PDPT_ADDR))?;
        for i in 0..512u64 {
            // 2 MiB pages: present, writable, PS.
            mem.write_obj((i << 21) | 0x83, GuestAddress(PD_ADDR + i * 8))?;
        }
    }
    Ok(table)
}

/// Sets the boot vCPU's registers for `entry`.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, table: &[u64], entry: BootEntry) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu
        .get_sregs()
        .map_err(|e| RegsError::Kvm("KVM_GET_SREGS", e))?;
    let code = match entry {
        BootEntry::Pvh { .. } => 1,
        BootEntry::Linux64 { .. } => 4,
    };
    sregs.cs = gdt::segment(table, code);
    let data = gdt::segment(table, 2);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = gdt::segment(table, 3);
    sregs.gdt.base = BOOT_GDT_ADDR;
    sregs.gdt.limit = u16::try_from(table.len() * 8 - 1).unwrap_or(u16::MAX);
    sregs.idt.base = BOOT_IDT_ADDR;
    sregs.idt.limit = 7;
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        BootEntry::Pvh { entry, start_info } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = start_info;
        }
        BootEntry::Linux64 { entry, zero_page } => {
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 = X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rip = entry;
            regs.rsi = zero_page;
            regs.rsp = BOOT_STACK;
            regs.rbp = BOOT_STACK;
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(|e| RegsError::Kvm("KVM_SET_SREGS", e))?;
    vcpu.set_regs(&regs)
        .map_err(|e| RegsError::Kvm("KVM_SET_REGS", e))?;
    Ok(())
}

/// FPU at its reset state (x87 control word, SSE control/status).
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
        .map_err(|e| RegsError::Kvm("KVM_SET_FPU", e))
}

fn lapic_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let mut b = [0u8; 4];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = state.regs.get(offset + i).map_or(0, |v| v.to_ne_bytes()[0]);
    }
    u32::from_le_bytes(b)
}

fn set_lapic_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        if let Some(r) = state.regs.get_mut(offset + i) {
            *r = i8::from_ne_bytes([*byte]);
        }
    }
}

/// LINT0 as ExtINT (the PIC) and LINT1 as NMI, as firmware leaves them.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut state = vcpu
        .get_lapic()
        .map_err(|e| RegsError::Kvm("KVM_GET_LAPIC", e))?;
    let lvt0 = lapic_reg(&state, APIC_LVT0);
    set_lapic_reg(
        &mut state,
        APIC_LVT0,
        (lvt0 & !0x700) | (APIC_MODE_EXTINT << 8),
    );
    let lvt1 = lapic_reg(&state, APIC_LVT1);
    set_lapic_reg(
        &mut state,
        APIC_LVT1,
        (lvt1 & !0x700) | (APIC_MODE_NMI << 8),
    );
    vcpu.set_lapic(&state)
        .map_err(|e| RegsError::Kvm("KVM_SET_LAPIC", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lapic_register_round_trip() {
        let mut state = kvm_lapic_state::default();
        set_lapic_reg(&mut state, APIC_LVT0, 0x0001_0700);
        assert_eq!(lapic_reg(&state, APIC_LVT0), 0x0001_0700);
        assert_eq!(lapic_reg(&state, 1022), 0);
    }

    #[test]
    fn long_mode_tables_identity_map_the_first_gib() {
        let mem = crate::memory::create(2).expect("mem");
        let entry = BootEntry::Linux64 {
            entry: 0x100_0000,
            zero_page: 0x7000,
        };
        write_tables(&mem, entry).expect("tables");
        let pd1: u64 = mem.read_obj(GuestAddress(PD_ADDR + 8)).expect("read");
        assert_eq!(pd1, (1 << 21) | 0x83);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).expect("read");
        assert_eq!(pml4, PDPT_ADDR | 3);
    }
}
