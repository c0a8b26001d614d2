//! The control socket server: one request line per connection, one answer line back.
//!
//! The messages ([`Request`], [`Status`]) are plain data in `pangolin-vmm-config` (the shim
//! speaks them too); this module reads a request, executes it against the vCPUs and the run
//! state, and writes the answer. A client that sends nothing within [`READ_TIMEOUT`] is dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::config::api::{Request, State, Status, MAX_LINE, OK};
use crate::vstate::control::{Control, ExitReason, RunState};
use crate::vstate::vcpu::VcpuHandle;

/// How long a client may take to send its request.
pub const READ_TIMEOUT: Duration = Duration::from_millis(500);
/// How long `pause` waits for every vCPU to park.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Executes `req` and returns the answer line (without newline).
pub fn execute(req: Request, control: &Control, vcpus: &[VcpuHandle], started: Instant) -> String {
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
                    RunState::Stopping => State::Stopping,
                },
                vcpus: vcpus.len(),
                // Saturates after 584 million years.
                uptime_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            };
            serde_json::to_string(&status).unwrap_or_else(|e| format!("error: {e}"))
        }
    }
}

/// Serves one accepted connection.
pub fn serve(stream: UnixStream, control: &Control, vcpus: &[VcpuHandle], started: Instant) {
    if stream.set_nonblocking(false).is_err()
        || stream.set_read_timeout(Some(READ_TIMEOUT)).is_err()
    {
        return;
    }
    let mut line = String::new();
    let reader = stream.try_clone();
    let Ok(reader) = reader else { return };
    let read = BufReader::new(reader.take(MAX_LINE as u64)).read_line(&mut line);
    let answer = match (read, Request::parse(&line)) {
        (Ok(_), Some(req)) => execute(req, control, vcpus, started),
        (Ok(_), None) => "error: unknown request".into(),
        (Err(_), _) => return,
    };
    let mut stream = stream;
    let _ = stream.write_all(format!("{answer}\n").as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_execute() {
        let c = Control::new().expect("control");
        let t = Instant::now();
        assert_eq!(execute(Request::Resume, &c, &[], t), "error: not paused");
        assert_eq!(execute(Request::Pause, &c, &[], t), "ok");
        let status: Status =
            serde_json::from_str(&execute(Request::Status, &c, &[], t)).expect("status json");
        assert_eq!((status.state, status.vcpus), (State::Paused, 0));
        assert_eq!(execute(Request::Resume, &c, &[], t), "ok");
        assert_eq!(execute(Request::Stop, &c, &[], t), "ok");
        assert_eq!(c.exit_reason(), Some(ExitReason::Requested));
        let status: Status =
            serde_json::from_str(&execute(Request::Status, &c, &[], t)).expect("status json");
        assert_eq!(status.state, State::Stopping);
    }

    #[test]
    fn socket_round_trip_and_garbage() {
        let (a, mut b) = UnixStream::pair().expect("pair");
        let c = Control::new().expect("control");
        b.write_all(b"status\n").expect("write");
        serve(a, &c, &[], Instant::now());
        let mut out = String::new();
        b.read_to_string(&mut out).expect("read");
        assert!(out.starts_with("{\"state\":\"running\",\"vcpus\":0,\"uptime_ms\":"));
        assert!(out.ends_with("}\n"));
        let (a, mut b) = UnixStream::pair().expect("pair");
        b.write_all(b"bogus\n").expect("write");
        serve(a, &c, &[], Instant::now());
        let mut out = String::new();
        b.read_to_string(&mut out).expect("read");
        assert_eq!(out, "error: unknown request\n");
        // An overlong line is cut at MAX_LINE: refused (the peer may see a reset instead).
        let (a, mut b) = UnixStream::pair().expect("pair");
        b.write_all(&[b'x'; 200]).expect("write");
        serve(a, &c, &[], Instant::now());
        let mut out = String::new();
        if b.read_to_string(&mut out).is_ok() {
            assert_eq!(out, "error: unknown request\n");
        }
    }
}
