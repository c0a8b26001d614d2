//! Walking one descriptor chain the guest offered, distrusting every field of it.
//!
//! A split-ring chain is a linked list through the descriptor table (`next` index plus the NEXT
//! flag). The walk is bounded by the queue size (a longer walk means a loop), refuses indirect
//! descriptors (`VIRTIO_RING_F_INDIRECT_DESC` is not offered), checks every buffer lies in guest
//! memory and has the direction the queue needs, and bounds the total length. Only a chain that
//! passes as a whole is used.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::memory::GuestMemoryMmap;

/// `VRING_DESC_F_INDIRECT`.
const VRING_DESC_F_INDIRECT: u16 = 4;

/// Why a chain was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// More descriptors than the queue has: a loop.
    #[error("descriptor chain loops")]
    TooLong,
    /// A descriptor index past the table.
    #[error("descriptor index {0} outside the table")]
    Index(u16),
    /// An indirect descriptor, never negotiated.
    #[error("indirect descriptor without the feature")]
    Indirect,
    /// A buffer the device may not read (tx) or write (rx).
    #[error("descriptor has the wrong direction")]
    Direction,
    /// A buffer outside guest memory.
    #[error("buffer at {0:#x} outside guest memory")]
    OutOfBounds(u64),
    /// The descriptor table itself is unreadable.
    #[error("descriptor table unreadable")]
    Table,
    /// The buffers add up to more than the device accepts.
    #[error("chain longer than {0} bytes")]
    TooBig(usize),
    /// The buffers cannot even hold the vnet header.
    #[error("chain shorter than the vnet header")]
    TooShort,
}

/// One guest buffer of a validated chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: usize,
}

/// A validated chain: its buffers and their total length.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Chain {
    /// Buffers in chain order.
    pub segments: Vec<Segment>,
    /// Sum of the buffer lengths.
    pub total: usize,
}

/// Walks the chain at `head` of the table at `table` with `size` entries; every buffer must be
/// device-writable (`writable`) or device-readable, the total at most `max_total`.
pub fn walk(
    mem: &GuestMemoryMmap,
    table: GuestAddress,
    size: u16,
    head: u16,
    writable: bool,
    max_total: usize,
) -> Result<Chain, ChainError> {
    let mut chain = Chain::default();
    let mut index = head;
    for _ in 0..size {
        if index >= size {
            return Err(ChainError::Index(index));
        }
        let at = table
            .checked_add(u64::from(index) * 16)
            .ok_or(ChainError::Table)?;
        let desc: Descriptor = mem.read_obj(at).map_err(|_| ChainError::Table)?;
        if desc.flags() & VRING_DESC_F_INDIRECT != 0 {
            return Err(ChainError::Indirect);
        }
        if desc.is_write_only() != writable {
            return Err(ChainError::Direction);
        }
        let len = usize::try_from(desc.len()).map_err(|_| ChainError::TooBig(max_total))?;
        if !mem.check_range(desc.addr(), len) {
            return Err(ChainError::OutOfBounds(desc.addr().raw_value()));
        }
        chain.total = chain
            .total
            .checked_add(len)
            .filter(|&t| t <= max_total)
            .ok_or(ChainError::TooBig(max_total))?;
        chain.segments.push(Segment {
            addr: desc.addr(),
            len,
        });
        if !desc.has_next() {
            return Ok(chain);
        }
        index = desc.next();
    }
    Err(ChainError::TooLong)
}

/// Copies the chain's bytes (device-readable) into one buffer.
pub fn gather(mem: &GuestMemoryMmap, chain: &Chain) -> Result<Vec<u8>, ChainError> {
    let mut out = vec![0u8; chain.total];
    let mut at = 0;
    for seg in &chain.segments {
        let dst = out
            .get_mut(at..at + seg.len)
            .ok_or(ChainError::TooBig(chain.total))?;
        mem.read_slice(dst, seg.addr)
            .map_err(|_| ChainError::OutOfBounds(seg.addr.raw_value()))?;
        at += seg.len;
    }
    Ok(out)
}

