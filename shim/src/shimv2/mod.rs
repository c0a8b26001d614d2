//! The containerd shim v2 (`containerd-shim-pangolin-v2`, runtime `io.containerd.pangolin.v2`).
//!
//! One shim process per pod: containerd runs `start` for the sandbox and again for every container;
//! `start` groups by the `io.kubernetes.cri.sandbox-id` annotation (a plain `ctr run` task is its
//! own group) and prints the group's socket, spawning the shim only once. The first task created
//! boots the pod's VM; the pod's containers run in it through the agent; the VM stops when the
//! task whose id is the group id (the CRI sandbox, or the `ctr run` task) is deleted.
//!
//! Layers: `service` (the `Shim` trait: start/delete/wait) → `task` (thin ttrpc `Task` impl) →
//! `pod` (the pod, with one file per lifecycle verb: `create`, `start`, `kill`, `delete`) over
//! explicit state machines (`vm`: the pod's VM slot; `container`, `process`) and three traits
//! for its side effects, each with a real implementation and fakes in unit tests: `guest` (the
//! agent), `vm::VmLauncher` (booting a sandbox), `mounts` (the virtio-fs share, rootfs and
//! volumes). `events` is one ordered queue to containerd; `io` pumps containerd's FIFOs ↔ agent
//! streams; `rootfs`/`volumes` are the host mount primitives; `guest_spec`/`sizing` shape what
//! the guest and the VM get from the bundle.

pub mod bind;
pub mod bundle;
mod container;
mod create;
mod delete;
pub mod error;
pub mod events;
#[cfg(test)]
mod fakes;
pub mod guest;
pub mod guest_spec;
pub mod hooks;
pub mod io;
mod kill;
pub mod metrics;
pub mod mounts;
pub mod pod;
pub mod process;
pub mod rootfs;
pub mod service;
pub mod sizing;
mod start;
pub mod task;
#[cfg(test)]
mod tests;
pub mod vm;
pub mod volumes;

pub use error::PodError;

/// The runtime type containerd knows this shim by.
pub const RUNTIME_ID: &str = "io.containerd.pangolin.v2";
/// CRI annotation naming the pod a container belongs to.
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";
/// CRI annotation saying whether a task is the pod sandbox or a container.
pub const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";
