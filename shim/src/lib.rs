//! Pangolin's host side: hypervisor backends, the guest agent client, sandbox lifecycle, pod
//! networking and the containerd shim v2 (`shimv2`). Shared by `containerd-shim-pangolin-v2`
//! and the `pangolin` CLI. See DESIGN.md.
#![deny(missing_docs)]

pub mod agent;
pub mod artifacts;
pub mod daemon;
pub mod host;
pub mod host_cgroup;
pub mod host_tsc;
pub mod hypervisor;
pub mod jail_ids;
pub mod monitor;
pub mod network;
pub mod rpc_stats;
pub mod sandbox;
pub mod shimv2;
pub mod spec;
pub mod template;
#[cfg(test)]
mod test_dir;
pub mod vsock;

/// An error with its sources, on one line (for logs and for messages that cross to containerd).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
