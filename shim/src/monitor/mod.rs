//! `pangolin monitor`: Prometheus metrics for every sandbox on the node, found through the
//! state directory (each ready sandbox's `sandbox.json` and `pod.json`, [`crate::sandbox::info`])
//! rather than containerd, and measured from the host's `/proc` at each scrape: per sandbox
//! its size, boot time, uptime and containers, and for each of its host processes (the VMM,
//! virtiofsd, the shim or `pangolin run` that owns it) CPU seconds, RSS, PSS, open fds and
//! threads. `collect.rs` reads, `exposition.rs` writes the text format, `serve.rs` is the HTTP
//! endpoint.

pub mod collect;
pub mod exposition;
pub mod serve;
