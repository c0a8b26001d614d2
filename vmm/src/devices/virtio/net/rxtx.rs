//! Moving frames between the tap and the two virtqueues.
//!
//! Receive: the guest posts device-writable chains on the rx queue. A frame is read from the tap
//! only once a chain is in hand, so when the guest has no buffers the frame simply stays queued in
//! the tap (the kernel bounds and drops there) and the caller stops watching the tap until the
//! guest kicks the rx queue. Transmit: each device-readable chain is one frame, header included,
//! copied into the device's transmit buffer and written to the tap in one go. Chains are checked
//! whole and copied through virtio-queue's `Reader`/`Writer` ([`chain`]). Each pass handles at
//! most one queue's worth of chains.

use std::fmt::Display;
use std::io::{Read, Write};
use std::mem::offset_of;

use virtio_bindings::virtio_net::virtio_net_hdr_v1;
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::tap::{TapBackend, VNET_HDR_LEN};
use super::{NetError, QUEUE_SIZE};
use crate::devices::virtio::chain::{self, Limits};
use crate::devices::virtio::GuestErrors;
use crate::memory::GuestMemoryMmap;

/// Largest frame a tx chain may carry: 64 KiB plus the vnet header.
pub const MAX_TX_LEN: usize = VNET_HDR_LEN + 65536;
/// Size of the host buffer a frame is read into (the largest tap frame plus header).
pub const RX_BUF_LEN: usize = VNET_HDR_LEN + 65535;
/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = offset_of!(virtio_net_hdr_v1, num_buffers);
/// A tx chain: one frame with its vnet header.
const TX_LIMITS: Limits = Limits {
    descriptors: QUEUE_SIZE as usize,
    min_bytes: VNET_HDR_LEN,
    max_bytes: MAX_TX_LEN,
};
/// An rx chain: any size (a frame that does not fit is dropped and the chain kept).
const RX_LIMITS: Limits = Limits::descriptors(QUEUE_SIZE as usize);

/// Device counters, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Frames read from the tap and dropped (too big for the guest's buffer, or runt).
    pub rx_dropped: u64,
    /// Frames written to the tap.
    pub tx_frames: u64,
    /// Tx frames the tap refused.
    pub tx_dropped: u64,
    /// Malformed chains returned unused to the guest.
    pub bad_chains: GuestErrors,
}

/// Why an rx pass ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxOutcome {
    /// The guest has no rx buffer: stop watching the tap until it kicks the rx queue.
    NoBuffers,
    /// Nothing more to read from the tap.
    TapEmpty,
    /// A queue's worth of chains handled; the tap may still be readable.
    Budget,
}

/// One rx pass; returns why it ended and whether used entries were added.
///
/// # Errors
/// [`NetError`] when the tap fails or the used ring cannot be written: the device stops.
pub fn receive(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    tap: &mut dyn TapBackend,
    buf: &mut [u8],
    stats: &mut NetStats,
) -> Result<(RxOutcome, bool), NetError> {
    let mut used = false;
    for _ in 0..queue.size() {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            return Ok((RxOutcome::NoBuffers, used));
        };
        let head = chain.head_index();
        let mut writer = match chain::writer(mem, chain, RX_LIMITS) {
            Ok(writer) => writer,
            Err(e) => {
                bad_chain(queue, mem, head, &e, stats)?;
                used = true;
                continue;
            }
        };
        let len = match tap.read_frame(buf) {
            Ok(len) => len,
            Err(e) => {
                queue.go_to_previous_position();
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    return Ok((RxOutcome::TapEmpty, used));
                }
                return Err(NetError::TapRead(e));
            }
        };
        let room = writer.available_bytes();
        if len < VNET_HDR_LEN || len > room {
            // The chain stays available for the next frame.
            queue.go_to_previous_position();
            stats.rx_dropped += 1;
            tracing::debug!(len, room, "dropping a received frame");
            continue;
        }
        // The tap never returns more than the buffer holds.
        let frame = buf.get_mut(..len).ok_or(NetError::FrameSize)?;
        frame[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
        if let Err(e) = writer.write_all(frame) {
            bad_chain(queue, mem, head, &e, stats)?;
            used = true;
            continue;
        }
        let written = u32::try_from(len).map_err(|_| NetError::FrameSize)?;
        queue
            .add_used(mem, head, written)
            .map_err(NetError::Queue)?;
        stats.rx_frames += 1;
        used = true;
    }
    Ok((RxOutcome::Budget, used))
}

