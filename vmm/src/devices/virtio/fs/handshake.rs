//! The vhost-user control messages the frontend sends: `GET_FEATURES`, `GET/SET_PROTOCOL_FEATURES`,
//! `GET_QUEUE_NUM`, `SET_OWNER`, `SET_FEATURES` and `SET_MEM_TABLE` when the device is created;
//! `SET_FEATURES` again with the driver's features and the `SET_VRING_*` messages on activation.
//!
//! vhost-user addresses vrings in the *frontend's* virtual address space: the daemon maps every
//! region of the memory table (each sent with its memfd) and translates a frontend address through
//! the table's `userspace_addr` fields. So a ring's guest physical address becomes the address of
//! the same bytes in this process's mapping, and the whole ring must sit inside one region.

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_ring;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::FsError;
use crate::devices::virtio::{feature, VIRTIO_F_VERSION_1};
use crate::memory::GuestMemoryMmap;

/// `VIRTIO_RING_F_INDIRECT_DESC`: indirect tables, walked by the daemon (the rings are its).
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = feature(virtio_ring::VIRTIO_RING_F_INDIRECT_DESC);
/// `VIRTIO_RING_F_EVENT_IDX`: notification suppression handled by the daemon and the driver.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = feature(virtio_ring::VIRTIO_RING_F_EVENT_IDX);

/// Virtio features passed through to the guest when the daemon offers them (the daemon owns the
/// rings, so ring features are its business; nothing device-specific exists for virtio-fs here).
pub const PASSTHROUGH_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX;

/// `VHOST_USER_F_PROTOCOL_FEATURES`: a vhost-user bit, never shown to the guest.
pub const PROTOCOL_FEATURES_BIT: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// Protocol features this frontend handles: only MQ (to check the daemon serves both queues).
pub fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
}

/// What the daemon agreed to when the connection was set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Virtio features the daemon offers (raw `GET_FEATURES`).
    pub backend_features: u64,
    /// Whether `VHOST_USER_F_PROTOCOL_FEATURES` is in use (rings then start disabled).
    pub protocol: bool,
}

impl Negotiated {
    /// Features offered to the guest: the passthrough set the daemon supports.
    pub fn guest_features(&self) -> u64 {
        self.backend_features & PASSTHROUGH_FEATURES
    }

    /// The `SET_FEATURES` value for the driver's `acked` features (masked to what was offered).
    pub fn backend_ack(&self, acked: u64) -> u64 {
        let protocol = if self.protocol {
            PROTOCOL_FEATURES_BIT
        } else {
            0
        };
        (acked & self.guest_features()) | protocol
    }
}

/// `GET_FEATURES`, `SET_FEATURES`, protocol features, `SET_OWNER`, `SET_MEM_TABLE`.
pub fn connect_handshake(
    frontend: &mut Frontend,
    mem: &GuestMemoryMmap,
    queues: usize,
) -> Result<Negotiated, FsError> {
    let backend_features = frontend.get_features().map_err(FsError::Handshake)?;
    if backend_features & VIRTIO_F_VERSION_1 == 0 {
        return Err(FsError::NoVersion1);
    }
    let protocol = backend_features & PROTOCOL_FEATURES_BIT != 0;
    let negotiated = Negotiated {
        backend_features,
        protocol,
    };
    if protocol {
        let offered = frontend
            .get_protocol_features()
            .map_err(FsError::Handshake)?;
        let acked = offered & wanted_protocol_features();
        frontend
            .set_protocol_features(acked)
            .map_err(FsError::Handshake)?;
        if acked.contains(VhostUserProtocolFeatures::MQ) {
            let num = frontend.get_queue_num().map_err(FsError::Handshake)?;
            if num < u64::try_from(queues).unwrap_or(u64::MAX) {
                return Err(FsError::TooFewQueues(num));
            }
        }
    }
    frontend.set_owner().map_err(FsError::Handshake)?;
    frontend
        .set_features(negotiated.backend_ack(VIRTIO_F_VERSION_1))
        .map_err(FsError::Handshake)?;
    frontend
        .set_mem_table(&mem_table(mem)?)
        .map_err(FsError::Handshake)?;
    Ok(negotiated)
}

/// One memory-table entry per guest RAM region, each with its memfd.
pub fn mem_table(mem: &GuestMemoryMmap) -> Result<Vec<VhostUserMemoryRegionInfo>, FsError> {
    mem.iter()
        .map(|region| {
            VhostUserMemoryRegionInfo::from_guest_region(region)
                .map_err(|_| FsError::MemoryNotShared)
        })
        .collect()
}

/// Bytes of a split ring's parts for `size` entries: descriptor table, avail ring, used ring
/// (both rings with their event-index word, which costs nothing to include).
pub fn ring_sizes(size: u16) -> (usize, usize, usize) {
    let n = usize::from(size);
    (16 * n, 6 + 2 * n, 6 + 8 * n)
}

