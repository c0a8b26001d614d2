//! A 200-byte PVH "kernel" whose first instruction writes `!` to COM1: booted by both VMMs, the
//! time from exec to that byte on the console is exec to the first guest instruction (plus one
//! port-I/O exit), free of any guest boot work.

/// Guest-physical load address (1 MiB, above the legacy hole).
const LOAD: u64 = 0x10_0000;
const EHDR: usize = 64;
const EHDR16: u16 = 64;
const PHDR16: u16 = 56;
const PHDR: usize = 56;
const CODE_OFF: usize = EHDR + 2 * PHDR;
/// 32-bit protected mode: mov dx,0x3f8; mov al,'!'; out dx,al; then hlt forever.
const CODE: [u8; 10] = [0x66, 0xba, 0xf8, 0x03, 0xb0, b'!', 0xee, 0xf4, 0xeb, 0xfd];
const NOTE_OFF: usize = CODE_OFF + 16;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// The ELF image.
pub fn image() -> Vec<u8> {
    let entry = LOAD + CODE_OFF as u64;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // namesz
    note.extend_from_slice(&4u32.to_le_bytes()); // descsz
    note.extend_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&u32::try_from(entry).unwrap_or(0).to_le_bytes());
    let total = NOTE_OFF + note.len();

    let mut f = Vec::with_capacity(total);
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&entry.to_le_bytes());
    f.extend_from_slice(&(EHDR as u64).to_le_bytes()); // phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // flags
    f.extend_from_slice(&EHDR16.to_le_bytes());
    f.extend_from_slice(&PHDR16.to_le_bytes());
    f.extend_from_slice(&2u16.to_le_bytes()); // phnum
    f.extend_from_slice(&[0; 6]); // shentsize, shnum, shstrndx
    let phdr =
        |f: &mut Vec<u8>, kind: u32, flags: u32, off: u64, addr: u64, size: u64, align: u64| {
            f.extend_from_slice(&kind.to_le_bytes());
            f.extend_from_slice(&flags.to_le_bytes());
            f.extend_from_slice(&off.to_le_bytes());
            f.extend_from_slice(&addr.to_le_bytes());
            f.extend_from_slice(&addr.to_le_bytes());
            f.extend_from_slice(&size.to_le_bytes());
            f.extend_from_slice(&size.to_le_bytes());
            f.extend_from_slice(&align.to_le_bytes());
        };
    let total64 = total as u64;
    phdr(&mut f, 1, 5, 0, LOAD, total64, 0x1000); // PT_LOAD, R+X
    phdr(
        &mut f,
        4,
        4,
        NOTE_OFF as u64,
        LOAD + NOTE_OFF as u64,
        note.len() as u64,
        4,
    ); // PT_NOTE
    f.extend_from_slice(&CODE);
    f.resize(NOTE_OFF, 0);
    f.extend_from_slice(&note);
    f
}
