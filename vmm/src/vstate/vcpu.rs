//! vCPU threads: configure each vCPU (CPUID, MSRs, FPU, LAPIC, boot registers), then run it,
//! dispatching port-I/O and MMIO exits to the buses until the guest or the VMM stops.

use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd};
use seccompiler::BpfProgram;

use super::control::{Checkpoint, Control, ExitReason};
use super::vcpu_state::{self, StateError, VcpuState};
use super::vm::Vm;
use crate::arch::regs::{self, BootEntry, RegsError};
use crate::arch::{cpuid, msr};
use crate::bus::Bus;
use crate::metrics::METRICS;
use crate::seccomp;

/// A vCPU could not be set up or started.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("{0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Register setup failed.
    #[error(transparent)]
    Regs(#[from] RegsError),
    /// The MSR list could not be built.
    #[error("building the MSR list")]
    Msrs,
    /// KVM accepted fewer MSRs than given.
    #[error("KVM set {0} of the boot MSRs")]
    MsrsPartial(usize),
    /// The thread could not be spawned.
    #[error("spawning the vCPU thread")]
    Spawn(#[source] std::io::Error),
    /// The kick signal handler could not be installed.
    #[error("installing the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// A saved vCPU state was refused.
    #[error("restoring the vCPU state")]
    State(#[from] StateError),
}

/// The signal that knocks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the no-op kick handler (KVM_RUN then returns EINTR).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick).map_err(VcpuError::Signal)
}

/// Creates and configures vCPU `id` of `count`; the boot vCPU (0) also gets `entry`'s registers.
pub fn create(
    vm: &Vm,
    base_cpuid: &CpuId,
    id: u8,
    count: u8,
    entry: BootEntry,
    gdt: &[u64],
) -> Result<VcpuFd, VcpuError> {
    let fd = vm
        .fd
        .create_vcpu(u64::from(id))
        .map_err(|e| VcpuError::Kvm("KVM_CREATE_VCPU", e))?;
    fd.set_cpuid2(&cpuid::for_vcpu(base_cpuid, id, count))
        .map_err(|e| VcpuError::Kvm("KVM_SET_CPUID2", e))?;
    let msrs = msr::boot_msrs().map_err(|_| VcpuError::Msrs)?;
    let set = fd
        .set_msrs(&msrs)
        .map_err(|e| VcpuError::Kvm("KVM_SET_MSRS", e))?;
    if set != msrs.as_slice().len() {
        return Err(VcpuError::MsrsPartial(set));
    }
    regs::setup_fpu(&fd)?;
    regs::setup_lapic(&fd)?;
    if id == 0 {
        regs::setup_boot_vcpu(&fd, gdt, entry)?;
    }
    Ok(fd)
}

/// Creates vCPU `id` and puts it where a snapshot left it (no boot setup: the saved state has
/// CPUID, MSRs, registers and LAPIC), then tells a kvmclock guest it was paused.
///
/// # Errors
/// [`VcpuError::Kvm`] when the vCPU cannot be created, [`VcpuError::State`] naming what KVM
/// refused of the saved state.
pub fn create_restored(vm: &Vm, id: u8, state: &VcpuState) -> Result<VcpuFd, VcpuError> {
    let fd = vm
        .fd
        .create_vcpu(u64::from(id))
        .map_err(|e| VcpuError::Kvm("KVM_CREATE_VCPU", e))?;
    state.restore(&vm.fd, &fd)?;
    vcpu_state::kvmclock_ctrl(&fd)?;
    Ok(fd)
}

/// Where vCPU threads leave their vCPUs for a snapshot ([`Checkpoint::HandOver`]), and where the
/// event loop collects them.
#[derive(Default)]
pub struct Handover {
    slots: Mutex<Slots>,
    cond: Condvar,
}

#[derive(Default)]
struct Slots {
    fds: Vec<(u8, VcpuFd)>,
    /// vCPUs whose last exit could not be completed: their state is mid-instruction.
    failed: Vec<u8>,
}

/// The vCPUs could not all be handed over.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// Some thread did not hand its vCPU over in time.
    #[error("the vCPUs were not handed over within {0:?}")]
    Timeout(std::time::Duration),
    /// A vCPU's last exit could not be completed.
    #[error("vCPU {0} could not complete its last exit")]
    LastExit(u8),
}