/// This process's address of `len` guest bytes at `gpa`, which must sit in one region.
pub fn host_address(mem: &GuestMemoryMmap, gpa: u64, len: usize) -> Result<u64, FsError> {
    let slice = mem
        .get_slice(GuestAddress(gpa), len)
        .map_err(|_| FsError::RingAddress(gpa))?;
    let ptr = slice.ptr_guard().as_ptr();
    Ok(ptr as u64)
}

/// The `SET_VRING_ADDR` payload of `queue`, translated to frontend virtual addresses.
pub fn vring_config(mem: &GuestMemoryMmap, queue: &Queue) -> Result<VringConfigData, FsError> {
    let (desc_len, avail_len, used_len) = ring_sizes(queue.size());
    Ok(VringConfigData {
        queue_max_size: queue.max_size(),
        queue_size: queue.size(),
        flags: 0,
        desc_table_addr: host_address(mem, queue.desc_table(), desc_len)?,
        used_ring_addr: host_address(mem, queue.used_ring(), used_len)?,
        avail_ring_addr: host_address(mem, queue.avail_ring(), avail_len)?,
        log_addr: None,
    })
}

/// Hands queue `index` to the daemon: size, start index, addresses, call and kick eventfds, and
/// enables it when protocol features are in use.
pub fn start_vring(
    frontend: &mut Frontend,
    negotiated: Negotiated,
    mem: &GuestMemoryMmap,
    index: usize,
    queue: &Queue,
    kick: &EventFd,
    call: &EventFd,
) -> Result<(), FsError> {
    let config = vring_config(mem, queue)?;
    frontend
        .set_vring_num(index, queue.size())
        .map_err(FsError::Vring)?;
    frontend
        .set_vring_base(index, queue.next_avail())
        .map_err(FsError::Vring)?;
    frontend
        .set_vring_addr(index, &config)
        .map_err(FsError::Vring)?;
    // Call before kick: the daemon starts serving a queue once it has the kick fd.
    frontend
        .set_vring_call(index, call)
        .map_err(FsError::Vring)?;
    frontend
        .set_vring_kick(index, kick)
        .map_err(FsError::Vring)?;
    if negotiated.protocol {
        frontend
            .set_vring_enable(index, true)
            .map_err(FsError::Vring)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_features_drop_vhost_bits_and_unknown_bits() {
        let n = Negotiated {
            backend_features: VIRTIO_F_VERSION_1
                | PROTOCOL_FEATURES_BIT
                | VIRTIO_RING_F_EVENT_IDX
                | (1 << 33) // ACCESS_PLATFORM: never passed through
                | (1 << 26), // VHOST_F_LOG_ALL
            protocol: true,
        };
        assert_eq!(
            n.guest_features(),
            VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
        );
        // The driver acks something never offered: dropped; the protocol bit is added.
        assert_eq!(
            n.backend_ack(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | (1 << 33)),
            VIRTIO_F_VERSION_1 | PROTOCOL_FEATURES_BIT
        );
        let plain = Negotiated {
            protocol: false,
            ..n
        };
        assert_eq!(plain.backend_ack(VIRTIO_F_VERSION_1), VIRTIO_F_VERSION_1);
    }

    #[test]
    fn ring_addresses_are_translated_into_the_mapping() {
        let mem = crate::memory::create(2).expect("memory");
        let region = mem.iter().next().expect("region");
        let base = region.as_ptr() as u64;
        assert_eq!(
            host_address(&mem, 0x1000, 16).expect("in range"),
            base + 0x1000
        );
        // Past the end, or straddling it: refused.
        assert!(host_address(&mem, 2 << 20, 1).is_err());
        assert!(host_address(&mem, (2 << 20) - 8, 16).is_err());
        assert!(host_address(&mem, u64::MAX, 1).is_err());

        let mut queue = Queue::new(256).expect("queue");
        queue.set_size(256);
        queue.set_desc_table_address(Some(0x1_0000), Some(0));
        queue.set_avail_ring_address(Some(0x2_0000), Some(0));
        queue.set_used_ring_address(Some(0x3_0000), Some(0));
        let cfg = vring_config(&mem, &queue).expect("config");
        assert_eq!(cfg.desc_table_addr, base + 0x1_0000);
        assert_eq!(cfg.avail_ring_addr, base + 0x2_0000);
        assert_eq!(cfg.used_ring_addr, base + 0x3_0000);
        assert_eq!(cfg.queue_size, 256);

        // A used ring running off the end of RAM.
        queue.set_used_ring_address(Some((2 << 20) - 64), Some(0));
        assert!(matches!(
            vring_config(&mem, &queue),
            Err(FsError::RingAddress(_))
        ));
    }

    #[test]
    fn mem_table_needs_file_backed_memory() {
        let mem = crate::memory::create(2).expect("memory");
        let table = mem_table(&mem).expect("table");
        assert_eq!(table.len(), 1);
        assert_eq!(table[0].memory_size, 2 << 20);
        assert!(table[0].mmap_handle >= 0);
        let anon = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("anon");
        assert!(matches!(mem_table(&anon), Err(FsError::MemoryNotShared)));
    }
}
