//! Emulated devices: legacy PC devices the kernel expects, and virtio devices.

pub mod legacy;
pub mod virtio;

use std::sync::{Arc, Mutex};

use event_manager::{MutEventSubscriber, SubscriberOps};
use kvm_ioctls::IoEventAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::layout::{VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
use crate::builder::{Attach, BuildError};
use crate::config::VmConfig;
use virtio::mmio::{queue_notify_offset, MmioTransport};
use virtio::{Interrupt, VirtioDevice};

fn boxed<E: std::error::Error + Send + Sync + 'static>(
    what: &'static str,
) -> impl FnOnce(E) -> BuildError {
    move |e| BuildError::Device(what, Box::new(e))
}

/// Creates every virtio device `config` asks for and attaches it.
///
/// # Errors
/// [`BuildError::Device`] naming the device that could not be created or wired.
pub fn attach_all(
    attach: &mut Attach<'_>,
    config: &VmConfig,
    host: HostSide,
) -> Result<(), BuildError> {
    if let (Some(v), Some(listener)) = (&config.vsock, host.vsock) {
        let dev = virtio::vsock::Vsock::with_listener(v.guest_cid, v.uds_path.clone(), listener)
            .map_err(boxed("vsock"))?;
        attach_virtio(attach, "vsock", dev)?;
    }
    if config.rng {
        let dev = virtio::rng::Rng::new().map_err(boxed("rng"))?;
        attach_virtio(attach, "rng", dev)?;
    }
    for fs in &config.fs {
        let dev =
            virtio::fs::VhostUserFs::new(&fs.socket, &fs.tag, attach.mem).map_err(boxed("fs"))?;
        // Activation hands the rings to virtiofsd from the event loop, over this socket only.
        attach.seccomp.vhost_user_sockets.push(dev.backend_fd());
        attach_virtio(attach, "fs", dev)?;
    }
    for (blk, file) in config.blk.iter().zip(host.disks) {
        let disk = virtio::blk::FileDisk::from_file(file).map_err(boxed("blk"))?;
        let dev = virtio::blk::Block::with_backend(disk, blk.read_only).map_err(boxed("blk"))?;
        attach_virtio(attach, "blk", dev)?;
    }
    for (net, fd) in config.net.iter().zip(host.taps) {
        let mac = net.mac_bytes()?;
        let tap = match fd {
            Some(fd) => virtio::net::Tap::from_fd(fd),
            None => virtio::net::Tap::open(&net.tap),
        }
        .map_err(boxed("net"))?;
        let dev = virtio::net::Net::new(Box::new(tap), mac).map_err(boxed("net"))?;
        attach_virtio(attach, "net", dev)?;
    }
    Ok(())
}

/// The host ends of the devices, opened or adopted by [`crate::resources::Resources`].
pub struct HostSide {
    /// The vsock device's listener.
    pub vsock: Option<std::os::unix::net::UnixListener>,
    /// One tap queue per `net` entry (None: opened by name here).
    pub taps: Vec<Option<std::os::fd::OwnedFd>>,
    /// One disk image per `blk` entry.
    pub disks: Vec<std::fs::File>,
}

/// Puts `dev` behind a virtio-mmio transport in the next slot: MMIO window, irqfd, one
/// ioeventfd per queue, event-loop subscription and the `virtio_mmio.device=` cmdline entry.
pub fn attach_virtio<D>(a: &mut Attach<'_>, name: &'static str, dev: D) -> Result<(), BuildError>
where
    D: VirtioDevice + MutEventSubscriber + Send + 'static,
{
    let slot = a.next_slot;
    let irq = VIRTIO_IRQ_BASE + slot;
    let base = VIRTIO_MMIO_BASE + u64::from(slot) * VIRTIO_MMIO_SIZE;
    let irq_evt = EventFd::new(EFD_NONBLOCK).map_err(|e| BuildError::Event("eventfd", e))?;
    a.vm.fd
        .register_irqfd(&irq_evt, irq)
        .map_err(|e| BuildError::Event("irqfd", e.into()))?;
    for (i, evt) in dev.queue_events().iter().enumerate() {
        let index = u32::try_from(i)
            .map_err(|_| BuildError::Event("queue index", std::io::Error::other(name)))?;
        a.vm.fd
            .register_ioevent(
                evt,
                &IoEventAddress::Mmio(base + queue_notify_offset()),
                index,
            )
            .map_err(|e| BuildError::Event("ioeventfd", e.into()))?;
    }
    let dev = Arc::new(Mutex::new(dev));
    let interrupt = Arc::new(Interrupt::new(irq_evt));
    let transport = Arc::new(Mutex::new(MmioTransport::new(
        a.mem.clone(),
        dev.clone(),
        interrupt,
    )));
    a.mmio.insert(transport.clone(), base, VIRTIO_MMIO_SIZE)?;
    a.transports.push(transport);
    a.events.add_subscriber(dev);
    a.cmdline
        .push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{irq}"));
    a.next_slot += 1;
    tracing::debug!(device = name, base, irq, "virtio device attached");
    Ok(())
}
