//! Installs Pangolin on a node and removes it again: the binaries and guest artifacts, the CRI
//! runtime handler in containerd's configuration, containerd's restart, the node's label; each
//! step recorded on the node so that `uninstall` undoes exactly what `install` did.
//!
//! Used by the installer DaemonSet (`deploy/kubernetes/`, the node's root at `/host`) and on a
//! node directly (`pangolin-deploy install --root /`). See DESIGN.md.

pub mod containerd;
pub mod install;
pub mod node;
pub mod payload;
pub mod state;
