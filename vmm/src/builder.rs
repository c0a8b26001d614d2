//! Assembles a VMM from a [`VmConfig`]: memory, KVM VM, devices, boot image, vCPU threads, and
//! the event loop that runs until the guest or the host stops it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::layout::{COM1_IRQ, COM1_PORT, I8042_PORT};
use crate::arch::{boot, cpuid, mptable, regs};
use crate::bus::Bus;
use crate::config::{ConfigError, VmConfig};
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::serial::SerialConsole;
use crate::devices::legacy::EventFdTrigger;
use crate::devices::virtio::mmio::MmioTransport;
use crate::lifecycle::{self, Lifecycle};
use crate::memory::{self, GuestMemoryMmap};
use crate::resources::Resources;
use crate::seccomp::{self, Filters};
use crate::snapshot::vm::{self as snapshot_vm, Snapshotter, VmSnapshot, VmSnapshotError};
use crate::vstate::control::{Control, ExitReason};
use crate::vstate::vcpu::{self, Handover, StartGate, VcpuHandle};
use crate::vstate::vcpu_state;
use crate::vstate::vm::Vm;

/// The event loop's subscriber type.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Building the VMM failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A host resource could not be opened or adopted.
    #[error(transparent)]
    Resource(#[from] crate::resources::ResourceError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// KVM VM setup.
    #[error(transparent)]
    Vm(#[from] crate::vstate::vm::VmError),
    /// vCPU setup.
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    /// Kernel/initramfs loading.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// MP table.
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    /// Boot tables.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// CPUID.
    #[error(transparent)]
    Cpuid(#[from] cpuid::CpuidError),
    /// Bus layout.
    #[error(transparent)]
    Bus(#[from] crate::bus::BusError),
    /// A seccomp filter.
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    /// The event loop.
    #[error("event loop: {0:?}")]
    EventLoop(event_manager::Error),
    /// Run control or signals.
    #[error(transparent)]
    Control(#[from] crate::vstate::control::ControlError),
    /// Signals.
    #[error(transparent)]
    Signal(#[from] lifecycle::SignalError),
    /// An eventfd, irqfd or ioeventfd.
    #[error("{0}")]
    Event(&'static str, #[source] std::io::Error),
    /// A virtio device.
    #[error("virtio device {0}")]
    Device(
        &'static str,
        #[source] Box<dyn std::error::Error + Send + Sync>,
    ),
    /// The snapshot to restore from, or the state needed to take one.
    #[error("snapshot")]
    Snapshot(#[from] VmSnapshotError),
}

/// A booted (or restored) VM and its event loop.
pub struct Vmm {
    control: Arc<Control>,
    vcpus: Arc<Vec<VcpuHandle>>,
    events: EventManager<Subscriber>,
    serial: Arc<Mutex<SerialConsole<File>>>,
    _mem: GuestMemoryMmap,
    _vm: Arc<Vm>,
}

/// Devices being attached: the buses, the growing command line, the event loop.
pub struct Attach<'a> {
    /// Guest memory.
    pub mem: &'a GuestMemoryMmap,
    /// The VM (irqfd/ioeventfd registration).
    pub vm: &'a Vm,
    /// MMIO bus.
    pub mmio: &'a mut Bus,
    /// Kernel command line being built.
    pub cmdline: &'a mut String,
    /// The event loop.
    pub events: &'a mut EventManager<Subscriber>,
    /// Index of the next virtio-mmio slot.
    pub next_slot: u32,
    /// The vCPU filter's context: descriptors vCPU threads may use (see [`crate::seccomp`]).
    pub seccomp: crate::seccomp::VmContext,
    /// Every transport attached so far, in slot order (snapshots save and restore them).
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
}

/// Builds and boots the VM described by `config` from its host `resources`; vCPUs run when
/// this returns.
///
/// # Errors
/// [`BuildError`] naming what failed.
pub fn build(config: &VmConfig, resources: Resources) -> Result<Vmm, BuildError> {
    let started = Instant::now();
    config.validate()?;
    let signals = lifecycle::termination_signalfd()?;
    vcpu::install_kick_handler()?;
    let Resources {
        kvm,
        mut kernel,
        mut initramfs,
        console,
        api,
        vsock,
        taps,
        disks,
        snapshot: snapshot_files,
        restore: restore_files,
    } = resources;
    if let Some(l) = &api {
        l.set_nonblocking(true)
            .map_err(|e| BuildError::Event("control socket", e))?;
    }

    if config.snapshot.is_some() && snapshot_files.is_none() {
        return Err(VmSnapshotError::NoFiles("snapshot").into());
    }
    // A restore starts from the snapshot's memory; the state goes back in once the VM and its
    // devices exist, built from the same configuration as a booted VM's.
    let (restored, mem) = match (&config.restore, restore_files) {
        (Some(files), Some((state, memory_file))) => {
            let (snap, mem, stats) =
                snapshot_vm::load(config, &files.fingerprint, &state, &memory_file)?;
            tracing::info!(
                memory_bytes = stats.data_bytes_written,
                ms = started.elapsed().as_millis(),
                "snapshot loaded"
            );
            (Some(snap), mem)
        }
        (Some(_), None) => return Err(VmSnapshotError::NoFiles("restore").into()),
        (None, _) => (None, memory::create(u64::from(config.memory_mib))?),
    };
    let vm = Vm::with_kvm(kvm, &mem)?;
    let vm = Arc::new(vm);
    let mut events: EventManager<Subscriber> =
        EventManager::new().map_err(BuildError::EventLoop)?;
    let control = Arc::new(Control::new()?);

    let new_evt = || EventFd::new(EFD_NONBLOCK).map_err(|e| BuildError::Event("eventfd", e));
    let mut pio = Bus::default();
    let serial_irq = new_evt()?;
    vm.fd
        .register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(|e| BuildError::Event("irqfd", e.into()))?;
    let serial = match &restored {
        Some(snap) => SerialConsole::restore(&snap.serial, EventFdTrigger(serial_irq), console)
            .map_err(|e| BuildError::Device("serial", Box::new(e)))?,
        None => SerialConsole::new(EventFdTrigger(serial_irq), console),
    };
    let serial = Arc::new(Mutex::new(serial));
    pio.insert(serial.clone(), COM1_PORT, 8)?;
    let reset_evt = new_evt()?;
    let reset_for_dev = reset_evt
        .try_clone()
        .map_err(|e| BuildError::Event("eventfd", e))?;
    pio.insert(
        Arc::new(Mutex::new(I8042::new(EventFdTrigger(reset_for_dev)))),
        I8042_PORT,
        5,
    )?;

    let mut mmio = Bus::default();
    let mut cmdline = config.cmdline.clone();
    let mut attach = Attach {
        mem: &mem,
        vm: &vm,
        mmio: &mut mmio,
        cmdline: &mut cmdline,
        events: &mut events,
        next_slot: 0,
        seccomp: crate::seccomp::VmContext {
            vhost_user_sockets: Vec::new(),
            kick_signal: vcpu::kick_signal(),
            snapshot: snapshot_files
                .as_ref()
                .map(|(state, memory)| [state.as_raw_fd(), memory.as_raw_fd()]),
        },
        transports: Vec::new(),
    };
    let host = crate::devices::HostSide { vsock, taps, disks };
    crate::devices::attach_all(&mut attach, config, host)?;
    let transports = std::mem::take(&mut attach.transports);
    // A template's MSR list is asked of /dev/kvm now: the event loop's filter has no KVM
    // system ioctl.
    let msr_indices = match config.snapshot {
        Some(_) => vcpu_state::msr_indices_to_save(&vm.kvm).map_err(vcpu::VcpuError::from)?,
        None => Vec::new(),
    };
    let filters = if config.seccomp {
        Some(Filters::compile(&attach.seccomp)?)
    } else {
        tracing::warn!("seccomp = false: the VMM's threads run without a syscall filter");
        None
    };

    let fds = match &restored {
        Some(snap) => (0u8..)
            .zip(&snap.vcpus)
            .map(|(id, state)| vcpu::create_restored(&vm, id, state))
            .collect::<Result<Vec<_>, _>>()?,
        None => boot_vcpus(config, &vm, &mem, &mut kernel, initramfs.as_mut(), &cmdline)?,
    };
    // A restore puts the VM and the devices back once the vCPUs (and their LAPICs) are: the
    // devices' re-raised interrupts and kicks then meet the restored irqchips.
    if let Some(snap) = &restored {
        snap.vm.restore(&vm.fd).map_err(VmSnapshotError::from)?;
        restore_devices(snap, &transports)?;
    }
    let handover = Arc::new(Handover::default());
    // Every vCPU installs its filter, then waits at this gate until the main thread has
    // installed its own: no guest instruction runs before every thread is filtered.
    let start = Arc::new(StartGate::default());
    let mut handles = Vec::with_capacity(fds.len());
    for (id, fd) in (0u8..).zip(fds) {
        let spawned = vcpu::spawn(
            id,
            fd,
            vcpu::Run {
                pio: pio.clone(),
                mmio: mmio.clone(),
                control: control.clone(),
                filter: filters.as_ref().map(|f| f.vcpu.clone()),
                start: start.clone(),
                handover: handover.clone(),
            },
        );
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                // The vCPUs already spawned are waiting at the gate: let them see Stopping.
                control.exit(ExitReason::Failed("vCPU spawn"));
                start.open();
                return Err(e.into());
            }
        }
    }
    let vcpus = Arc::new(handles);
    tracing::info!(
        setup_ms = started.elapsed().as_millis(),
        vcpus = config.vcpus,
        memory_mib = config.memory_mib,
        started_from = if restored.is_some() {
            "snapshot"
        } else {
            "boot"
        },
        "guest started"
    );
    let snapshotter = match (&config.snapshot, snapshot_files) {
        (Some(files), Some((state_file, memory_file))) => Some(Snapshotter {
            vm: vm.clone(),
            mem: mem.clone(),
            transports,
            serial: serial.clone(),
            handover,
            control: control.clone(),
            vcpus: vcpus.clone(),
            msr_indices,
            state_file,
            memory_file,
            fingerprint: files.fingerprint.clone(),
        }),
        _ => None,
    };
    let lifecycle = Lifecycle::new(
        control.clone(),
        reset_evt,
        signals,
        api,
        vcpus.clone(),
        started,
        snapshotter,
    );
    events.add_subscriber(Arc::new(Mutex::new(lifecycle)));
    if let Some(f) = &filters {
        if let Err(e) = seccomp::install("event-loop", &f.event_loop) {
            control.exit(ExitReason::Failed("seccomp"));
            start.open();
            return Err(e.into());
        }
    }
    start.open();
    Ok(Vmm {
        control,
        vcpus,
        events,
        serial,
        _mem: mem,
        _vm: vm,
    })
}

/// Loads the kernel and boot tables and creates the vCPUs at the kernel's entry.
fn boot_vcpus(
    config: &VmConfig,
    vm: &Vm,
    mem: &GuestMemoryMmap,
    kernel: &mut File,
    initramfs: Option<&mut File>,
    cmdline: &str,
) -> Result<Vec<kvm_ioctls::VcpuFd>, BuildError> {
    let entry = boot::load(mem, kernel, initramfs, cmdline)?;
    tracing::info!(?entry, "kernel loaded");
    mptable::write(mem, config.vcpus)?;
    let gdt = regs::write_tables(mem, entry)?;
    let base_cpuid = cpuid::supported(&vm.kvm)?;
    (0..config.vcpus)
        .map(|id| vcpu::create(vm, &base_cpuid, id, config.vcpus, entry, &gdt).map_err(Into::into))
        .collect()
}

/// Puts every transport where the snapshot left it (the same devices in the same slots: the
/// configuration is the template's).
fn restore_devices(
    snap: &VmSnapshot,
    transports: &[Arc<Mutex<MmioTransport>>],
) -> Result<(), VmSnapshotError> {
    if snap.devices.len() != transports.len() {
        return Err(VmSnapshotError::Count {
            what: "virtio devices",
            expected: transports.len(),
            found: snap.devices.len(),
        });
    }
    for (slot, (state, t)) in snap.devices.iter().zip(transports).enumerate() {
        t.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .restore(state.clone())
            .map_err(|e| VmSnapshotError::Device(slot, e))?;
    }
    Ok(())
}

impl Vmm {
    /// Runs the event loop until something stops the VM; returns why.
    pub fn run(mut self) -> ExitReason {
        let reason = loop {
            if let Some(reason) = self.control.exit_reason() {
                break reason;
            }
            if let Err(e) = self.events.run_with_timeout(500) {
                tracing::error!(error = ?e, "event loop");
                self.control.exit(ExitReason::Failed("event loop"));
            }
        };
        // vCPUs see Stopping once out of KVM_RUN; kick them out and give them a moment.
        let deadline = Instant::now() + Duration::from_millis(500);
        while self.vcpus.iter().any(|v| !v.is_finished()) && Instant::now() < deadline {
            self.vcpus.iter().for_each(VcpuHandle::kick);
            std::thread::sleep(Duration::from_millis(2));
        }
        if let Ok(mut serial) = self.serial.lock() {
            serial.flush();
        }
        tracing::info!(?reason, "VMM stopping");
        reason
    }

    /// The run control (tests and embedders).
    pub fn control(&self) -> Arc<Control> {
        self.control.clone()
    }
}