impl Handover {
    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Leaves vCPU `id` here.
    pub fn put(&self, id: u8, fd: VcpuFd) {
        self.slots().fds.push((id, fd));
        self.cond.notify_all();
    }

    /// Says vCPU `id` cannot be saved.
    pub fn fail(&self, id: u8) {
        self.slots().failed.push(id);
        self.cond.notify_all();
    }

    /// Waits until `count` vCPUs are here (calling `kick` between checks, for threads still in
    /// KVM_RUN), and returns them in id order.
    ///
    /// # Errors
    /// [`HandoverError`]: a vCPU failed, or not all came within `timeout`.
    pub fn collect(
        &self,
        count: usize,
        timeout: std::time::Duration,
        kick: impl Fn(),
    ) -> Result<Vec<VcpuFd>, HandoverError> {
        let deadline = std::time::Instant::now() + timeout;
        let mut slots = self.slots();
        while slots.fds.len() < count {
            if let Some(&id) = slots.failed.first() {
                return Err(HandoverError::LastExit(id));
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return Err(HandoverError::Timeout(timeout));
            }
            kick();
            let wait = (deadline - now).min(std::time::Duration::from_millis(2));
            slots = self
                .cond
                .wait_timeout(slots, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let mut all = std::mem::take(&mut slots.fds);
        all.sort_by_key(|(id, _)| *id);
        Ok(all.into_iter().map(|(_, fd)| fd).collect())
    }
}

/// A running vCPU thread.
pub struct VcpuHandle {
    thread: JoinHandle<()>,
}

impl VcpuHandle {
    /// Sends the kick signal so the thread leaves KVM_RUN and checks the run state.
    pub fn kick(&self) {
        // SAFETY: the pthread handle belongs to a thread we spawned and have not joined.
        unsafe {
            libc::pthread_kill(self.thread.as_pthread_t(), kick_signal());
        }
    }

    /// Whether the thread returned.
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }
}

/// Holds the vCPU threads back until the whole VMM is ready to run the guest (every thread's
/// seccomp filter installed); opened once, never closed again.
#[derive(Debug, Default)]
pub struct StartGate {
    open: Mutex<bool>,
    cond: Condvar,
}

impl StartGate {
    /// Lets every waiting (and later) thread through.
    pub fn open(&self) {
        *self.open.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.cond.notify_all();
    }

