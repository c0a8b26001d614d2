//! Latency histograms of the agent calls a sandbox's owner makes, per method, and the file
//! they are published in for `pangolin monitor` (`<workdir>/rpc.json`, rewritten every
//! [`PUBLISH_EVERY`] while something changed): the monitor is another process and finds the
//! figures without asking the shim.
//!
//! Calls that wait for the guest by design (WaitProcess, the stream reads, GetOomEvent: they
//! last as long as the process or until output comes) are not timed: they would only measure
//! the workload.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Upper bounds of the histogram buckets, in seconds (`+Inf` follows).
pub const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// How often the file is rewritten while calls are made.
pub const PUBLISH_EVERY: Duration = Duration::from_secs(2);

/// The file's name in the sandbox directory.
pub const FILE: &str = "rpc.json";

/// Methods that wait for the guest's workload by design: not timed.
const LONG_POLLS: [&str; 4] = ["WaitProcess", "ReadStdout", "ReadStderr", "GetOomEvent"];

/// One method's histogram.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Calls at most each [`BUCKETS`] bound (not cumulative; one more for `+Inf`).
    pub buckets: Vec<u64>,
    /// Calls.
    pub count: u64,
    /// Their total time, in seconds.
    pub sum_seconds: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        if self.buckets.len() != BUCKETS.len() + 1 {
            self.buckets = vec![0; BUCKETS.len() + 1];
        }
        let i = BUCKETS
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(BUCKETS.len());
        self.buckets[i] += 1;
        self.count += 1;
        self.sum_seconds += seconds;
    }

    /// Cumulative counts per bound, `+Inf` last, as Prometheus' `le` buckets are.
    pub fn cumulative(&self) -> Vec<u64> {
        self.buckets
            .iter()
            .scan(0u64, |sum, n| {
                *sum = sum.saturating_add(*n);
                Some(*sum)
            })
            .collect()
    }
}

/// The histograms of one agent connection and its clones.
#[derive(Debug, Default)]
pub struct RpcStats {
    methods: Mutex<BTreeMap<&'static str, Histogram>>,
    changed: AtomicBool,
}

impl RpcStats {
    /// Records one call of `method` that took `took` (long polls are ignored).
    pub fn observe(&self, method: &'static str, took: Duration) {
        if LONG_POLLS.contains(&method) {
            return;
        }
        self.methods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(method)
            .or_default()
            .observe(took.as_secs_f64());
        self.changed.store(true, Ordering::Relaxed);
    }

    /// Every method's histogram now.
    pub fn snapshot(&self) -> BTreeMap<String, Histogram> {
        self.methods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| ((*k).to_string(), v.clone()))
            .collect()
    }

    /// Writes the histograms into `dir`'s [`FILE`] when they changed since the last write.
    pub fn publish(&self, dir: &Path) -> std::io::Result<()> {
        if !self.changed.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let path = dir.join(FILE);
        let tmp = path.with_extension("json.new");
        let text = serde_json::to_vec(&self.snapshot()).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &path)
    }

    /// Publishes into `dir` every [`PUBLISH_EVERY`] until the returned task is aborted (the
    /// sandbox's teardown does).
    pub fn publish_every(self: &Arc<Self>, dir: PathBuf) -> tokio::task::JoinHandle<()> {
        let stats = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PUBLISH_EVERY);
            loop {
                tick.tick().await;
                if let Err(e) = stats.publish(&dir) {
                    tracing::debug!(error = %e, "cannot publish the agent call figures");
                }
            }
        })
    }
}

/// The histograms a sandbox published in `dir` (none when it has not yet, or the file is not
/// one: it is the shim's, not trusted beyond its shape).
pub fn read(dir: &Path) -> BTreeMap<String, Histogram> {
    std::fs::read(dir.join(FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<BTreeMap<String, Histogram>>(&b).ok())
        .map(|mut m| {
            m.retain(|_, h| h.buckets.len() == BUCKETS.len() + 1);
            m
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_land_in_their_buckets_long_polls_are_ignored_and_the_file_round_trips() {
        let stats = RpcStats::default();
        stats.observe("CreateContainer", Duration::from_micros(300));
        stats.observe("CreateContainer", Duration::from_millis(7));
        stats.observe("CreateContainer", Duration::from_secs(9));
        stats.observe("WaitProcess", Duration::from_secs(60));
        let snap = stats.snapshot();
        assert_eq!(snap.len(), 1, "{snap:?}");
        let h = &snap["CreateContainer"];
        assert_eq!(h.count, 3);
        assert_eq!(h.buckets[0], 1, "0.3 ms <= 0.5 ms");
        assert_eq!(h.buckets[4], 1, "7 ms <= 10 ms");
        assert_eq!(h.buckets[BUCKETS.len()], 1, "9 s: +Inf");
        assert_eq!(*h.cumulative().last().expect("+Inf"), 3);
        assert!((h.sum_seconds - 9.0073).abs() < 1e-9, "{}", h.sum_seconds);

        let dir = crate::test_dir::TestDir::new("rpc-stats");
        stats.publish(&dir.path).expect("publish");
        assert_eq!(read(&dir.path), snap);
        // Nothing changed: the file is not rewritten.
        std::fs::write(dir.path.join(FILE), "{}").expect("overwrite");
        stats.publish(&dir.path).expect("publish");
        assert!(read(&dir.path).is_empty());
        std::fs::write(dir.path.join(FILE), "not json").expect("garbage");
        assert!(read(&dir.path).is_empty());
    }
}
