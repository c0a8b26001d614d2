//! The Pangolin agent API, shared by the host (shim, `pangolin` CLI) and the guest agent.
//!
//! `agent.proto` is the source of truth; this crate only compiles it. Bump [`API_VERSION`]
//! together with the proto package name on any incompatible change.
#![deny(missing_docs)]

/// Version of the agent API spoken by this build; reported by `GetGuestDetails`.
pub const API_VERSION: u32 = 1;

/// vsock port the agent's ttrpc server listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Host vsock port (CID 2) the agent dials once it serves: the host's readiness signal, so
/// the host never polls a guest that is still booting.
pub const AGENT_READY_PORT: u32 = 1025;

/// Guest path where the agent mounts the sandbox's virtio-fs share.
pub const GUEST_SHARED_DIR: &str = "/run/pangolin/shared";

/// Kernel command line key setting the agent's log level.
pub const LOG_PARAM: &str = "pangolin.log";

/// Protobuf messages of the agent API.
#[allow(missing_docs, warnings, clippy::all, clippy::pedantic)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

/// ttrpc client and server stubs of the agent API.
#[allow(missing_docs, warnings, clippy::all, clippy::pedantic)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}
