//! Loading the guest: ELF vmlinux, command line, initramfs, and the boot information the chosen
//! protocol hands the kernel (PVH `hvm_start_info` + memory map, or the Linux zero page + e820).

use std::fs::File;
use std::io::{Seek, SeekFrom};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{
    CMDLINE_ADDR, CMDLINE_MAX, EBDA_START, HIMEM_START, MEMMAP_ADDR, MMIO_HOLE_END,
    MMIO_HOLE_START, PVH_INFO_ADDR, PVH_MODLIST_ADDR,
};
use super::regs::BootEntry;
use crate::memory::GuestMemoryMmap;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const PAGE: u64 = 4096;

/// Loading the guest failed.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel is not a loadable ELF vmlinux.
    #[error("loading the kernel")]
    Kernel(#[source] linux_loader::loader::Error),
    /// The command line is too long or holds a NUL byte.
    #[error("kernel command line of {0} bytes is invalid (max {max}, no NUL)", max = CMDLINE_MAX - 1)]
    Cmdline(usize),
    /// The initramfs does not fit between the kernel and the end of low RAM.
    #[error("initramfs of {0} bytes does not fit guest memory")]
    InitramfsTooLarge(u64),
    /// Reading the initramfs failed.
    #[error("reading the initramfs")]
    Initramfs(#[source] std::io::Error),
    /// Writing boot structures to guest memory failed.
    #[error("writing boot information")]
    Memory(#[from] vm_memory::GuestMemoryError),
    /// linux-loader refused the boot parameters.
    #[error("writing boot parameters")]
    Params(#[source] linux_loader::configurator::Error),
}

/// RAM ranges the guest is told about: below the EBDA, from 1 MiB to the hole, above 4 GiB.
pub fn e820(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    let end = mem.last_addr().raw_value() + 1;
    let mut out = vec![(0, EBDA_START)];
    let low_end = end.min(MMIO_HOLE_START);
    if low_end > HIMEM_START {
        out.push((HIMEM_START, low_end - HIMEM_START));
    }
    if end > MMIO_HOLE_END {
        out.push((MMIO_HOLE_END, end - MMIO_HOLE_END));
    }
    out
}

/// Loads kernel, command line and initramfs into `mem` and writes the boot information.
pub fn load(
    mem: &GuestMemoryMmap,
    kernel: &mut File,
    initramfs: Option<&mut File>,
    cmdline: &str,
) -> Result<BootEntry, BootError> {
    let loaded =
        Elf::load(mem, None, kernel, Some(GuestAddress(HIMEM_START))).map_err(BootError::Kernel)?;
    write_cmdline(mem, cmdline)?;
    let initrd = match initramfs {
        Some(file) => Some(load_initramfs(mem, file, loaded.kernel_end)?),
        None => None,
    };
    let ram = e820(mem);
    match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => {
            write_pvh(mem, &ram, initrd, cmdline.len())?;
            Ok(BootEntry::Pvh {
                entry: entry.raw_value(),
                start_info: PVH_INFO_ADDR,
            })
        }
        _ => {
            write_zero_page(mem, &ram, initrd, cmdline.len())?;
            Ok(BootEntry::Linux64 {
                entry: loaded.kernel_load.raw_value(),
                zero_page: MEMMAP_ADDR,
            })
        }
    }
}

fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX || cmdline.as_bytes().contains(&0) {
        return Err(BootError::Cmdline(cmdline.len()));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))?;
    Ok(())
}

/// Places the initramfs page-aligned at the top of low RAM; returns (address, size).
fn load_initramfs(
    mem: &GuestMemoryMmap,
    file: &mut File,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let size = file.seek(SeekFrom::End(0)).map_err(BootError::Initramfs)?;
    file.seek(SeekFrom::Start(0))
        .map_err(BootError::Initramfs)?;
    let top = (mem.last_addr().raw_value() + 1).min(MMIO_HOLE_START);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !(PAGE - 1))
        .filter(|a| *a >= kernel_end.max(HIMEM_START))
        .ok_or(BootError::InitramfsTooLarge(size))?;
    let len = usize::try_from(size).map_err(|_| BootError::InitramfsTooLarge(size))?;
    mem.read_exact_volatile_from(GuestAddress(addr), file, len)
        .map_err(|e| BootError::Initramfs(std::io::Error::other(e)))?;
    Ok((addr, size))
}

