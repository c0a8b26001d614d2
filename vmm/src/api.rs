//! The control socket server: one request line per connection, one answer line back.
//!
//! The messages ([`Request`], [`Status`]) are plain data in `pangolin-vmm-config` (the shim
//! speaks them too); this module reads a request, executes it against the vCPUs and the run
//! state, and writes the answer. Connections are served by the event loop without blocking
//! it ([`Connection`]); at most [`MAX_CONNECTIONS`] are open at once.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::config::api::{Request, State, Status, MAX_LINE, OK};
use crate::snapshot::vm::Snapshotter;
use crate::vstate::control::{Control, ExitReason, RunState};
use crate::vstate::vcpu::VcpuHandle;

/// How long `pause` waits for every vCPU to park.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Executes `req` and returns the answer line (without newline); `snapshotter` is a template
/// VMM's (None: `snapshot` is refused).
pub fn execute(
    req: Request,
    control: &Control,
    vcpus: &[VcpuHandle],
    started: Instant,
    snapshotter: Option<&mut Snapshotter>,
) -> String {
    match req {
        Request::Pause => {
            if !control.request_pause() {
                return "error: not running".into();
            }
            let kick = || vcpus.iter().for_each(VcpuHandle::kick);
            if control.wait_parked(vcpus.len(), PAUSE_TIMEOUT, kick) {
                OK.into()
            } else {
                control.resume();
                "error: vCPUs did not park".into()
            }
        }
        Request::Resume => {
            if control.resume() {
                OK.into()
            } else {
                "error: not paused".into()
            }
        }
        Request::Stop => {
            control.exit(ExitReason::Requested);
            OK.into()
        }
        Request::Status => {
            let status = Status {
                state: match control.state() {
                    RunState::Running => State::Running,
                    RunState::Paused => State::Paused,
                    RunState::HandingOver | RunState::Stopping => State::Stopping,
                },
                vcpus: vcpus.len(),
                // Saturates after 584 million years.
                uptime_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            };
            serde_json::to_string(&status).unwrap_or_else(|e| format!("error: {e}"))
        }
        Request::Metrics => serde_json::to_string(&crate::metrics::METRICS.report())
            .unwrap_or_else(|e| format!("error: {e}")),
        Request::Snapshot => match snapshotter {
            None => "error: no snapshot files configured (not a template)".into(),
            Some(s) => match s.take() {
                Ok(_) => OK.into(),
                Err(e) => format!("error: {}", error_chain(&e)),
            },
        },
    }
}

/// An error with its sources, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

/// Most control connections open at once; a new one beyond that closes the oldest.
pub const MAX_CONNECTIONS: usize = 4;

/// Whether a connection is finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Its request line is not complete yet: keep watching it.
    Pending,
    /// Answered (or given up on): close it.
    Done,
}

/// One accepted control connection, served by the event loop without ever blocking it: each
/// readiness event reads what has arrived, and the request runs once its line is complete. A
/// client that stalls only keeps its own slot (see [`MAX_CONNECTIONS`]).
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    line: Vec<u8>,
    opened: Instant,
}