/// One tx pass, each frame copied into `buf` (at least [`MAX_TX_LEN`] bytes); returns whether
/// chains remain (budget exhausted) and whether used entries were added.
///
/// # Errors
/// [`NetError`] when the used ring cannot be written: the device stops.
pub fn transmit(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    tap: &mut dyn TapBackend,
    buf: &mut [u8],
    stats: &mut NetStats,
) -> Result<(bool, bool), NetError> {
    let mut used = false;
    for _ in 0..queue.size() {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            return Ok((false, used));
        };
        let head = chain.head_index();
        used = true;
        let mut reader = match chain::reader(mem, chain, TX_LIMITS) {
            Ok(reader) => reader,
            Err(e) => {
                bad_chain(queue, mem, head, &e, stats)?;
                continue;
            }
        };
        // At most MAX_TX_LEN bytes (TX_LIMITS).
        let frame = buf.get_mut(..reader.available_bytes());
        let Some(frame) = frame else {
            bad_chain(queue, mem, head, &"frame larger than the buffer", stats)?;
            continue;
        };
        if let Err(e) = reader.read_exact(frame) {
            bad_chain(queue, mem, head, &e, stats)?;
            continue;
        }
        match tap.write_frame(frame) {
            Ok(_) => stats.tx_frames += 1,
            Err(e) => {
                stats.tx_dropped += 1;
                tracing::debug!(error = %e, "tap refused a frame");
            }
        }
        queue.add_used(mem, head, 0).map_err(NetError::Queue)?;
    }
    Ok((true, used))
}

