//! The VMM's counters: vCPU exits by kind, guest accesses no device serves, and guest-triggered
//! errors per device. One process-wide set of relaxed atomics (a VMM runs one VM), bumped where
//! the event happens and read by the control socket's `metrics` request
//! ([`pangolin_vmm_config::api::Metrics`]), as Firecracker's `METRICS` are.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::api::Metrics;

/// A monotonic counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Zero.
    pub const fn new() -> Counter {
        Counter(AtomicU64::new(0))
    }

    /// Adds one (a relaxed atomic add: nothing is ordered by it).
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Its value now.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// vCPU exits by kind.
#[derive(Debug, Default)]
pub struct Exits {
    /// `KVM_EXIT_IO`, in.
    pub io_in: Counter,
    /// `KVM_EXIT_IO`, out.
    pub io_out: Counter,
    /// `KVM_EXIT_MMIO`, read.
    pub mmio_read: Counter,
    /// `KVM_EXIT_MMIO`, write.
    pub mmio_write: Counter,
    /// Every other exit (shutdown, failed entry, internal error, unexpected ones).
    pub other: Counter,
}

/// Guest-triggered errors per device.
#[derive(Debug, Default)]
pub struct GuestErrorTotals {
    /// virtio-net.
    pub net: Counter,
    /// virtio-vsock (the device and its connection muxer).
    pub vsock: Counter,
    /// virtio-blk.
    pub blk: Counter,
    /// virtio-rng.
    pub rng: Counter,
    /// A device not listed above.
    pub other: Counter,
}

impl GuestErrorTotals {
    /// The counter of the one-queue device named `name` (its `RequestHandler::NAME`).
    pub fn of_device(&self, name: &str) -> &Counter {
        match name {
            "virtio-blk" => &self.blk,
            "virtio-rng" => &self.rng,
            _ => &self.other,
        }
    }
}

/// Every counter of the VMM.
#[derive(Debug, Default)]
pub struct VmmMetrics {
    /// vCPU exits.
    pub exits: Exits,
    /// Port I/O or MMIO accesses of addresses no device serves.
    pub unmapped_accesses: Counter,
    /// Guest-triggered device errors.
    pub guest_errors: GuestErrorTotals,
}

/// The process's counters.
pub static METRICS: VmmMetrics = VmmMetrics {
    exits: Exits {
        io_in: Counter::new(),
        io_out: Counter::new(),
        mmio_read: Counter::new(),
        mmio_write: Counter::new(),
        other: Counter::new(),
    },
    unmapped_accesses: Counter::new(),
    guest_errors: GuestErrorTotals {
        net: Counter::new(),
        vsock: Counter::new(),
        blk: Counter::new(),
        rng: Counter::new(),
        other: Counter::new(),
    },
};

impl VmmMetrics {
    /// The counters now, as the control socket answers them.
    pub fn report(&self) -> Metrics {
        let e = &self.exits;
        let g = &self.guest_errors;
        let map = |pairs: &[(&str, &Counter)]| -> BTreeMap<String, u64> {
            pairs
                .iter()
                .map(|(k, c)| ((*k).to_string(), c.get()))
                .collect()
        };
        Metrics {
            exits: map(&[
                ("io_in", &e.io_in),
                ("io_out", &e.io_out),
                ("mmio_read", &e.mmio_read),
                ("mmio_write", &e.mmio_write),
                ("other", &e.other),
            ]),
            unmapped_accesses: self.unmapped_accesses.get(),
            guest_errors: map(&[
                ("net", &g.net),
                ("vsock", &g.vsock),
                ("blk", &g.blk),
                ("rng", &g.rng),
                ("other", &g.other),
            ]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_names_every_counter_with_its_value() {
        let m = VmmMetrics::default();
        m.exits.mmio_write.inc();
        m.exits.mmio_write.inc();
        m.unmapped_accesses.inc();
        m.guest_errors.of_device("virtio-rng").inc();
        m.guest_errors.of_device("virtio-unknown").inc();
        let r = m.report();
        assert_eq!(r.exits.get("mmio_write"), Some(&2));
        assert_eq!(r.exits.get("io_in"), Some(&0));
        assert_eq!(r.exits.len(), 5);
        assert_eq!(r.unmapped_accesses, 1);
        assert_eq!(r.guest_errors.get("rng"), Some(&1));
        assert_eq!(r.guest_errors.get("other"), Some(&1));
        let json = serde_json::to_string(&r).expect("json");
        assert!(json.contains(r#""mmio_write":2"#), "{json}");
    }
}
