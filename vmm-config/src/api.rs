//! The control socket's messages: one request line per connection, one answer line back.
//!
//! Requests: `pause`, `resume`, `stop`, `status`, `snapshot`, `metrics` ([`Request`]). Answers:
//! `ok`, `error: <why>`, for `status` a JSON [`Status`] object
//! `{"state":"running","vcpus":N,"uptime_ms":N}`, for `metrics` a JSON [`Metrics`] object. A
//! request line is at most [`MAX_LINE`] bytes.

use serde::{Deserialize, Serialize};

/// Longest request line.
pub const MAX_LINE: usize = 64;
/// The answer to a request that succeeded.
pub const OK: &str = "ok";

/// A control request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Park the vCPUs.
    Pause,
    /// Unpark them.
    Resume,
    /// Stop the VMM (exit status 3).
    Stop,
    /// Report the state as a [`Status`].
    Status,
    /// A template's VMM: stop the vCPUs, write the VM to its configured snapshot files and exit
    /// (status 5); the answer, `ok` or `error: <why>`, comes before the exit.
    Snapshot,
    /// Report the VMM's counters as [`Metrics`].
    Metrics,
}

impl Request {
    /// Every request, for tests and help texts.
    pub const ALL: [Request; 6] = [
        Self::Pause,
        Self::Resume,
        Self::Stop,
        Self::Status,
        Self::Snapshot,
        Self::Metrics,
    ];

    /// Parses one request line (a trailing newline is allowed).
    pub fn parse(line: &str) -> Option<Self> {
        let word = line.trim_end_matches(['\n', '\r']);
        Self::ALL.into_iter().find(|r| r.as_str() == word)
    }

    /// The request's word on the wire (without newline).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Stop => "stop",
            Self::Status => "status",
            Self::Snapshot => "snapshot",
            Self::Metrics => "metrics",
        }
    }
}

/// Where the VM is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// The vCPUs run.
    Running,
    /// The vCPUs are parked.
    Paused,
    /// The VMM is exiting.
    Stopping,
}

/// The answer to [`Request::Status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    /// Run state.
    pub state: State,
    /// Number of vCPUs.
    pub vcpus: usize,
    /// Milliseconds since the VMM started the VM.
    pub uptime_ms: u64,
}

/// The answer to [`Request::Metrics`]: counters since the VMM started (a restored VMM counts
/// from its restore). Fields may be added; a reader ignores unknown ones.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Metrics {
    /// vCPU exits to the VMM, by kind: `io_in`, `io_out`, `mmio_read`, `mmio_write`, `other`.
    pub exits: std::collections::BTreeMap<String, u64>,
    /// Guest accesses of port I/O or MMIO addresses no device serves.
    pub unmapped_accesses: u64,
    /// Guest-triggered errors per device (`net`, `vsock`, `blk`, `rng`): malformed descriptor
    /// chains, requests refused, guest connections over the limit.
    pub guest_errors: std::collections::BTreeMap<String, u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_garbage_is_refused() {
        for r in Request::ALL {
            assert_eq!(Request::parse(r.as_str()), Some(r));
            assert_eq!(Request::parse(&format!("{}\n", r.as_str())), Some(r));
            assert_eq!(Request::parse(&format!("{}\r\n", r.as_str())), Some(r));
        }
        assert_eq!(Request::parse("reboot\n"), None);
        assert_eq!(Request::parse(" pause"), None);
        assert_eq!(Request::parse(""), None);
    }

    #[test]
    fn status_has_the_documented_wire_form() {
        let s = Status {
            state: State::Paused,
            vcpus: 2,
            uptime_ms: 1500,
        };
        let json = serde_json::to_string(&s).expect("json");
        assert_eq!(json, r#"{"state":"paused","vcpus":2,"uptime_ms":1500}"#);
        assert_eq!(serde_json::from_str::<Status>(&json).expect("parse"), s);
        let unknown = r#"{"state":"resting","vcpus":2,"uptime_ms":1}"#;
        assert!(serde_json::from_str::<Status>(unknown).is_err());
    }
}
