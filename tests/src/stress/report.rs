//! What a stress run measured, and its text.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Result;

/// Durations of each CRI call, in milliseconds.
#[derive(Debug, Default, Clone)]
pub struct Calls(pub BTreeMap<&'static str, Vec<f64>>);

impl Calls {
    pub(super) async fn time<T, E: std::fmt::Display>(
        &mut self,
        call: &'static str,
        f: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T> {
        let t = Instant::now();
        let out = f.await.map_err(|e| anyhow::anyhow!("{call}: {e}"))?;
        self.0
            .entry(call)
            .or_default()
            .push(t.elapsed().as_secs_f64() * 1000.0);
        Ok(out)
    }
}

/// The quantile `per_mille`/1000 of `values` (nearest rank: p50 is 500, p99 990); 0 for none.
pub fn quantile(values: &[f64], per_mille: usize) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = (per_mille.min(1000) * v.len())
        .div_ceil(1000)
        .clamp(1, v.len());
    v[rank - 1]
}

/// One handler's cycles.
#[derive(Debug, Default, Clone)]
pub struct CycleReport {
    /// The handler.
    pub handler: String,
    /// Every call's durations.
    pub calls: Calls,
    /// Each cycle's time (ms).
    pub cycle_ms: Vec<f64>,
    /// containerd's RSS after each cycle (KiB).
    pub containerd_rss_kib: Vec<u64>,
    /// containerd's open descriptors after each cycle.
    pub containerd_fds: Vec<u64>,
}

/// One handler's parallel start.
#[derive(Debug, Default, Clone)]
pub struct ParallelReport {
    /// The handler.
    pub handler: String,
    /// Pods.
    pub pods: usize,
    /// Start of all RunPodSandbox calls until every pod's container runs (ms).
    pub all_ready_ms: f64,
    /// Host memory per pod (KiB): PSS of the pods' processes and shims, guest RAM left out.
    pub pss_per_pod_kib: f64,
    /// The same per process name (KiB per pod).
    pub pss_per_pod_by_process: BTreeMap<String, f64>,
}

/// The soak's outcome.
#[derive(Debug, Default, Clone)]
pub struct SoakReport {
    /// Cycles completed.
    pub cycles: usize,
    /// Workers that ran them.
    pub workers: usize,
    /// Its length (minutes).
    pub minutes: f64,
    /// Every call's durations.
    pub calls: Calls,
    /// A sample at the end of each whole minute.
    pub per_minute: Vec<SoakSample>,
}

/// One minute of a soak.
#[derive(Debug, Default, Clone)]
pub struct SoakSample {
    /// Cycles completed in that minute.
    pub cycles: usize,
    /// containerd's RSS at its end (KiB).
    pub containerd_rss_kib: u64,
    /// containerd's open descriptors at its end.
    pub containerd_fds: u64,
    /// The host's available memory at its end (MiB).
    pub host_available_mib: u64,
}

/// Everything one run measured.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Per handler.
    pub cycles: Vec<CycleReport>,
    /// Per handler.
    pub parallel: Vec<ParallelReport>,
    /// The soak, if any.
    pub soak: Option<SoakReport>,
    /// How many entries each category of the audit's baseline had.
    pub audited: BTreeMap<&'static str, usize>,
}

