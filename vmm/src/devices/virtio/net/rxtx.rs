//! Moving frames between the tap and the two virtqueues.
//!
//! Receive: the guest posts device-writable chains on the rx queue. A frame is read from the tap
//! only once a chain is in hand, so when the guest has no buffers the frame simply stays queued in
//! the tap (the kernel bounds and drops there) and the caller stops watching the tap until the
//! guest kicks the rx queue. Transmit: each device-readable chain is one frame, header included,
//! written to the tap in one go. Each pass handles at most one queue's worth of chains.

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestAddress;

use super::chain::{self, ChainError};
use super::tap::{TapBackend, VNET_HDR_LEN};
use super::NetError;
use crate::memory::GuestMemoryMmap;

/// Largest frame a tx chain may carry: 64 KiB plus the vnet header.
pub const MAX_TX_LEN: usize = VNET_HDR_LEN + 65536;
/// Size of the host buffer a frame is read into (the largest tap frame plus header).
pub const RX_BUF_LEN: usize = VNET_HDR_LEN + 65535;
/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;

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
    pub bad_chains: u64,
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
pub fn receive(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    tap: &mut dyn TapBackend,
    buf: &mut [u8],
    stats: &mut NetStats,
) -> Result<(RxOutcome, bool), NetError> {
    let mut used = false;
    for _ in 0..queue.size() {
        let Some(head) = queue.pop_descriptor_chain(mem).map(|c| c.head_index()) else {
            return Ok((RxOutcome::NoBuffers, used));
        };
        let table = GuestAddress(queue.desc_table());
        let chain = match chain::walk(mem, table, queue.size(), head, true, usize::MAX) {
            Ok(chain) => chain,
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
        if len < VNET_HDR_LEN || len > chain.total {
            // The chain stays available for the next frame.
            queue.go_to_previous_position();
            stats.rx_dropped += 1;
            tracing::debug!(len, room = chain.total, "dropping a received frame");
            continue;
        }
        let frame = &mut buf[..len];
        frame[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
        let written = match chain::scatter(mem, &chain, frame) {
            Ok(()) => u32::try_from(len).map_err(|_| NetError::FrameSize)?,
            Err(e) => {
                bad_chain(queue, mem, head, &e, stats)?;
                used = true;
                continue;
            }
        };
        queue
            .add_used(mem, head, written)
            .map_err(NetError::Queue)?;
        stats.rx_frames += 1;
        used = true;
    }
    Ok((RxOutcome::Budget, used))
}

/// One tx pass; returns whether chains remain (budget exhausted) and whether used entries were
/// added.
pub fn transmit(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    tap: &mut dyn TapBackend,
    stats: &mut NetStats,
) -> Result<(bool, bool), NetError> {
    let mut used = false;
    for _ in 0..queue.size() {
        let Some(head) = queue.pop_descriptor_chain(mem).map(|c| c.head_index()) else {
            return Ok((false, used));
        };
        used = true;
        let table = GuestAddress(queue.desc_table());
        let frame = chain::walk(mem, table, queue.size(), head, false, MAX_TX_LEN)
            .and_then(|c| chain::gather(mem, &c))
            .and_then(|f| {
                if f.len() < VNET_HDR_LEN {
                    Err(ChainError::TooShort)
                } else {
                    Ok(f)
                }
            });
        match frame {
            Ok(frame) => {
                match tap.write_frame(&frame) {
                    Ok(_) => stats.tx_frames += 1,
                    Err(e) => {
                        stats.tx_dropped += 1;
                        tracing::debug!(error = %e, "tap refused a frame");
                    }
                }
                queue.add_used(mem, head, 0).map_err(NetError::Queue)?;
            }
            Err(e) => bad_chain(queue, mem, head, &e, stats)?,
        }
    }
    Ok((true, used))
}

/// Returns a malformed chain to the guest unused and counts it.
fn bad_chain(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    err: &ChainError,
    stats: &mut NetStats,
) -> Result<(), NetError> {
    stats.bad_chains += 1;
    tracing::warn!(error = %err, head, "virtio-net: malformed descriptor chain");
    queue.add_used(mem, head, 0).map_err(NetError::Queue)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::net::test_tap::{pair, Driver};
    use vm_memory::Bytes;

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
        let res = transmit(&mut queue, &mem, &mut tap, &mut stats).expect("tx");
        assert_eq!(res, (false, true));
        let mut got = vec![0u8; 200];
        let n = host.recv(&mut got).expect("frame on the tap");
        assert_eq!(&got[..n], &f[..]);
        assert_eq!(guest.used_idx(&mem), 1);
        assert_eq!(guest.used(&mem, 0), (0, 0));
        assert_eq!(stats.tx_frames, 1);
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
        transmit(&mut queue, &mem, &mut tap, &mut stats).expect("tx");
        assert_eq!(stats.bad_chains, 4);
        assert_eq!(stats.tx_frames, 0);
        assert_eq!(guest.used_idx(&mem), 4);
        let mut got = [0u8; 16];
        assert_eq!(
            host.recv(&mut got).expect_err("nothing sent").kind(),
            std::io::ErrorKind::WouldBlock
        );
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
        assert_eq!(stats.bad_chains, 1);
        assert_eq!(stats.rx_dropped, 1);
        assert_eq!(stats.rx_frames, 1);
        assert_eq!(guest.used(&mem, 0), (0, 0));
        assert_eq!(guest.used(&mem, 1), (1, 32));
    }
}
