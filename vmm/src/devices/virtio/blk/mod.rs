//! virtio-blk on a raw image (virtio 1.2 section 5.2; Linux `virtio_blk`).
//!
//! One request queue. The configuration space starts with the capacity in 512-byte sectors and
//! `seg_max`, the most data buffers a request may carry. We offer FLUSH (the guest may cache
//! writes and asks for durability with a FLUSH request, served with `fdatasync`), SEG_MAX, and RO
//! for read-only images. Requests are IN (read), OUT (write), FLUSH and GET_ID (serial number);
//! see [`request`] for their layout and validation. I/O is synchronous on the event-loop thread.

mod backend;
pub mod request;

use std::io;
use std::path::Path;

use event_manager::{EventOps, Events, MutEventSubscriber};
use tracing::{debug, warn};
use vmm_sys_util::eventfd::EventFd;

pub use self::backend::{DiskBackend, FileDisk, ID_BYTES};
use self::request::{DiskInfo, SECTOR_SIZE};
use super::single_queue::SingleQueue;
use super::{device_type, ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1};

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;

/// Feature bit: `seg_max` in the configuration space is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
/// Feature bit: the disk is read-only.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// Feature bit: FLUSH requests are supported.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

/// Data buffers per request: the queue size less the header and status descriptors.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Bytes of guest data staged per host read or write.
const SCRATCH_BYTES: usize = 64 * 1024;
const CONFIG_LEN: usize = 16;

