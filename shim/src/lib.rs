//! Pangolin's host side: hypervisor backends, the guest agent client, and sandbox lifecycle.
//! Shared by the `pangolin` CLI and (later) `containerd-shim-pangolin-v2`. See DESIGN.md.
#![deny(missing_docs)]

pub mod agent;
pub mod artifacts;
pub mod daemon;
pub mod host;
pub mod hypervisor;
pub mod network;
pub mod sandbox;
pub mod shimv2;
pub mod spec;
pub mod vsock;
