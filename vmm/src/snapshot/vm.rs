//! The whole VM in one state: what [`Snapshotter::take`] writes and [`load`] reads back.
//!
//! Taking a snapshot (a template's VMM, on its `snapshot` request, on the event loop):
//! 1. every vCPU thread completes its last exit and hands its vCPU over (`HandingOver`; the
//!    threads end: a template is never resumed);
//! 2. the vCPUs' KVM state in id order, then the VM's (PIT, clock, irqchips);
//! 3. every virtio-mmio transport in slot order (virtio-fs asks virtiofsd where its rings stand)
//!    and the UART;
//! 4. the sparse memory file, then the state file (header, fingerprint, this state), each synced:
//!    the state file, whole and checksummed, marks a complete snapshot;
//! 5. the VMM exits with status 5.
//!
//! Restoring is the builder's (`builder::build` with `restore`): memory from the memory file,
//! the VM and its devices built from the same configuration as a booted one, then the saved
//! state put back into each ([`load`] checks that the counts fit first).

use std::fs::File;
use std::io::{Seek, Write};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{format, memory, MemoryStats, SnapshotError};
use crate::config::{Fingerprint, VmConfig};
use crate::devices::legacy::serial::{SerialConsole, UartState};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::{PersistError, TransportState};
use crate::memory::GuestMemoryMmap;
use crate::vstate::control::{Control, ExitReason};
use crate::vstate::vcpu::{Handover, HandoverError, VcpuHandle};
use crate::vstate::vcpu_state::{StateError, VcpuState};
use crate::vstate::vm::Vm;
use crate::vstate::vm_state::{VmState, VmStateError};

/// How long the vCPU threads get to hand their vCPUs over.
pub const HANDOVER_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything of a VM but its memory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// Each vCPU, in id order.
    pub vcpus: Vec<VcpuState>,
    /// The VM: PIT, clock, irqchips.
    pub vm: VmState,
    /// COM1.
    pub serial: UartState,
    /// Each virtio-mmio slot, in order.
    pub devices: Vec<TransportState>,
}

