//! The control socket: one request line per connection, one answer line back.
//!
//! Requests: `pause`, `resume`, `stop`, `status`. Answers: `ok`, `error: <why>`, or for `status`
//! a JSON object `{"state":"running"|"paused"|"stopping","vcpus":N,"uptime_ms":N}`. Lines are
//! at most [`MAX_LINE`] bytes; a client that sends nothing within [`READ_TIMEOUT`] is dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::vstate::control::{Control, ExitReason, RunState};
use crate::vstate::vcpu::VcpuHandle;

/// Longest request line.
pub const MAX_LINE: usize = 64;
/// How long a client may take to send its request.
pub const READ_TIMEOUT: Duration = Duration::from_millis(500);
/// How long `pause` waits for every vCPU to park.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// A parsed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Park the vCPUs.
    Pause,
    /// Unpark them.
    Resume,
    /// Stop the VMM (exit status 3).
    Stop,
    /// Report the state.
    Status,
}

/// Parses one request line.
pub fn parse(line: &str) -> Option<Request> {
    match line.trim_end_matches(['\n', '\r']) {
        "pause" => Some(Request::Pause),
        "resume" => Some(Request::Resume),
        "stop" => Some(Request::Stop),
        "status" => Some(Request::Status),
        _ => None,
    }
}

/// Executes `req` and returns the answer line (without newline).
pub fn execute(req: Request, control: &Control, vcpus: &[VcpuHandle], started: Instant) -> String {
    match req {
        Request::Pause => {
            if !control.request_pause() {
                return "error: not running".into();
            }
            let kick = || vcpus.iter().for_each(VcpuHandle::kick);
            if control.wait_parked(vcpus.len(), PAUSE_TIMEOUT, kick) {
                "ok".into()
            } else {
                control.resume();
                "error: vCPUs did not park".into()
            }
        }
        Request::Resume => {
            if control.resume() {
                "ok".into()
            } else {
                "error: not paused".into()
            }
        }
        Request::Stop => {
            control.exit(ExitReason::Requested);
            "ok".into()
        }
        Request::Status => {
            let state = match control.state() {
                RunState::Running => "running",
                RunState::Paused => "paused",
                RunState::Stopping => "stopping",
            };
            format!(
                "{{\"state\":\"{state}\",\"vcpus\":{},\"uptime_ms\":{}}}",
                vcpus.len(),
                started.elapsed().as_millis()
            )
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
    let answer = match (read, parse(&line)) {
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
    fn requests_parse_and_execute() {
        assert_eq!(parse("pause\n"), Some(Request::Pause));
        assert_eq!(parse("status"), Some(Request::Status));
        assert_eq!(parse("reboot\n"), None);
        let c = Control::new().expect("control");
        let t = Instant::now();
        assert_eq!(execute(Request::Resume, &c, &[], t), "error: not paused");
        assert_eq!(execute(Request::Pause, &c, &[], t), "ok");
        assert!(
            execute(Request::Status, &c, &[], t).starts_with("{\"state\":\"paused\",\"vcpus\":0")
        );
        assert_eq!(execute(Request::Resume, &c, &[], t), "ok");
        assert_eq!(execute(Request::Stop, &c, &[], t), "ok");
        assert_eq!(c.exit_reason(), Some(ExitReason::Requested));
    }

    #[test]
    fn socket_round_trip_and_garbage() {
        let (a, mut b) = UnixStream::pair().expect("pair");
        let c = Control::new().expect("control");
        b.write_all(b"status\n").expect("write");
        serve(a, &c, &[], Instant::now());
        let mut out = String::new();
        b.read_to_string(&mut out).expect("read");
        assert!(out.starts_with("{\"state\":\"running\""));
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
