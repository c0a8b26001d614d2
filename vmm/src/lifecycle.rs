//! The event-loop subscriber that ends the VMM: guest reset (i8042), SIGTERM/SIGINT (signalfd),
//! the control socket, and the vCPUs' exit eventfd.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::Instant;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use crate::api;
use crate::vstate::control::{Control, ExitReason};
use crate::vstate::vcpu::VcpuHandle;

const RESET: u32 = 1;
const SIGNAL: u32 = 2;
const API: u32 = 3;
const EXIT: u32 = 4;

/// Setting up signal handling failed.
#[derive(Debug, thiserror::Error)]
#[error("blocking SIGTERM/SIGINT for the signalfd")]
pub struct SignalError(#[source] std::io::Error);

/// Blocks SIGTERM and SIGINT in this thread (and threads it spawns later) and returns a signalfd
/// for them. Call before spawning any thread.
pub fn termination_signalfd() -> Result<OwnedFd, SignalError> {
    // SAFETY: an all-zero sigset_t is a valid value to pass to sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the calls only modify it and this thread's mask.
    let fd = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(SignalError(std::io::Error::last_os_error()));
        }
        libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC)
    };
    if fd < 0 {
        return Err(SignalError(std::io::Error::last_os_error()));
    }
    // SAFETY: signalfd returned a fresh descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Watches everything that can end the VM.
pub struct Lifecycle {
    control: Arc<Control>,
    reset_evt: EventFd,
    signals: OwnedFd,
    api: Option<UnixListener>,
    vcpus: Arc<Vec<VcpuHandle>>,
    started: Instant,
}

impl Lifecycle {
    /// A subscriber over the given sources.
    pub fn new(
        control: Arc<Control>,
        reset_evt: EventFd,
        signals: OwnedFd,
        api: Option<UnixListener>,
        vcpus: Arc<Vec<VcpuHandle>>,
        started: Instant,
    ) -> Self {
        Self {
            control,
            reset_evt,
            signals,
            api,
            vcpus,
            started,
        }
    }
}

impl MutEventSubscriber for Lifecycle {
    fn init(&mut self, ops: &mut EventOps) {
        let mut add = |fd: i32, data: u32| {
            if let Err(e) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                tracing::error!(error = ?e, "registering a lifecycle event");
                self.control
                    .exit(ExitReason::Failed("event loop registration"));
            }
        };
        add(self.reset_evt.as_raw_fd(), RESET);
        add(self.signals.as_raw_fd(), SIGNAL);
        add(self.control.exit_evt.as_raw_fd(), EXIT);
        if let Some(api) = &self.api {
            add(api.as_raw_fd(), API);
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            RESET => {
                let _ = self.reset_evt.read();
                tracing::info!("guest requested a reset through the i8042");
                self.control.exit(ExitReason::GuestShutdown);
            }
            SIGNAL => {
                let mut buf = [0u8; 128];
                // SAFETY: reading into a local buffer of the given size.
                let _ = unsafe {
                    libc::read(self.signals.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
                };
                tracing::info!("termination signal");
                self.control.exit(ExitReason::Signal);
            }
            API => {
                if let Some(api) = &self.api {
                    match api.accept() {
                        Ok((stream, _)) => {
                            api::serve(stream, &self.control, &self.vcpus, self.started)
                        }
                        Err(e) => tracing::debug!(error = %e, "control socket accept"),
                    }
                }
            }
            EXIT => {
                let _ = self.control.exit_evt.read();
            }
            other => tracing::warn!(data = other, "unknown lifecycle event"),
        }
    }
}