/// Copies `data` into the chain's (device-writable) buffers; the chain must be large enough.
pub fn scatter(mem: &GuestMemoryMmap, chain: &Chain, data: &[u8]) -> Result<(), ChainError> {
    if data.len() > chain.total {
        return Err(ChainError::TooBig(chain.total));
    }
    let mut rest = data;
    for seg in &chain.segments {
        if rest.is_empty() {
            break;
        }
        let n = seg.len.min(rest.len());
        let (now, later) = rest.split_at(n);
        mem.write_slice(now, seg.addr)
            .map_err(|_| ChainError::OutOfBounds(seg.addr.raw_value()))?;
        rest = later;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    /// addr, len, flags, next.
    type RawDesc = (u64, u32, u16, u16);

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    fn table<'a>(
        mem: &'a GuestMemoryMmap,
        descs: &[RawDesc],
    ) -> MockSplitQueue<'a, GuestMemoryMmap> {
        let q = MockSplitQueue::new(mem, 16);
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let d = Descriptor::new(addr, len, flags, next);
            q.desc_table()
                .store(u16::try_from(i).expect("index"), RawDescriptor::from(d))
                .expect("store");
        }
        q
    }

    fn mem() -> GuestMemoryMmap {
        crate::memory::create(2).expect("memory")
    }

    #[test]
    fn good_chain_is_walked_and_copied_both_ways() {
        let mem = mem();
        let q = table(
            &mem,
            &[(0x1_0000, 4, NEXT, 2), (0, 0, 0, 0), (0x2_0000, 6, 0, 0)],
        );
        let chain = walk(&mem, q.desc_table_addr(), 16, 0, false, 100).expect("chain");
        assert_eq!(chain.total, 10);
        assert_eq!(chain.segments.len(), 2);
        mem.write_slice(b"abcd", GuestAddress(0x1_0000)).expect("w");
        mem.write_slice(b"efghij", GuestAddress(0x2_0000))
            .expect("w");
        assert_eq!(gather(&mem, &chain).expect("gather"), b"abcdefghij");

        let q = table(
            &mem,
            &[(0x3_0000, 3, NEXT | WRITE, 1), (0x4_0000, 100, WRITE, 0)],
        );
        let chain = walk(&mem, q.desc_table_addr(), 16, 0, true, usize::MAX).expect("chain");
        scatter(&mem, &chain, b"hello").expect("scatter");
        let mut got = [0u8; 3];
        mem.read_slice(&mut got, GuestAddress(0x3_0000)).expect("r");
        assert_eq!(&got, b"hel");
        mem.read_slice(&mut got[..2], GuestAddress(0x4_0000))
            .expect("r");
        assert_eq!(&got[..2], b"lo");
        assert_eq!(
            scatter(&mem, &chain, &[0; 104]),
            Err(ChainError::TooBig(103))
        );
    }

    #[test]
    fn bad_chains_are_refused() {
        let mem = mem();
        let end = 2u64 << 20;
        let cases: [(&[RawDesc], ChainError); 6] = [
            // A loop: 0 -> 1 -> 0.
            (
                &[(0x1_0000, 4, NEXT, 1), (0x1_0000, 4, NEXT, 0)],
                ChainError::TooLong,
            ),
            // Next index past the table.
            (&[(0x1_0000, 4, NEXT, 99)], ChainError::Index(99)),
            // Indirect.
            (
                &[(0x1_0000, 32, VRING_DESC_F_INDIRECT, 0)],
                ChainError::Indirect,
            ),
            // Device-writable in a tx chain.
            (
                &[(0x1_0000, 4, NEXT, 1), (0x1_0000, 4, WRITE, 0)],
                ChainError::Direction,
            ),
            // Straddling the end of RAM.
            (&[(end - 2, 4, 0, 0)], ChainError::OutOfBounds(end - 2)),
            // Too big in total.
            (
                &[(0x1_0000, 60, NEXT, 1), (0x2_0000, 60, 0, 0)],
                ChainError::TooBig(100),
            ),
        ];
        for (descs, want) in cases {
            let q = table(&mem, descs);
            assert_eq!(
                walk(&mem, q.desc_table_addr(), 16, 0, false, 100),
                Err(want)
            );
        }
        // A head index past the table.
        let q = table(&mem, &[(0x1_0000, 4, 0, 0)]);
        assert_eq!(
            walk(&mem, q.desc_table_addr(), 16, 16, false, 100),
            Err(ChainError::Index(16))
        );
        // A descriptor table outside memory.
        assert_eq!(
            walk(&mem, GuestAddress(end), 16, 0, false, 100),
            Err(ChainError::Table)
        );
    }
}
