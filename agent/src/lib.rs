//! pangolin-agent as a library: everything but `main`. The binary (`main.rs`) is PID 1 of the
//! guest; the fuzz targets (`fuzz/`) drive the request validation here without a VM.

mod cgroup;
mod clock;
mod confinement;
mod console;
mod container;
mod entropy;
pub mod error;
mod forward;
pub mod guest;
pub mod helper;
pub mod net;
mod netlink;
mod oom;
mod reaper;
pub mod sandbox;
pub mod service;
mod share;
mod stdio;
mod vsock_server;
