//! The event-loop subscriber that ends the VMM: guest reset (i8042), SIGTERM/SIGINT (signalfd),
//! the control socket, and the vCPUs' exit eventfd.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::Instant;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use crate::api;
use crate::snapshot::vm::Snapshotter;
use crate::vstate::control::{Control, ExitReason};
use crate::vstate::vcpu::VcpuHandle;

const RESET: u32 = 1;
const SIGNAL: u32 = 2;
const API: u32 = 3;
const EXIT: u32 = 4;
/// Control connections get tokens from here up (one per accepted connection).
const API_CONN: u32 = 16;

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
    /// Open control connections by token, oldest first.
    conns: Vec<(u32, api::Connection)>,
    next_conn: u32,
    /// A template VMM's snapshot writer (the `snapshot` request).
    snapshotter: Option<Snapshotter>,
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
        snapshotter: Option<Snapshotter>,
    ) -> Self {
        Self {
            control,
            reset_evt,
            signals,
            api,
            vcpus,
            started,
            conns: Vec::new(),
            next_conn: API_CONN,
            snapshotter,
        }
    }

    /// Watches a newly accepted control connection; the oldest one goes if all slots are taken.
    fn add_connection(&mut self, stream: std::os::unix::net::UnixStream, ops: &mut EventOps) {
        let conn = match api::Connection::new(stream) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "control connection");
                return;
            }
        };
        if self.conns.len() >= api::MAX_CONNECTIONS {
            if let Some((token, old)) = (!self.conns.is_empty()).then(|| self.conns.remove(0)) {
                tracing::debug!(
                    token,
                    age_ms = old.opened().elapsed().as_millis(),
                    "closing the oldest control connection"
                );
                let _ = ops.remove(Events::with_data(old.stream(), token, EventSet::IN));
            }
        }
        let token = self.next_conn;
        self.next_conn = self.next_conn.checked_add(1).unwrap_or(API_CONN);
        if let Err(e) = ops.add(Events::with_data(
            conn.stream(),
            token,
            EventSet::IN | EventSet::READ_HANG_UP,
        )) {
            tracing::warn!(error = ?e, "registering a control connection");
            return;
        }
        self.conns.push((token, conn));
        // The request may already be there.
        self.serve_connection(token, ops);
    }

    fn serve_connection(&mut self, token: u32, ops: &mut EventOps) {
        let Some(at) = self.conns.iter().position(|(t, _)| *t == token) else {
            return;
        };
        let progress = match self.conns.get_mut(at) {
            Some((_, conn)) => conn.on_readable(
                &self.control,
                &self.vcpus,
                self.started,
                self.snapshotter.as_mut(),
            ),
            None => return,
        };
        if progress == api::Progress::Done {
            let (token, conn) = self.conns.remove(at);
            let _ = ops.remove(Events::with_data(conn.stream(), token, EventSet::IN));
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

    fn process(&mut self, events: Events, ops: &mut EventOps) {
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
                let accepted = self.api.as_ref().map(UnixListener::accept);
                match accepted {
                    Some(Ok((stream, _))) => self.add_connection(stream, ops),
                    Some(Err(e)) => tracing::debug!(error = %e, "control socket accept"),
                    None => {}
                }
            }
            EXIT => {
                let _ = self.control.exit_evt.read();
            }
            token if token >= API_CONN => self.serve_connection(token, ops),
            other => tracing::warn!(data = other, "unknown lifecycle event"),
        }
    }
}