fn write_pvh(
    mem: &GuestMemoryMmap,
    ram: &[(u64, u64)],
    initrd: Option<(u64, u64)>,
    _cmdline_len: usize,
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = ram
        .iter()
        .map(|(addr, size)| hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: E820_RAM,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: u32::try_from(memmap.len()).unwrap_or(0),
        ..Default::default()
    };
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_ADDR));
    if let Some((paddr, size)) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
        params = BootParams::new(&info, GuestAddress(PVH_INFO_ADDR));
        let module = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_ADDR));
    }
    params.set_sections(&memmap, GuestAddress(MEMMAP_ADDR));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(BootError::Params)
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    ram: &[(u64, u64)],
    initrd: Option<(u64, u64)>,
    cmdline_len: usize,
) -> Result<(), BootError> {
    let mut zp = boot_params::default();
    zp.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    zp.hdr.header = KERNEL_HDR_MAGIC;
    zp.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    zp.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    zp.hdr.cmd_line_ptr = u32::try_from(CMDLINE_ADDR).unwrap_or(0);
    zp.hdr.cmdline_size = u32::try_from(cmdline_len).unwrap_or(0);
    if let Some((addr, size)) = initrd {
        zp.hdr.ramdisk_image =
            u32::try_from(addr).map_err(|_| BootError::InitramfsTooLarge(size))?;
        zp.hdr.ramdisk_size =
            u32::try_from(size).map_err(|_| BootError::InitramfsTooLarge(size))?;
    }
    for (slot, (addr, size)) in zp.e820_table.iter_mut().zip(ram) {
        *slot = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: E820_RAM,
        };
    }
    zp.e820_entries = u8::try_from(ram.len()).unwrap_or(0);
    let params = BootParams::new(&zp, GuestAddress(MEMMAP_ADDR));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(BootError::Params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_skips_the_legacy_hole_and_the_mmio_hole() {
        let mem = crate::memory::create(64).expect("mem");
        assert_eq!(
            e820(&mem),
            vec![(0, EBDA_START), (HIMEM_START, (64 << 20) - HIMEM_START)]
        );
    }

    #[test]
    fn cmdline_limits() {
        let mem = crate::memory::create(2).expect("mem");
        write_cmdline(&mem, "console=ttyS0").expect("ok");
        let mut b = [0u8; 14];
        mem.read_slice(&mut b, GuestAddress(CMDLINE_ADDR))
            .expect("read");
        assert_eq!(&b, b"console=ttyS0\0");
        assert!(matches!(
            write_cmdline(&mem, &"x".repeat(CMDLINE_MAX)),
            Err(BootError::Cmdline(_))
        ));
        assert!(matches!(
            write_cmdline(&mem, "a\0b"),
            Err(BootError::Cmdline(_))
        ));
    }

    #[test]
    fn initramfs_goes_to_the_top_of_ram_and_must_fit() {
        let mem = crate::memory::create(32).expect("mem");
        let dir = std::env::temp_dir().join(format!("pg-initrd-{}", std::process::id()));
        std::fs::write(&dir, vec![7u8; 5000]).expect("write");
        let mut f = File::open(&dir).expect("open");
        let (addr, size) = load_initramfs(&mem, &mut f, 0x100_0000).expect("load");
        assert_eq!(size, 5000);
        assert_eq!(addr % PAGE, 0);
        assert!(addr + size <= 32 << 20);
        let b: u8 = mem.read_obj(GuestAddress(addr + 4999)).expect("read");
        assert_eq!(b, 7);
        assert!(matches!(
            load_initramfs(&mem, &mut f, 0x1ff_f000),
            Err(BootError::InitramfsTooLarge(_))
        ));
        let _ = std::fs::remove_file(&dir);
    }

    #[test]
    fn a_non_elf_kernel_is_refused() {
        let mem = crate::memory::create(32).expect("mem");
        let path = std::env::temp_dir().join(format!("pg-kernel-{}", std::process::id()));
        std::fs::write(&path, b"not an elf").expect("write");
        let mut f = File::open(&path).expect("open");
        assert!(matches!(
            load(&mem, &mut f, None, "x"),
            Err(BootError::Kernel(_))
        ));
        let _ = std::fs::remove_file(&path);
    }
}