impl Report {
    /// The report as text, one figure per line.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let tenth = |v: &[f64], last: bool| -> f64 {
            let k = (v.len() / 10).max(1).min(v.len());
            let part = if last { &v[v.len() - k..] } else { &v[..k] };
            quantile(part, 500)
        };
        for c in &self.cycles {
            let _ = writeln!(out, "cycles ({}): {}", c.handler, c.cycle_ms.len());
            for (call, v) in &c.calls.0 {
                let _ = writeln!(
                    out,
                    "  {call:<17} p50 {:>8.1} ms  p99 {:>8.1} ms  ({} calls)",
                    quantile(v, 500),
                    quantile(v, 990),
                    v.len()
                );
            }
            let rss: Vec<f64> = c.containerd_rss_kib.iter().map(|&k| k as f64).collect();
            let fds: Vec<f64> = c.containerd_fds.iter().map(|&k| k as f64).collect();
            let _ = writeln!(
                out,
                "  drift, first tenth -> last tenth (medians): cycle {:.0} -> {:.0} ms, containerd RSS {:.0} -> {:.0} KiB, containerd fds {:.0} -> {:.0}",
                tenth(&c.cycle_ms, false),
                tenth(&c.cycle_ms, true),
                tenth(&rss, false),
                tenth(&rss, true),
                tenth(&fds, false),
                tenth(&fds, true),
            );
        }
        for p in &self.parallel {
            let parts: Vec<String> = p
                .pss_per_pod_by_process
                .iter()
                .map(|(name, kib)| format!("{name} {:.1}", kib / 1024.0))
                .collect();
            let _ = writeln!(
                out,
                "parallel ({}): {} pods ready in {:.0} ms; host memory per pod {:.1} MiB (PSS, guest RAM left out: {})",
                p.handler,
                p.pods,
                p.all_ready_ms,
                p.pss_per_pod_kib / 1024.0,
                parts.join(", ")
            );
        }
        if let [a, b] = self.parallel.as_slice() {
            if b.all_ready_ms > 0.0 && b.pss_per_pod_kib > 0.0 {
                let _ = writeln!(
                    out,
                    "parallel {} / {}: time to all ready {:.2}x, memory per pod {:.2}x",
                    a.handler,
                    b.handler,
                    a.all_ready_ms / b.all_ready_ms,
                    a.pss_per_pod_kib / b.pss_per_pod_kib
                );
            }
        }
        let audited: Vec<String> = self
            .audited
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        if !audited.is_empty() {
            let _ = writeln!(
                out,
                "audit baseline (entries per category): {}",
                audited.join(", ")
            );
        }
        if let Some(s) = &self.soak {
            let _ = writeln!(
                out,
                "soak: {} cycles in {:.0} min by {} workers",
                s.cycles, s.minutes, s.workers
            );
            if let (Some(first), Some(last)) = (s.per_minute.first(), s.per_minute.last()) {
                let _ = writeln!(
                    out,
                    "  drift, first minute -> last: {} -> {} cycles, containerd RSS {} -> {} KiB, \
                     containerd fds {} -> {}, host available {} -> {} MiB",
                    first.cycles,
                    last.cycles,
                    first.containerd_rss_kib,
                    last.containerd_rss_kib,
                    first.containerd_fds,
                    last.containerd_fds,
                    first.host_available_mib,
                    last.host_available_mib
                );
            }
            for (call, v) in &s.calls.0 {
                let _ = writeln!(
                    out,
                    "  {call:<17} p50 {:>8.1} ms  p99 {:>8.1} ms",
                    quantile(v, 500),
                    quantile(v, 990)
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 500), 50.0);
        assert_eq!(quantile(&v, 990), 99.0);
        assert_eq!(quantile(&[3.0], 990), 3.0);
        assert_eq!(quantile(&[], 500), 0.0);
    }

    #[test]
    fn a_soak_shows_its_first_and_last_minute() {
        let minute = |cycles, rss| SoakSample {
            cycles,
            containerd_rss_kib: rss,
            containerd_fds: 40,
            host_available_mib: 20_000,
        };
        let report = Report {
            soak: Some(SoakReport {
                cycles: 61,
                workers: 2,
                minutes: 2.0,
                calls: Calls(
                    [("RunPodSandbox", vec![900.0, 1100.0])]
                        .into_iter()
                        .collect(),
                ),
                per_minute: vec![minute(30, 50_000), minute(31, 51_000)],
            }),
            ..Report::default()
        };
        let text = report.render();
        assert!(
            text.contains("soak: 61 cycles in 2 min by 2 workers"),
            "{text}"
        );
        assert!(
            text.contains("30 -> 31 cycles, containerd RSS 50000 -> 51000 KiB"),
            "{text}"
        );
        assert!(text.contains("RunPodSandbox"), "{text}");
    }
}