    /// Blocks until [`Self::open`].
    pub fn wait(&self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        while !*open {
            open = self.cond.wait(open).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// What a vCPU thread runs with.
pub struct Run {
    /// Port I/O bus.
    pub pio: Bus,
    /// MMIO bus.
    pub mmio: Bus,
    /// Run control.
    pub control: Arc<Control>,
    /// The filter the thread installs on itself first (None: `seccomp = false`).
    pub filter: Option<BpfProgram>,
    /// Opened once every thread is ready.
    pub start: Arc<StartGate>,
    /// Where the vCPU goes for a snapshot.
    pub handover: Arc<Handover>,
}

/// Starts vCPU `id` on its own thread; it installs its filter, waits at the start gate, then
/// runs the guest.
///
/// # Errors
/// [`VcpuError::Spawn`] when the thread cannot be created.
pub fn spawn(id: u8, fd: VcpuFd, run_with: Run) -> Result<VcpuHandle, VcpuError> {
    let thread = std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || {
            if let Some(filter) = &run_with.filter {
                if let Err(e) = seccomp::install("vCPU", filter) {
                    tracing::error!(vcpu = id, error = %e, "vCPU seccomp filter");
                    run_with
                        .control
                        .exit(ExitReason::Failed("vCPU seccomp filter"));
                }
            }
            run_with.start.wait();
            match run(id, fd, &run_with.pio, &run_with.mmio, &run_with.control) {
                Some(Ok(fd)) => run_with.handover.put(id, fd),
                Some(Err(())) => run_with.handover.fail(id),
                None => {}
            }
        })
        .map_err(VcpuError::Spawn)?;
    Ok(VcpuHandle { thread })
}

/// Runs the guest until told to stop (None) or to hand the vCPU over (Some: the vCPU with its
/// last exit completed, or Err when that failed).
fn run(
    id: u8,
    mut fd: VcpuFd,
    pio: &Bus,
    mmio: &Bus,
    control: &Control,
) -> Option<Result<VcpuFd, ()>> {
    loop {
        match control.vcpu_checkpoint() {
            Checkpoint::Run => {}
            Checkpoint::Stop => break,
            Checkpoint::HandOver => {
                if !complete_last_exit(id, &mut fd) {
                    return Some(Err(()));
                }
                tracing::debug!(vcpu = id, "vCPU handed over for a snapshot");
                return Some(Ok(fd));
            }
        }
        match fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                METRICS.exits.io_in.inc();
                if !pio.read(u64::from(port), data) {
                    METRICS.unmapped_accesses.inc();
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                METRICS.exits.io_out.inc();
                if !pio.write(u64::from(port), data) {
                    METRICS.unmapped_accesses.inc();
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                METRICS.exits.mmio_read.inc();
                if !mmio.read(addr, data) {
                    METRICS.unmapped_accesses.inc();
                    tracing::debug!(vcpu = id, addr, "MMIO read of an unmapped address");
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                METRICS.exits.mmio_write.inc();
                if !mmio.write(addr, data) {
                    METRICS.unmapped_accesses.inc();
                    tracing::debug!(vcpu = id, addr, "MMIO write to an unmapped address");
                }
            }
            Ok(VcpuExit::Shutdown) | Ok(VcpuExit::SystemEvent(..)) | Ok(VcpuExit::Hlt) => {
                METRICS.exits.other.inc();
                tracing::info!(vcpu = id, "guest shut down");
                control.exit(ExitReason::GuestShutdown);
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                METRICS.exits.other.inc();
                tracing::error!(vcpu = id, reason, cpu, "KVM entry failed");
                control.exit(ExitReason::Failed("KVM entry failed"));
            }
            Ok(VcpuExit::InternalError) => {
                METRICS.exits.other.inc();
                tracing::error!(vcpu = id, "KVM internal error");
                control.exit(ExitReason::Failed("KVM internal error"));
            }
            Ok(other) => {
                METRICS.exits.other.inc();
                tracing::error!(vcpu = id, exit = ?other, "unexpected vCPU exit");
                control.exit(ExitReason::Failed("unexpected vCPU exit"));
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                tracing::error!(vcpu = id, error = %e, "KVM_RUN");
                control.exit(ExitReason::Failed("KVM_RUN failed"));
            }
        }
    }
    tracing::debug!(vcpu = id, "vCPU thread done");
    None
}

/// After an I/O or MMIO exit KVM finishes the instruction (stores the value read, advances RIP)
/// only on the next KVM_RUN: one run with `immediate_exit` set does that and returns EINTR
/// without entering the guest, so the saved registers are those after the instruction. False
/// when KVM did anything else (another exit, an error): the vCPU is mid-instruction and must not
/// be saved.
fn complete_last_exit(id: u8, fd: &mut VcpuFd) -> bool {
    fd.set_kvm_immediate_exit(1);
    let done = match fd.run() {
        Err(e) if e.errno() == libc::EINTR => true,
        Err(e) => {
            tracing::error!(vcpu = id, error = %e, "completing the last exit");
            false
        }
        Ok(exit) => {
            tracing::error!(vcpu = id, exit = ?exit, "an exit while completing the last one");
            false
        }
    };
    fd.set_kvm_immediate_exit(0);
    done
}