/// The device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// Opening the image failed.
    #[error("opening the disk image")]
    Open(#[source] io::Error),
    /// Creating an eventfd failed.
    #[error("creating an eventfd")]
    EventFd(#[source] io::Error),
}

/// The virtio-blk device, generic over its disk.
pub struct Block<D: DiskBackend = FileDisk> {
    disk: D,
    info: DiskInfo,
    config: [u8; CONFIG_LEN],
    scratch: Vec<u8>,
    queue: SingleQueue,
    acked_features: u64,
}

impl Block<FileDisk> {
    /// A device serving the raw image at `path`, opened read-only if `read_only`.
    ///
    /// # Errors
    /// [`BlockError`] if the image cannot be opened or an eventfd created.
    pub fn new(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let disk = FileDisk::open(path, read_only).map_err(BlockError::Open)?;
        Self::with_backend(disk, read_only)
    }
}

impl<D: DiskBackend> Block<D> {
    /// A device serving `disk`; its capacity is the disk size rounded down to whole sectors.
    ///
    /// # Errors
    /// [`BlockError`] if an eventfd cannot be created.
    pub fn with_backend(disk: D, read_only: bool) -> Result<Self, BlockError> {
        let size = disk.size();
        if size % SECTOR_SIZE != 0 {
            warn!(
                size,
                "virtio-blk: image size not sector-aligned; tail ignored"
            );
        }
        let info = DiskInfo {
            capacity: size / SECTOR_SIZE,
            read_only,
        };
        let mut config = [0u8; CONFIG_LEN];
        let (capacity, rest) = config.split_at_mut(8);
        capacity.copy_from_slice(&info.capacity.to_le_bytes());
        // Bytes 8..12 are size_max (not offered), 12..16 seg_max.
        if let Some(seg_max) = rest.get_mut(4..8) {
            seg_max.copy_from_slice(&SEG_MAX.to_le_bytes());
        }
        Ok(Self {
            disk,
            info,
            config,
            scratch: vec![0; SCRATCH_BYTES],
            queue: SingleQueue::new("virtio-blk").map_err(BlockError::EventFd)?,
            acked_features: 0,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.info.capacity
    }

    /// Serves every available request, then raises the interrupt if any completed.
    fn process_queue(&mut self) {
        let (disk, info, scratch) = (&mut self.disk, self.info, &mut self.scratch);
        self.queue
            .serve(|mem, chain| request::handle(mem, chain, &mut *disk, info, &mut *scratch));
    }
}

impl<D: DiskBackend> VirtioDevice for Block<D> {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn queue_events(&self) -> &[EventFd] {
        self.queue.queue_events()
    }

    fn avail_features(&self) -> u64 {
        let ro = if self.info.read_only {
            VIRTIO_BLK_F_RO
        } else {
            0
        };
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX | ro
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *byte = at.and_then(|a| self.config.get(a)).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        debug!(offset, "virtio-blk: configuration space is read-only");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.queue.activate(ctx)
    }

    fn is_activated(&self) -> bool {
        self.queue.is_activated()
    }

    fn reset(&mut self) -> bool {
        self.queue.reset();
        self.acked_features = 0;
        true
    }
}

impl<D: DiskBackend> MutEventSubscriber for Block<D> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.queue.process(events, ops) {
            self.process_queue();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.queue.init(ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::devices::virtio::Interrupt;
    use crate::memory::GuestMemoryMmap;
    use std::sync::Mutex;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use event_manager::{EventManager, SubscriberOps};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use self::backend::MemDisk;

    fn mem_disk(sectors: usize) -> MemDisk {
        MemDisk {
            data: vec![0x5a; sectors * 512],
            ..MemDisk::default()
        }
    }

    #[test]
    fn features_and_configuration_space() {
        let blk = Block::with_backend(mem_disk(8), false).expect("block");
        assert_eq!(blk.device_type(), device_type::BLOCK);
        assert_eq!(blk.capacity(), 8);
        assert_eq!(blk.avail_features() & VIRTIO_BLK_F_RO, 0);
        assert_ne!(blk.avail_features() & VIRTIO_F_VERSION_1, 0);
        assert_ne!(blk.avail_features() & VIRTIO_BLK_F_FLUSH, 0);
        let mut cap = [0u8; 8];
        blk.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        let mut seg_max = [0u8; 4];
        blk.read_config(12, &mut seg_max);
        assert_eq!(u32::from_le_bytes(seg_max), 254);
        let mut past = [0xffu8; 4];
        blk.read_config(14, &mut past);
        assert_eq!(past, [0, 0, 0, 0]);
        blk.read_config(u64::MAX, &mut past);
        assert_eq!(past, [0; 4]);

        let mut odd = mem_disk(2);
        odd.data.push(1);
        let mut ro = Block::with_backend(odd, true).expect("block");
        assert_eq!(ro.capacity(), 2, "partial sector ignored");
        assert_ne!(ro.avail_features() & VIRTIO_BLK_F_RO, 0);
        ro.write_config(0, &[0; 8]);
        ro.set_acked_features(u64::MAX);
        assert_eq!(ro.acked_features, ro.avail_features());
    }

    #[test]
    fn activation_needs_one_queue() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).expect("mem");
        let mut blk = Block::with_backend(mem_disk(1), false).expect("block");
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let ctx = ActivateContext {
            mem,
            interrupt: Arc::new(Interrupt::new(irq)),
            queues: Vec::new(),
        };
        assert!(blk.activate(ctx).is_err());
        assert!(!blk.is_activated());
        assert!(blk.reset());
    }

    #[test]
    fn image_file_round_trip_through_the_event_loop() {
        let path =
            std::env::temp_dir().join(format!("pangolin-blk-dev-{}.img", std::process::id()));
        std::fs::write(&path, vec![0u8; 4096]).expect("image");
        let blk = Arc::new(Mutex::new(Block::new(&path, false).expect("block")));
        assert!(Block::new(&path.with_extension("missing"), true).is_err());
        let mut manager =
            EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().expect("manager");
        manager.add_subscriber(blk.clone());

        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).expect("mem");
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
        let ctx = ActivateContext {
            mem: mem.clone(),
            interrupt: interrupt.clone(),
            queues: vec![vq.create_queue().expect("queue")],
        };
        blk.lock().expect("lock").activate(ctx).expect("activate");
        assert_eq!(manager.run_with_timeout(100).expect("run"), 1);

        // OUT "hello" padded to a sector at sector 3, then FLUSH.
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&1u32.to_le_bytes());
        header[8..].copy_from_slice(&3u64.to_le_bytes());
        mem.write_slice(&header, GuestAddress(0x10_0000))
            .expect("header");
        mem.write_slice(b"hello", GuestAddress(0x20_0000))
            .expect("data");
        let mut flush = [0u8; 16];
        flush[0] = 4;
        mem.write_slice(&flush, GuestAddress(0x10_0100))
            .expect("flush");
        let desc =
            |addr, len, flags, next| RawDescriptor::from(Descriptor::new(addr, len, flags, next));
        let chains = [
            desc(0x10_0000, 16, 1, 1),
            desc(0x20_0000, 512, 1, 2),
            desc(0x30_0000, 1, 2, 0),
            desc(0x10_0100, 16, 1, 4),
            desc(0x30_0001, 1, 2, 0),
        ];
        vq.add_desc_chains(&chains, 0).expect("chains");
        blk.lock().expect("lock").queue_events()[0]
            .write(1)
            .expect("kick");
        assert_eq!(manager.run_with_timeout(100).expect("run"), 1);

        assert_eq!(vq.used().idx().load(), 2);
        let status: [u8; 2] = mem.read_obj(GuestAddress(0x30_0000)).expect("status");
        assert_eq!(status, [0, 0]);
        assert_eq!(interrupt.status(), 1);
        let image = std::fs::read(&path).expect("read image");
        assert_eq!(&image[1536..1541], b"hello");
        std::fs::remove_file(&path).expect("cleanup");
    }
}
