//! One guest descriptor chain, checked as a whole, then read or written through virtio-queue's
//! [`Reader`] and [`Writer`].
//!
//! virtio-queue's `DescriptorChain` follows the `next` links (at most a queue size of them, and
//! one indirect table) and quietly stops at anything it cannot follow: a loop cut at the queue
//! size, an index past the table, an unreadable descriptor, a chain over 4 GiB. Its `Reader` takes
//! the chain's device-readable descriptors and its `Writer` the device-writable ones, each checking
//! that every buffer lies in guest memory, but both skip descriptors of the other direction. A
//! device must not answer a chain the driver did not mean, so [`reader`], [`writer`] and
//! [`request`] first walk a copy of the chain and refuse:
//! - a chain that does not end (the last descriptor read still has `NEXT`) or has no descriptor;
//! - more descriptors than the device's queue size (only an indirect table can hold more);
//! - a descriptor in the wrong direction, or a readable one after a writable one;
//!
//! then build the `Reader`/`Writer` (refusing buffers outside guest memory) and check its byte
//! count against the device's [`Limits`]. The `Reader`/`Writer` read the descriptors again: a
//! driver rewriting them in between changes only what its own request reads or writes, still
//! inside guest memory and within the byte limits, which are checked on the `Reader`/`Writer`
//! (only the descriptor count is not checked twice: virtio-queue bounds that second walk at the
//! queue size plus one indirect table).
//!
//! Indirect descriptors are followed by virtio-queue under the same checks although no device
//! offers `VIRTIO_RING_F_INDIRECT_DESC` (a driver may not use them then; one that does gets the
//! same validation as for a direct chain).

use virtio_queue::{DescriptorChain, Reader, Writer};

use crate::memory::GuestMemoryMmap;

/// What a device accepts of one chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most descriptors: the device's largest queue size.
    pub descriptors: usize,
    /// Fewest bytes the device must be able to read (or write).
    pub min_bytes: usize,
    /// Most bytes the device reads (or writes).
    pub max_bytes: usize,
}

impl Limits {
    /// Any length, at most `descriptors` descriptors.
    pub const fn descriptors(descriptors: usize) -> Self {
        Self {
            descriptors,
            min_bytes: 0,
            max_bytes: usize::MAX,
        }
    }

    fn check_bytes(&self, bytes: usize) -> Result<(), ChainError> {
        if bytes < self.min_bytes {
            Err(ChainError::TooShort(self.min_bytes))
        } else if bytes > self.max_bytes {
            Err(ChainError::TooBig(self.max_bytes))
        } else {
            Ok(())
        }
    }
}

/// Why a chain was refused.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// Not even the head descriptor could be read (the table is outside guest memory).
    #[error("descriptor table unreadable")]
    Unreadable,
    /// The last descriptor read links to one that cannot be followed: a loop (cut at the queue
    /// size), an index past the table, an unreadable descriptor or more than 4 GiB in total.
    #[error("descriptor chain does not end: {descriptors} descriptors, then next index {next}")]
    Unterminated {
        /// Descriptors read.
        descriptors: usize,
        /// The `next` index of the last one.
        next: u16,
    },
    /// More descriptors than the device's queue holds (through an indirect table).
    #[error("descriptor chain longer than {0} descriptors")]
    TooLong(usize),
    /// A device-writable descriptor in a chain the device only reads, or a read-only one in a
    /// chain it only writes.
    #[error("descriptor has the wrong direction")]
    Direction,
    /// A device-readable descriptor after a device-writable one (virtio 1.2 section 2.7.4.2).
    #[error("readable descriptor after a writable one")]
    Order,
    /// A buffer lies outside guest memory.
    #[error("buffer outside guest memory")]
    OutOfBounds(#[source] virtio_queue::Error),
    /// The buffers hold fewer bytes than the device needs.
    #[error("descriptor chain shorter than {0} bytes")]
    TooShort(usize),
    /// The buffers hold more bytes than the device accepts.
    #[error("descriptor chain longer than {0} bytes")]
    TooBig(usize),
}

/// The directions a chain's descriptors must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Every descriptor device-readable (a transmit queue).
    Readable,
    /// Every descriptor device-writable (a receive queue).
    Writable,
    /// Device-readable descriptors, then device-writable ones (a request and its answer).
    ReadThenWrite,
}

