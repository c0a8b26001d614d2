//! The containerd shim v2 (`containerd-shim-pangolin-v2`, runtime `io.containerd.pangolin.v2`).
//!
//! One shim process per pod: containerd runs `start` for the sandbox and again for every container;
//! `start` groups by the `io.kubernetes.cri.sandbox-id` annotation (a plain `ctr run` task is its
//! own group) and prints the group's socket, spawning the shim only once. The first task created
//! boots the pod's VM; the pod's containers run in it through the agent; the VM stops when the
//! task whose id is the group id (the CRI sandbox, or the `ctr run` task) is deleted.
//!
//! Layers: `service` (the `Shim` trait: start/delete/wait) → `task` (thin ttrpc `Task` impl) →
//! `pod` (VM, containers and processes, backed by agent calls; its map lock is never held across a
//! boot or an agent call) with `rootfs` (host mounts shared over virtio-fs), `io` (containerd's
//! FIFOs ↔ agent streams) and `events` (TaskCreate, TaskExit, ... to containerd).

pub mod events;
pub mod guest_spec;
pub mod io;
pub mod metrics;
pub mod pod;
pub mod rootfs;
pub mod service;
pub mod sizing;
pub mod task;
pub mod volumes;

/// The runtime type containerd knows this shim by.
pub const RUNTIME_ID: &str = "io.containerd.pangolin.v2";
/// CRI annotation naming the pod a container belongs to.
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";
/// CRI annotation saying whether a task is the pod sandbox or a container.
pub const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";
