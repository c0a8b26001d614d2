//! virtio-fs's vhost-user frontend against a hostile daemon: the daemon's side of a socket pair
//! holds the fuzzer's replies (any request code, flags, size and body, or raw bytes) before the
//! frontend connects (`VhostUserFs::from_stream`), so the handshake (`GET_FEATURES`,
//! `GET_PROTOCOL_FEATURES`, `GET_QUEUE_NUM`; the `SET_*` messages get no reply without
//! REPLY_ACK, which is never negotiated) reads exactly those bytes, then EOF. A device that comes
//! up is activated with queues the guest configured (`QueueConfig::build`, the transport's own
//! check), and its activation completed as the event loop does it: the ring addresses go
//! through the frontend's translation to daemon addresses.
#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pangolin_vmm::devices::virtio::fs::{VhostUserFs, QUEUE_SIZE};
use pangolin_vmm::devices::virtio::mmio::QueueConfig;
use pangolin_vmm::devices::virtio::test_utils::activation;
use pangolin_vmm::devices::virtio::VirtioDevice;
use pangolin_vmm::memory::GuestMemoryMmap;

/// vhost-user reply flags: version 1, REPLY.
const REPLY_FLAGS: u32 = 0x1 | 0x4;

#[derive(Arbitrary, Debug)]
enum Code {
    GetFeatures,
    GetProtocolFeatures,
    GetQueueNum,
    Raw(u32),
}

#[derive(Arbitrary, Debug)]
enum Body {
    U64(u64),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Reply {
    /// A header (request code, flags, size: the body's unless given) and a body.
    Message {
        code: Code,
        flags: Option<u32>,
        size: Option<u32>,
        body: Body,
    },
    /// Bytes on the wire, no framing.
    Bytes(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Queue {
    size: u16,
    desc: u32,
    driver: u32,
    device: u32,
}

#[derive(Arbitrary, Debug)]
struct Input {
    tag: String,
    replies: Vec<Reply>,
    acked: u64,
    event_idx: bool,
    queues: Vec<Queue>,
    config_reads: Vec<(u8, u8)>,
}

fn memory() -> &'static GuestMemoryMmap {
    static MEM: OnceLock<GuestMemoryMmap> = OnceLock::new();
    MEM.get_or_init(|| pangolin_vmm::memory::create(2).expect("memfd guest memory"))
}

fn wire(replies: &[Reply]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in replies.iter().take(16) {
        match r {
            Reply::Message {
                code,
                flags,
                size,
                body,
            } => {
                let code = match code {
                    Code::GetFeatures => 1,
                    Code::GetProtocolFeatures => 15,
                    Code::GetQueueNum => 17,
                    Code::Raw(c) => *c,
                };
                let body = match body {
                    Body::U64(v) => v.to_le_bytes().to_vec(),
                    Body::Raw(b) => b.clone(),
                };
                let len = size.unwrap_or_else(|| u32::try_from(body.len()).unwrap_or(0));
                out.extend_from_slice(&code.to_le_bytes());
                out.extend_from_slice(&flags.unwrap_or(REPLY_FLAGS).to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(&body);
            }
            Reply::Bytes(b) => out.extend_from_slice(b),
        }
    }
    out
}

fuzz_target!(|input: Input| {
    let mem = memory();
    let Ok((ours, mut daemon)) = UnixStream::pair() else {
        return;
    };
    let bytes = wire(&input.replies);
    // Far below the socket buffer: the write never blocks.
    if bytes.len() > 64 * 1024 || daemon.write_all(&bytes).is_err() {
        return;
    }
    // EOF after the replies; the daemon end stays open, so the frontend's writes never fail
    // with EPIPE.
    let _ = daemon.shutdown(std::net::Shutdown::Write);
    let Ok(mut fs) = VhostUserFs::from_stream(ours, &input.tag, mem) else {
        return;
    };
    let offered = fs.avail_features();
    fs.set_acked_features(input.acked);
    for &(offset, len) in input.config_reads.iter().take(8) {
        let mut buf = vec![0u8; usize::from(len % 64)];
        fs.read_config(u64::from(offset), &mut buf);
    }
    let queues = input
        .queues
        .iter()
        .take(3)
        .filter_map(|q| {
            let config = QueueConfig {
                max_size: QUEUE_SIZE,
                size: q.size,
                ready: true,
                desc: u64::from(q.desc),
                driver: u64::from(q.driver),
                device: u64::from(q.device),
            };
            config.build(mem, input.event_idx).ok()
        })
        .collect();
    let (ctx, _irq) = activation(mem, queues);
    let activated = fs.activate(ctx).is_ok();
    assert_eq!(activated, fs.is_activated());
    // The event loop's half: the rings go to the daemon (which has said all it will).
    if activated {
        match fs.complete_activation() {
            Ok(started) => assert!(started && fs.is_activated() && !fs.needs_reset()),
            Err(_) => assert!(fs.needs_reset() && !fs.is_activated()),
        }
    }
    // Only VERSION_1 (required), INDIRECT_DESC and EVENT_IDX ever reach the guest, whatever
    // the daemon offered.
    let passthrough = (1u64 << 32) | (1 << 28) | (1 << 29);
    assert_eq!(
        offered & !passthrough,
        0,
        "daemon bits leak to the guest: {offered:#x}"
    );
    assert_ne!(offered & (1 << 32), 0, "a device without VERSION_1");
    drop(fs);
    drop(daemon);
});