/// Walks a copy of `chain`: it must end, have at most `max` descriptors, and follow `layout`.
fn check(
    chain: &DescriptorChain<&GuestMemoryMmap>,
    layout: Layout,
    max: usize,
) -> Result<(), ChainError> {
    let mut count = 0usize;
    let mut writable_seen = false;
    let mut last = None;
    for desc in chain.clone() {
        count += 1;
        if count > max {
            return Err(ChainError::TooLong(max));
        }
        let writable = desc.is_write_only();
        match layout {
            Layout::Readable if writable => return Err(ChainError::Direction),
            Layout::Writable if !writable => return Err(ChainError::Direction),
            Layout::ReadThenWrite if writable_seen && !writable => return Err(ChainError::Order),
            _ => {}
        }
        writable_seen |= writable;
        last = Some(desc);
    }
    match last {
        None => Err(ChainError::Unreadable),
        Some(desc) if desc.has_next() => Err(ChainError::Unterminated {
            descriptors: count,
            next: desc.next(),
        }),
        Some(_) => Ok(()),
    }
}

/// A chain the device only reads (a transmit queue): every descriptor device-readable, in guest
/// memory, `limits` bytes in all.
///
/// # Errors
/// [`ChainError`] naming the first thing wrong with the chain.
pub fn reader<'a>(
    mem: &'a GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    limits: Limits,
) -> Result<Reader<'a>, ChainError> {
    check(&chain, Layout::Readable, limits.descriptors)?;
    let reader = Reader::new(mem, chain).map_err(ChainError::OutOfBounds)?;
    limits.check_bytes(reader.available_bytes())?;
    Ok(reader)
}

/// A chain the device only writes (a receive queue): every descriptor device-writable, in guest
/// memory, `limits` bytes in all.
///
/// # Errors
/// [`ChainError`] naming the first thing wrong with the chain.
pub fn writer<'a>(
    mem: &'a GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    limits: Limits,
) -> Result<Writer<'a>, ChainError> {
    check(&chain, Layout::Writable, limits.descriptors)?;
    let writer = Writer::new(mem, chain).map_err(ChainError::OutOfBounds)?;
    limits.check_bytes(writer.available_bytes())?;
    Ok(writer)
}