/// Taking or loading a snapshot failed.
#[derive(Debug, thiserror::Error)]
pub enum VmSnapshotError {
    /// The configuration names snapshot files the resources do not hold (a bug: `Resources`
    /// opens or adopts them whenever the configuration has them).
    #[error("no {0} files among the VMM's resources")]
    NoFiles(&'static str),
    /// The VM was not running or paused (a snapshot is already under way, or it stops).
    #[error("the VM is not running")]
    NotRunning,
    /// The vCPUs could not all be handed over.
    #[error(transparent)]
    Handover(#[from] HandoverError),
    /// A vCPU's KVM state.
    #[error("vCPU {0}")]
    Vcpu(usize, #[source] StateError),
    /// The VM's KVM state.
    #[error(transparent)]
    Vm(#[from] VmStateError),
    /// A device's state.
    #[error("virtio slot {0}")]
    Device(usize, #[source] PersistError),
    /// The files.
    #[error(transparent)]
    File(#[from] SnapshotError),
    /// Syncing or truncating a file.
    #[error("snapshot file")]
    Io(#[source] std::io::Error),
    /// The snapshot does not fit this VM's configuration.
    #[error("the snapshot has {found} {what}, this VM {expected}")]
    Count {
        /// What is counted.
        what: &'static str,
        /// This VM's.
        expected: usize,
        /// The snapshot's.
        found: usize,
    },
}

/// What a template's VMM needs to write itself out.
pub struct Snapshotter {
    /// The VM.
    pub vm: Arc<Vm>,
    /// Guest RAM.
    pub mem: GuestMemoryMmap,
    /// Every virtio-mmio transport, in slot order.
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// COM1.
    pub serial: Arc<Mutex<SerialConsole<File>>>,
    /// Where the vCPU threads leave their vCPUs.
    pub handover: Arc<Handover>,
    /// Run control.
    pub control: Arc<Control>,
    /// The vCPU threads (kicked out of KVM_RUN).
    pub vcpus: Arc<Vec<VcpuHandle>>,
    /// The MSRs to save (`KVM_GET_MSR_INDEX_LIST`, asked during setup).
    pub msr_indices: Vec<u32>,
    /// The state file, open for writing.
    pub state_file: File,
    /// The memory file, open for writing.
    pub memory_file: File,
    /// What this VM is made of, stamped on the state file.
    pub fingerprint: Fingerprint,
}

impl Snapshotter {
    /// Writes the VM to the snapshot files and records [`ExitReason::Snapshotted`]; on failure
    /// the VMM stops as failed (its vCPUs are gone either way).
    ///
    /// # Errors
    /// [`VmSnapshotError`] naming what could not be saved.
    pub fn take(&mut self) -> Result<MemoryStats, VmSnapshotError> {
        let started = Instant::now();
        let result = self.write();
        match &result {
            Ok(stats) => {
                tracing::info!(
                    ms = started.elapsed().as_millis(),
                    memory_bytes = stats.data_bytes_written,
                    "snapshot written"
                );
                self.control.exit(ExitReason::Snapshotted);
            }
            Err(e) => {
                tracing::error!(error = %e, "snapshot failed");
                self.control.exit(ExitReason::Failed("snapshot"));
            }
        }
        result
    }

    fn write(&mut self) -> Result<MemoryStats, VmSnapshotError> {
        if !self.control.request_handover() {
            return Err(VmSnapshotError::NotRunning);
        }
        let kick = || self.vcpus.iter().for_each(VcpuHandle::kick);
        let fds = self
            .handover
            .collect(self.vcpus.len(), HANDOVER_TIMEOUT, kick)?;
        let vcpus = fds
            .iter()
            .enumerate()
            .map(|(i, fd)| {
                VcpuState::save(&self.vm.fd, fd, &self.msr_indices)
                    .map_err(|e| VmSnapshotError::Vcpu(i, e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let vm = VmState::save(&self.vm.fd)?;
        let devices = self
            .transports
            .iter()
            .enumerate()
            .map(|(i, t)| {
                t.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .save()
                    .map_err(|e| VmSnapshotError::Device(i, e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let serial = self
            .serial
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .save();
        let snapshot = VmSnapshot {
            vcpus,
            vm,
            serial,
            devices,
        };
        // Memory first, the state file last: a state file that reads back whole (its checksum
        // holds) is the mark of a complete snapshot, so one cut short by a crash is refused.
        let f = &mut self.state_file;
        f.set_len(0).map_err(VmSnapshotError::Io)?;
        let stats = memory::save_memory(&self.mem, &self.memory_file)?;
        self.memory_file.sync_all().map_err(VmSnapshotError::Io)?;
        f.rewind().map_err(VmSnapshotError::Io)?;
        format::write_state(f, &self.fingerprint, &snapshot)?;
        f.flush().map_err(VmSnapshotError::Io)?;
        f.sync_all().map_err(VmSnapshotError::Io)?;
        Ok(stats)
    }
}

/// A snapshot read back for `config`: its state (checked against `config.restore`'s fingerprint
/// and vCPU count) and fresh guest RAM holding its memory.
///
/// # Errors
/// [`VmSnapshotError`] when a file is unreadable, corrupt, from another VM, or does not fit.
pub fn load(
    config: &VmConfig,
    fingerprint: &Fingerprint,
    state: &File,
    memory_file: &File,
) -> Result<(VmSnapshot, GuestMemoryMmap, MemoryStats), VmSnapshotError> {
    let snapshot: VmSnapshot = format::read_state(
        &mut ReadAt {
            file: state,
            pos: 0,
        },
        fingerprint,
    )?;
    let vcpus = usize::from(config.vcpus);
    if snapshot.vcpus.len() != vcpus {
        return Err(VmSnapshotError::Count {
            what: "vCPUs",
            expected: vcpus,
            found: snapshot.vcpus.len(),
        });
    }
    let (mem, stats) = memory::restore_memory(memory_file, u64::from(config.memory_mib))?;
    Ok((snapshot, mem, stats))
}

/// Reads `file` from `pos` on by positioned reads: the descriptor's own offset is neither used
/// nor moved (one open template may serve several restores at once).
struct ReadAt<'a> {
    file: &'a File,
    pos: u64,
}

impl std::io::Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = std::os::unix::fs::FileExt::read_at(self.file, buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}