/// Returns a malformed chain to the guest unused and counts it (logging only some).
fn bad_chain(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    err: &dyn Display,
    stats: &mut NetStats,
) -> Result<(), NetError> {
    if stats
        .bad_chains
        .record(&crate::metrics::METRICS.guest_errors.net)
    {
        let count = stats.bad_chains.count();
        tracing::warn!(error = %err, head, count, "virtio-net: malformed descriptor chain");
    }
    if head >= queue.size() {
        // An available entry naming no descriptor: there is nothing the used ring could return
        // (virtio-queue refuses the index), and refusing it must not stop the device.
        return Ok(());
    }
    queue.add_used(mem, head, 0).map_err(NetError::Queue)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::net::test_utils::{pair, Driver};
    use vm_memory::{Address, Bytes, GuestAddress};

    fn tx_buf() -> Vec<u8> {
        vec![0u8; MAX_TX_LEN]
    }

    fn frame(payload_len: usize) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f[NUM_BUFFERS_OFFSET] = 0xee; // garbage the device must overwrite on rx
        f.extend((0..payload_len).map(|i| u8::try_from(i % 251).expect("byte")));
        f
    }

    #[test]
    fn tx_frame_is_gathered_and_written() {
        let mem = crate::memory::create(4).expect("memory");
        let mut guest = Driver::new(&mem, 0x1_0000, 16);
        let f = frame(60);
        mem.write_slice(&f[..12], GuestAddress(0x10_0000))
            .expect("w");
        mem.write_slice(&f[12..], GuestAddress(0x11_0000))
            .expect("w");
        guest.add(&[(0x10_0000, 12, false), (0x11_0000, 60, false)]);
        let (mut tap, host) = pair();
        let mut queue = guest.queue();
        let mut stats = NetStats::default();
        let res = transmit(&mut queue, &mem, &mut tap, &mut tx_buf(), &mut stats).expect("tx");
        assert_eq!(res, (false, true));
        let mut got = vec![0u8; 200];
        let n = host.recv(&mut got).expect("frame on the tap");
        assert_eq!(&got[..n], &f[..]);
        assert_eq!(guest.used_idx(&mem), 1);
        assert_eq!(guest.used(&mem, 0), (0, 0));
        assert_eq!(stats.tx_frames, 1);
    }

    #[test]
    fn tx_frames_reuse_one_buffer() {
        let mem = crate::memory::create(4).expect("memory");
        let mut guest = Driver::new(&mem, 0x1_0000, 16);
        mem.write_slice(&[1u8; 74], GuestAddress(0x10_0000))
            .expect("w");
        mem.write_slice(&[2u8; 20], GuestAddress(0x11_0000))
            .expect("w");
        guest.add(&[(0x10_0000, 74, false)]);
        guest.add(&[(0x11_0000, 8, false), (0x11_0008, 12, false)]);
        let (mut tap, host) = pair();
        let mut queue = guest.queue();
        let mut stats = NetStats::default();
        let mut buf = tx_buf();
        transmit(&mut queue, &mem, &mut tap, &mut buf, &mut stats).expect("tx");
        let mut got = [0u8; 200];
        assert_eq!(host.recv(&mut got).expect("first"), 74);
        assert_eq!(got[..74], [1u8; 74]);
        let n = host.recv(&mut got).expect("second");
        assert_eq!(got[..n], [2u8; 20], "only the second frame's bytes");
        assert_eq!(stats.tx_frames, 2);
    }

    #[test]
    fn malformed_tx_chains_are_returned_unsent() {
        let mem = crate::memory::create(4).expect("memory");
        let mut guest = Driver::new(&mem, 0x1_0000, 16);
        let too_big = u32::try_from(MAX_TX_LEN + 1).expect("len");
        guest.add(&[(0x10_0000, 12, false), (0x11_0000, 60, true)]); // writable in tx
        guest.add(&[(0x10_0000, too_big, false)]); // over 64 KiB + header
        guest.add(&[(0x10_0000, 8, false)]); // shorter than the header
        guest.add(&[(4 << 20, 64, false)]); // outside RAM
        let (mut tap, host) = pair();
        let mut queue = guest.queue();
        let mut stats = NetStats::default();
        transmit(&mut queue, &mem, &mut tap, &mut tx_buf(), &mut stats).expect("tx");
        assert_eq!(stats.bad_chains.count(), 4);
        assert_eq!(stats.tx_frames, 0);
        assert_eq!(guest.used_idx(&mem), 4);
        let mut got = [0u8; 16];
        assert_eq!(
            host.recv(&mut got).expect_err("nothing sent").kind(),
            std::io::ErrorKind::WouldBlock
        );
    }

    /// Found by the `virtio_net` fuzz target: an available entry with a head index past the
    /// descriptor table made `add_used` fail, which stopped the device for good.
    #[test]
    fn out_of_range_head_index_is_skipped_not_fatal() {
        let mem = crate::memory::create(4).expect("memory");
        let mut guest = Driver::new(&mem, 0x1_0000, 16);
        guest.add(&[(0x10_0000, 74, false)]);
        guest.add(&[(0x12_0000, 2048, true)]);
        // Both available entries now name descriptor 999 of a 16-entry table.
        let ring = guest.q.avail_addr().unchecked_add(4);
        mem.write_obj(999u16, ring).expect("w");
        mem.write_obj(999u16, ring.unchecked_add(2)).expect("w");
        let (mut tap, host) = pair();
        let mut stats = NetStats::default();
        let mut queue = guest.queue();
        transmit(&mut queue, &mem, &mut tap, &mut tx_buf(), &mut stats).expect("tx survives");
        let mut queue = guest.queue();
        host.send(&frame(10)).expect("send");
        let mut buf = vec![0u8; RX_BUF_LEN];
        receive(&mut queue, &mem, &mut tap, &mut buf, &mut stats).expect("rx survives");
        assert_eq!(
            stats.bad_chains.count(),
            4,
            "two entries, seen by tx and rx"
        );
        assert_eq!(guest.used_idx(&mem), 0, "nothing returnable");
        // The next good chain is served.
        guest.add(&[(0x14_0000, 2048, true)]);
        receive(&mut queue, &mem, &mut tap, &mut buf, &mut stats).expect("rx");
        assert_eq!(stats.rx_frames, 1);
    }

    #[test]
    fn rx_frame_fills_a_buffer_with_num_buffers_set() {
        let mem = crate::memory::create(4).expect("memory");
        let mut guest = Driver::new(&mem, 0x1_0000, 16);
        guest.add(&[(0x10_0000, 8, true), (0x11_0000, 2048, true)]);
        guest.add(&[(0x12_0000, 2048, true)]);
        let (mut tap, host) = pair();
        let f = frame(100);
        host.send(&f).expect("send");
        let mut queue = guest.queue();
        let mut stats = NetStats::default();
        let mut buf = vec![0u8; RX_BUF_LEN];
        let res = receive(&mut queue, &mem, &mut tap, &mut buf, &mut stats).expect("rx");
        assert_eq!(res, (RxOutcome::TapEmpty, true));
        assert_eq!(guest.used_idx(&mem), 1);
        assert_eq!(guest.used(&mem, 0), (0, 112));
        let mut got = [0u8; 112];
        mem.read_slice(&mut got[..8], GuestAddress(0x10_0000))
            .expect("r");
        mem.read_slice(&mut got[8..], GuestAddress(0x11_0000))
            .expect("r");
        assert_eq!(&got[NUM_BUFFERS_OFFSET..12], &[1, 0]);
        assert_eq!(&got[12..], &f[12..]);
        assert_eq!(stats.rx_frames, 1);
    }

    #[test]
    fn rx_without_buffers_leaves_the_frame_in_the_tap() {
        let mem = crate::memory::create(4).expect("memory");
        let guest = Driver::new(&mem, 0x1_0000, 16);
        let (mut tap, host) = pair();
        host.send(&frame(40)).expect("send");
        let mut queue = guest.queue();
        let mut stats = NetStats::default();
        let mut buf = vec![0u8; RX_BUF_LEN];
        let res = receive(&mut queue, &mem, &mut tap, &mut buf, &mut stats).expect("rx");
        assert_eq!(res, (RxOutcome::NoBuffers, false));
        assert_eq!(stats, NetStats::default());
        // Still pending on the tap.
        assert_eq!(tap.read_frame(&mut buf).expect("pending"), 52);
    }

    #[test]
    fn rx_drops_frames_too_big_and_skips_bad_chains() {
        let mem = crate::memory::create(4).expect("memory");
        let mut guest = Driver::new(&mem, 0x1_0000, 16);
        guest.add(&[(0x10_0000, 64, false)]); // read-only: malformed for rx
        guest.add(&[(0x11_0000, 40, true)]); // room for 40 bytes
        let (mut tap, host) = pair();
        host.send(&frame(100)).expect("send"); // 112 bytes: too big, dropped
        host.send(&frame(20)).expect("send"); // 32 bytes: fits the same chain
        let mut queue = guest.queue();
        let mut stats = NetStats::default();
        let mut buf = vec![0u8; RX_BUF_LEN];
        let res = receive(&mut queue, &mem, &mut tap, &mut buf, &mut stats).expect("rx");
        assert_eq!(res, (RxOutcome::NoBuffers, true));
        assert_eq!(stats.bad_chains.count(), 1);
        assert_eq!(stats.rx_dropped, 1);
        assert_eq!(stats.rx_frames, 1);
        assert_eq!(guest.used(&mem, 0), (0, 0));
        assert_eq!(guest.used(&mem, 1), (1, 32));
    }
}