/// A request chain: device-readable descriptors (the request) then device-writable ones (the
/// answer), all in guest memory, at most `descriptors` of them. Either part may be empty.
///
/// # Errors
/// [`ChainError`] naming the first thing wrong with the chain.
pub fn request<'a>(
    mem: &'a GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    descriptors: usize,
) -> Result<(Reader<'a>, Writer<'a>), ChainError> {
    check(&chain, Layout::ReadThenWrite, descriptors)?;
    let reader = Reader::new(mem, chain.clone()).map_err(ChainError::OutOfBounds)?;
    let writer = Writer::new(mem, chain).map_err(ChainError::OutOfBounds)?;
    Ok((reader, writer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{chain_at, raw, INDIRECT, NEXT, WRITE};
    use std::io::{Read, Write};
    use virtio_queue::mock::{DescriptorTable, MockSplitQueue};
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress};

    const SIZE: u16 = 16;
    const ANY: Limits = Limits::descriptors(16);

    fn mem() -> GuestMemoryMmap {
        crate::memory::create(2).expect("memory")
    }

    #[test]
    fn good_chains_are_read_and_written_across_descriptors() {
        let mem = mem();
        let q = MockSplitQueue::new(&mem, SIZE);
        let descs = [
            raw(0x1_0000, 4, NEXT, 2),
            raw(0, 0, 0, 0),
            raw(0x2_0000, 6, 0, 0),
        ];
        mem.write_slice(b"abcd", GuestAddress(0x1_0000)).expect("w");
        mem.write_slice(b"efghij", GuestAddress(0x2_0000))
            .expect("w");
        let mut r = reader(&mem, chain_at(&mem, &q, &descs), ANY).expect("reader");
        assert_eq!(r.available_bytes(), 10);
        let mut got = [0u8; 10];
        r.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"abcdefghij");

        let descs = [
            raw(0x3_0000, 3, NEXT | WRITE, 1),
            raw(0x4_0000, 100, WRITE, 0),
        ];
        let mut w = writer(&mem, chain_at(&mem, &q, &descs), ANY).expect("writer");
        assert_eq!(w.available_bytes(), 103);
        w.write_all(b"hello").expect("write");
        let mut got = [0u8; 3];
        mem.read_slice(&mut got, GuestAddress(0x3_0000)).expect("r");
        assert_eq!(&got, b"hel");
        mem.read_slice(&mut got[..2], GuestAddress(0x4_0000))
            .expect("r");
        assert_eq!(&got[..2], b"lo");
        assert!(w.write_all(&[0; 99]).is_err(), "past the chain's end");
    }

    #[test]
    fn bad_chains_are_refused() {
        let mem = mem();
        let end = 2u64 << 20;
        let tx = |descs: &[_], limits| {
            let q = MockSplitQueue::new(&mem, SIZE);
            reader(&mem, chain_at(&mem, &q, descs), limits).err()
        };
        // A loop: 0 -> 1 -> 0, cut at the queue size.
        let looped = tx(&[raw(0x1_0000, 4, NEXT, 1), raw(0x1_0000, 4, NEXT, 0)], ANY);
        assert!(matches!(
            looped,
            Some(ChainError::Unterminated {
                descriptors: 16,
                next: 0
            })
        ));
        // Next index past the table.
        let past = tx(&[raw(0x1_0000, 4, NEXT, 99)], ANY);
        assert!(matches!(
            past,
            Some(ChainError::Unterminated {
                descriptors: 1,
                next: 99
            })
        ));
        // Device-writable in a chain the device reads.
        let wrong = tx(
            &[raw(0x1_0000, 4, NEXT, 1), raw(0x1_0000, 4, WRITE, 0)],
            ANY,
        );
        assert!(matches!(wrong, Some(ChainError::Direction)));
        // Straddling the end of RAM; far outside it.
        let oob = tx(&[raw(end - 2, 4, 0, 0)], ANY);
        assert!(matches!(oob, Some(ChainError::OutOfBounds(_))));
        let oob = tx(&[raw(u64::MAX - 8, 512, 0, 0)], ANY);
        assert!(matches!(oob, Some(ChainError::OutOfBounds(_))));
        // Too big and too short in total.
        let limits = Limits {
            min_bytes: 12,
            max_bytes: 100,
            ..ANY
        };
        let big = tx(
            &[raw(0x1_0000, 60, NEXT, 1), raw(0x2_0000, 60, 0, 0)],
            limits,
        );
        assert!(matches!(big, Some(ChainError::TooBig(100))));
        let short = tx(&[raw(0x1_0000, 6, NEXT, 1), raw(0x2_0000, 5, 0, 0)], limits);
        assert!(matches!(short, Some(ChainError::TooShort(12))));
        // A read-only descriptor in a chain the device writes.
        let q = MockSplitQueue::new(&mem, SIZE);
        let ro = writer(&mem, chain_at(&mem, &q, &[raw(0x1_0000, 4, 0, 0)]), ANY);
        assert!(matches!(ro, Err(ChainError::Direction)));
    }

    #[test]
    fn buffers_may_span_adjacent_memory_regions() {
        // Two regions back to back (two mappings in this process): one buffer across both.
        let ranges = [
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x1_0000), 0x1_0000),
        ];
        let mem = GuestMemoryMmap::from_ranges(&ranges).expect("memory");
        let q = MockSplitQueue::new(&mem, SIZE);
        let descs = [raw(0xfff8, 16, WRITE, 0)];
        let mut w = writer(&mem, chain_at(&mem, &q, &descs), ANY).expect("writer");
        w.write_all(b"0123456789abcdef").expect("write");
        let mut got = [0u8; 16];
        mem.read_slice(&mut got, GuestAddress(0xfff8)).expect("r");
        assert_eq!(&got, b"0123456789abcdef");
        let descs = [raw(0xfff8, 16, 0, 0)];
        let mut r = reader(&mem, chain_at(&mem, &q, &descs), ANY).expect("reader");
        let mut back = [0u8; 16];
        r.read_exact(&mut back).expect("read");
        assert_eq!(back, got);
    }

    #[test]
    fn an_unreadable_descriptor_table_is_refused() {
        let mem = mem();
        let q = MockSplitQueue::new(&mem, SIZE);
        q.add_desc_chains(&[raw(0x1_0000, 4, 0, 0)], 0)
            .expect("chain");
        let mut queue: Queue = q.create_queue().expect("queue");
        // The rings stay readable; the table moves past the end of RAM.
        queue
            .try_set_desc_table_address(GuestAddress(2 << 20))
            .expect("aligned");
        let chain = queue.pop_descriptor_chain(&mem).expect("chain");
        assert!(matches!(
            reader(&mem, chain, ANY),
            Err(ChainError::Unreadable)
        ));
    }

    #[test]
    fn requests_are_readable_then_writable() {
        let mem = mem();
        let q = MockSplitQueue::new(&mem, SIZE);
        let descs = [
            raw(0x1_0000, 16, NEXT, 1),
            raw(0x2_0000, 512, NEXT | WRITE, 2),
            raw(0x3_0000, 1, WRITE, 0),
        ];
        let (r, w) = request(&mem, chain_at(&mem, &q, &descs), 16).expect("request");
        assert_eq!((r.available_bytes(), w.available_bytes()), (16, 513));
        let only_writable = [raw(0x3_0000, 1, WRITE, 0)];
        let (r, w) = request(&mem, chain_at(&mem, &q, &only_writable), 16).expect("request");
        assert_eq!((r.available_bytes(), w.available_bytes()), (0, 1));
        let disordered = [raw(0x3_0000, 1, NEXT | WRITE, 1), raw(0x1_0000, 16, 0, 0)];
        let err = request(&mem, chain_at(&mem, &q, &disordered), 16).err();
        assert!(matches!(err, Some(ChainError::Order)));
        let oob = [raw(0x1_0000, 16, NEXT, 1), raw(0x1f_ff00, 0x200, WRITE, 0)];
        let err = request(&mem, chain_at(&mem, &q, &oob), 16).err();
        assert!(matches!(err, Some(ChainError::OutOfBounds(_))));
    }

    #[test]
    fn indirect_tables_get_the_same_checks() {
        let mem = mem();
        let q = MockSplitQueue::new(&mem, SIZE);
        let table_at = 0x8_0000;
        let table = DescriptorTable::new(&mem, GuestAddress(table_at), 32);
        let head = |entries: u32| [raw(table_at, entries * 16, INDIRECT, 0)];
        // Two readable entries: read like a direct chain.
        table.store(0, raw(0x1_0000, 3, NEXT, 1)).expect("store");
        table.store(1, raw(0x2_0000, 2, 0, 0)).expect("store");
        mem.write_slice(b"abc", GuestAddress(0x1_0000)).expect("w");
        mem.write_slice(b"de", GuestAddress(0x2_0000)).expect("w");
        let mut r = reader(&mem, chain_at(&mem, &q, &head(2)), ANY).expect("indirect");
        let mut got = [0u8; 5];
        r.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"abcde");
        // A writable entry in a chain the device reads.
        table.store(1, raw(0x2_0000, 2, WRITE, 0)).expect("store");
        let err = reader(&mem, chain_at(&mem, &q, &head(2)), ANY).err();
        assert!(matches!(err, Some(ChainError::Direction)));
        // More entries than the device's queue size.
        for i in 0..32u16 {
            let next = if i == 31 { 0 } else { NEXT };
            table
                .store(i, raw(0x1_0000, 1, next, i + 1))
                .expect("store");
        }
        let err = reader(&mem, chain_at(&mem, &q, &head(32)), ANY).err();
        assert!(matches!(err, Some(ChainError::TooLong(16))));
        // An indirect entry inside an indirect table ends the walk: refused as unterminated.
        table.store(0, raw(0x1_0000, 1, NEXT, 1)).expect("store");
        table
            .store(1, raw(table_at, 32, INDIRECT, 0))
            .expect("store");
        let err = reader(&mem, chain_at(&mem, &q, &head(2)), ANY).err();
        assert!(matches!(
            err,
            Some(ChainError::Unterminated { descriptors: 1, .. })
        ));
    }
}