impl Connection {
    /// Adopts an accepted stream (made non-blocking).
    ///
    /// # Errors
    /// The stream cannot be made non-blocking.
    pub fn new(stream: UnixStream) -> std::io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Self {
            stream,
            line: Vec::with_capacity(MAX_LINE),
            opened: Instant::now(),
        })
    }

    /// The stream, to watch.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// When it was accepted.
    pub fn opened(&self) -> Instant {
        self.opened
    }

    /// Reads what has arrived; once the request line is complete, executes it and answers.
    pub fn on_readable(
        &mut self,
        control: &Control,
        vcpus: &[VcpuHandle],
        started: Instant,
        mut snapshotter: Option<&mut Snapshotter>,
    ) -> Progress {
        let mut chunk = [0u8; MAX_LINE];
        loop {
            let room = MAX_LINE.saturating_sub(self.line.len());
            if room == 0 {
                // An overlong line is refused.
                self.answer("error: unknown request");
                return Progress::Done;
            }
            let Some(buf) = chunk.get_mut(..room) else {
                return Progress::Done;
            };
            match self.stream.read(buf) {
                Ok(0) => return Progress::Done,
                Ok(n) => {
                    let got = buf.get(..n).unwrap_or_default();
                    if let Some(end) = got.iter().position(|&b| b == b'\n') {
                        self.line
                            .extend_from_slice(got.get(..end).unwrap_or_default());
                        let text = String::from_utf8_lossy(&self.line).into_owned();
                        let answer = match Request::parse(&text) {
                            Some(req) => execute(req, control, vcpus, started, snapshotter.take()),
                            None => "error: unknown request".into(),
                        };
                        self.answer(&answer);
                        return Progress::Done;
                    }
                    self.line.extend_from_slice(got);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Progress::Pending,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Progress::Done,
            }
        }
    }

    fn answer(&mut self, answer: &str) {
        // A few dozen bytes into an empty socket buffer: a client that does not read loses it.
        let _ = self.stream.write_all(format!("{answer}\n").as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_execute() {
        let c = Control::new().expect("control");
        let t = Instant::now();
        assert_eq!(
            execute(Request::Resume, &c, &[], t, None),
            "error: not paused"
        );
        assert_eq!(execute(Request::Pause, &c, &[], t, None), "ok");
        let status: Status =
            serde_json::from_str(&execute(Request::Status, &c, &[], t, None)).expect("status json");
        assert_eq!((status.state, status.vcpus), (State::Paused, 0));
        assert_eq!(execute(Request::Resume, &c, &[], t, None), "ok");
        assert_eq!(
            execute(Request::Snapshot, &c, &[], t, None),
            "error: no snapshot files configured (not a template)"
        );
        assert_eq!(execute(Request::Stop, &c, &[], t, None), "ok");
        assert_eq!(c.exit_reason(), Some(ExitReason::Requested));
        let status: Status =
            serde_json::from_str(&execute(Request::Status, &c, &[], t, None)).expect("status json");
        assert_eq!(status.state, State::Stopping);
    }

    /// Sends `bytes` on a fresh connection and serves it; returns the progress and the answer.
    fn exchange(bytes: &[u8], c: &Control) -> (Progress, String) {
        let (a, mut b) = UnixStream::pair().expect("pair");
        let mut conn = Connection::new(a).expect("conn");
        b.write_all(bytes).expect("write");
        let progress = conn.on_readable(c, &[], Instant::now(), None);
        drop(conn);
        let mut out = String::new();
        let _ = b.read_to_string(&mut out);
        (progress, out)
    }

    #[test]
    fn socket_round_trip_and_garbage() {
        let c = Control::new().expect("control");
        let (p, out) = exchange(b"status\n", &c);
        assert_eq!(p, Progress::Done);
        assert!(out.starts_with("{\"state\":\"running\",\"vcpus\":0,\"uptime_ms\":"));
        assert!(out.ends_with("}\n"));
        assert_eq!(exchange(b"bogus\n", &c).1, "error: unknown request\n");
        // An overlong line is refused once MAX_LINE bytes arrived without a newline.
        assert_eq!(exchange(&[b'x'; 200], &c).1, "error: unknown request\n");
    }

    #[test]
    fn a_partial_request_waits_without_blocking_and_completes_later() {
        let c = Control::new().expect("control");
        let (a, mut b) = UnixStream::pair().expect("pair");
        let mut conn = Connection::new(a).expect("conn");
        let t = Instant::now();
        assert_eq!(
            conn.on_readable(&c, &[], t, None),
            Progress::Pending,
            "nothing sent"
        );
        b.write_all(b"sta").expect("write");
        assert_eq!(
            conn.on_readable(&c, &[], t, None),
            Progress::Pending,
            "half a line"
        );
        assert!(
            t.elapsed() < Duration::from_millis(100),
            "the loop was blocked"
        );
        b.write_all(b"tus\n").expect("write");
        assert_eq!(conn.on_readable(&c, &[], t, None), Progress::Done);
        drop(conn);
        let mut out = String::new();
        b.read_to_string(&mut out).expect("read");
        assert!(out.starts_with("{\"state\":\"running\""), "{out}");
    }
}
