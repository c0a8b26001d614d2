//! Seccomp filters, one per thread kind, compiled with `seccompiler` for each VM (some rules
//! name the VM's own descriptors) and installed by each thread on itself before the first guest
//! instruction runs.
//!
//! The VMM has two kinds of threads, and each gets the smallest list it can work with:
//!
//! - **vCPU threads** ([`vcpu`]): `KVM_RUN` and what handling its exits needs (bus writes that
//!   signal eventfds, the console, log lines); no socket call at all.
//! - **the main thread** ([`event_loop`]): once setup is done it only runs the event loop (the
//!   devices' queues and activation, the vsock muxer, the control socket, termination), so "the
//!   main thread after setup" and "the event-loop thread" are one filter here. The vhost-user
//!   messages of virtio-fs activation are allowed on that device's socket only.
//!
//! Every filter's default action kills the whole process (`SECCOMP_RET_KILL_PROCESS`), never a
//! single thread: a VM with a dead vCPU or a dead event loop would hang its pod instead of
//! failing it. The kernel logs each kill with the syscall number (`audit: type=1326 ...
//! syscall=N`), and the host side sees the VMM end by SIGSYS.
//!
//! Ordering: the vCPU threads are spawned by the main thread before it installs its own
//! filter (a thread inherits its creator's filters), install theirs, and then wait at a
//! barrier until the main thread has installed its filter too; only then does any vCPU enter
//! `KVM_RUN`.
//!
//! Each allow-list is written down beside its filter with why each call is there. Two rules
//! hold everywhere: memory may never be mapped or made executable (`mmap`/`mprotect` with
//! `PROT_EXEC` are refused), and nothing that opens a file by path, creates a process, changes
//! credentials, mounts, or loads code is on any list.

pub mod event_loop;
mod rules;
pub mod snapshot;
pub mod vcpu;

use std::os::fd::RawFd;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

pub use rules::Rules;

/// Building or installing a filter failed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A rule could not be expressed (a bug in an allow-list).
    #[error("seccomp: building the {0} filter")]
    Build(&'static str, #[source] seccompiler::BackendError),
    /// The filter could not be compiled to BPF.
    #[error("seccomp: compiling the {0} filter")]
    Compile(&'static str, #[source] seccompiler::BackendError),
    /// The kernel refused the filter.
    #[error("seccomp: installing the {0} filter")]
    Install(&'static str, #[source] seccompiler::Error),
}

/// What a VM's filters need to know about it.
#[derive(Debug, Clone, Default)]
pub struct VmContext {
    /// The vhost-user sockets of the virtio-fs devices: activation (on the event loop, after a
    /// vCPU's DRIVER_OK write) sends the rings to the daemon over them.
    pub vhost_user_sockets: Vec<RawFd>,
    /// The signal that kicks a vCPU out of `KVM_RUN` (the only one the main thread may send).
    pub kick_signal: i32,
    /// A template's VMM: the snapshot files (state, memory) the event loop may truncate when it
    /// takes the snapshot (KVM state reads, file writes); None for every other VMM.
    pub snapshot: Option<[RawFd; 2]>,
}

/// The compiled filters of one VM.
#[derive(Debug, Clone)]
pub struct Filters {
    /// For each vCPU thread.
    pub vcpu: BpfProgram,
    /// For the main thread once setup is done.
    pub event_loop: BpfProgram,
}

impl Filters {
    /// Compiles both filters for `vm`.
    ///
    /// # Errors
    /// [`SeccompError::Build`] or [`SeccompError::Compile`]: an allow-list is malformed.
    pub fn compile(vm: &VmContext) -> Result<Self, SeccompError> {
        Ok(Self {
            vcpu: compile("vCPU", vcpu::rules())?,
            event_loop: compile("event-loop", event_loop::rules(vm))?,
        })
    }
}

fn compile(
    name: &'static str,
    rules: Result<Rules, seccompiler::BackendError>,
) -> Result<BpfProgram, SeccompError> {
    let rules = rules.map_err(|e| SeccompError::Build(name, e))?;
    let arch = TargetArch::x86_64;
    let filter = SeccompFilter::new(
        rules.into_map(),
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch,
    )
    .map_err(|e| SeccompError::Build(name, e))?;
    filter
        .try_into()
        .map_err(|e| SeccompError::Compile(name, e))
}

/// Installs `filter` on the calling thread (and on threads it creates later). Sets
/// `no_new_privs` first, which loading a filter without `CAP_SYS_ADMIN` requires (a jailed VMM
/// already has it).
///
/// # Errors
/// [`SeccompError::Install`] when the kernel refuses.
pub fn install(name: &'static str, filter: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(filter).map_err(|e| SeccompError::Install(name, e))
}

#[cfg(test)]
mod tests;
