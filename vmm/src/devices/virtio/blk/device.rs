//! The virtio-blk device: a one-queue device ([`SingleQueueDevice`]) whose requests
//! [`BlockHandler`] serves on a disk, with the capacity and `seg_max` in its configuration space.

use std::path::Path;

use tracing::{debug, warn};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::DescriptorChain;

use super::backend::{DiskBackend, FileDisk};
use super::request::{self, DiskInfo, RequestError, UnanswerableError, SECTOR_SIZE};
use super::{BlockError, QUEUE_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX};
use crate::devices::virtio::single_queue::{RequestHandler, SingleQueueDevice};
use crate::devices::virtio::{GuestErrors, VIRTIO_F_VERSION_1};
use crate::memory::GuestMemoryMmap;

/// Data buffers per request: the queue size less the header and status descriptors.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Bytes of guest data staged per host read or write.
const SCRATCH_BYTES: usize = 64 * 1024;
/// capacity (le64), size_max (le32, not offered), seg_max (le32).
const CONFIG_LEN: usize = 16;

/// The virtio-blk device, generic over its disk.
pub type Block<D = FileDisk> = SingleQueueDevice<BlockHandler<D>>;

/// Serves virtio-blk requests on a disk.
pub struct BlockHandler<D: DiskBackend> {
    disk: D,
    info: DiskInfo,
    config: [u8; CONFIG_LEN],
    scratch: Vec<u8>,
    /// Requests answered with an error status.
    failed: GuestErrors,
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
        Self::with_handler(BlockHandler::new(disk, read_only)).map_err(BlockError::EventFd)
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.handler().info.capacity
    }

    /// Requests answered with an error status so far.
    pub fn failed_requests(&self) -> u64 {
        self.handler().failed.count()
    }
}

impl<D: DiskBackend> BlockHandler<D> {
    fn new(disk: D, read_only: bool) -> Self {
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
        Self {
            disk,
            info,
            config,
            scratch: vec![0; SCRATCH_BYTES],
            failed: GuestErrors::default(),
        }
    }
}

impl<D: DiskBackend> RequestHandler for BlockHandler<D> {
    const DEVICE_TYPE: u32 = VIRTIO_ID_BLOCK;
    const NAME: &'static str = "virtio-blk";
    const QUEUE_SIZE: u16 = QUEUE_SIZE;
    type Error = UnanswerableError;

    fn avail_features(&self) -> u64 {
        let ro = if self.info.read_only {
            VIRTIO_BLK_F_RO
        } else {
            0
        };
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX | ro
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *byte = at.and_then(|a| self.config.get(a)).copied().unwrap_or(0);
        }
    }

    fn handle(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<u32, UnanswerableError> {
        let (disk, scratch) = (&mut self.disk, &mut self.scratch);
        let answer = request::handle(mem, chain, disk, self.info, scratch)?;
        if let Some(e) = &answer.failure {
            if self
                .failed
                .record(&crate::metrics::METRICS.guest_errors.blk)
            {
                let count = self.failed.count();
                match e {
                    RequestError::Io(_) => warn!(error = %e, count, "virtio-blk: request failed"),
                    _ => debug!(error = %e, count, "virtio-blk: request refused"),
                }
            }
        }
        Ok(answer.used)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::blk::test_utils::MemDisk;
    use crate::devices::virtio::test_utils::{activation, linked, WRITE};
    use crate::devices::virtio::VirtioDevice;

    fn mem_disk(sectors: usize) -> MemDisk {
        MemDisk {
            data: vec![0x5a; sectors * 512],
            ..MemDisk::default()
        }
    }

    #[test]
    fn features_and_configuration_space() {
        let blk = Block::with_backend(mem_disk(8), false).expect("block");
        assert_eq!(blk.device_type(), 2);
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
        assert_eq!(ro.acked_features(), ro.avail_features());
    }

    #[test]
    fn activation_needs_one_queue() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).expect("mem");
        let mut blk = Block::with_backend(mem_disk(1), false).expect("block");
        let (ctx, _) = activation(&mem, Vec::new());
        assert!(blk.activate(ctx).is_err());
        assert!(!blk.is_activated());
        assert!(blk.reset());
    }

    #[test]
    fn refused_requests_are_counted_and_malformed_chains_returned() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).expect("mem");
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let mut blk = Block::with_backend(mem_disk(1), true).expect("block");
        let (ctx, _) = activation(&mem, vec![vq.create_queue().expect("queue")]);
        blk.activate(ctx).expect("activate");
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&1u32.to_le_bytes()); // OUT to a read-only disk
        mem.write_slice(&header, GuestAddress(0x10_0000))
            .expect("header");
        let out = [
            (0x10_0000, 16, 0),
            (0x20_0000, 512, 0),
            (0x30_0000, 1, WRITE),
        ];
        vq.add_desc_chains(&linked(0, &out), 0).expect("out");
        let no_status = [(0x10_0000, 16, 0)];
        vq.add_desc_chains(&linked(3, &no_status), 3)
            .expect("no status");
        blk.process_queue();
        assert_eq!(vq.used().idx().load(), 2);
        let used = |i| vq.used().ring().ref_at(i).expect("used").load().len();
        assert_eq!((used(0), used(1)), (1, 0));
        let status: u8 = mem.read_obj(GuestAddress(0x30_0000)).expect("status");
        assert_eq!(status, 1, "IOERR");
        assert_eq!(blk.failed_requests(), 1);
        assert_eq!(blk.guest_errors().count(), 1, "the chain without status");
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
        let (ctx, interrupt) = activation(&mem, vec![vq.create_queue().expect("queue")]);
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
