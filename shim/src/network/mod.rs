//! Pod networking on the host (Kata's tc-redirect model). CNI gave the pod a network namespace
//! holding a veth with the pod's addresses; here that namespace also gets a tap, and tc mirrors
//! every frame between veth and tap in both directions, with no host bridge or host iptables
//! changes:
//!
//! ```text
//!  host bridge ── veth (pod netns) ──ingress: u32 match-all, mirred egress redirect──▶ tap0_pgn
//!                      ◀──mirred egress redirect, u32 match-all :ingress── tap0_pgn ◀── VMM ◀── guest NIC
//! ```
//!
//! The VMM runs in the namespace and serves the tap as the guest's virtio-net NIC with the
//! veth's MAC; the agent then gives that NIC the veth's addresses (IPv4 and IPv6), MTU and
//! routes, so the guest answers for the pod's IPs while the veth's own stack never sees a frame.
//!
//! Everything is netlink (`rtnetlink`) spoken from a thread that entered the pod's namespace
//! (`netns.rs`); the tap itself comes from the TUN ioctls (`tap.rs`). The steps and their
//! order live in `wiring.rs` over the small [`wiring::Netns`] trait, which `rtnl.rs` implements
//! and the unit tests fake; `interface.rs` decides which link is the pod's and what of it the
//! guest mirrors.
//!
//! CRI port-forward reaches the guest through a listener of the shim's in the namespace and one
//! nat rule on its loopback (`forward.rs`): the only netfilter change, in the pod's namespace.
//!
//! Round trips per pod: discover is 3 netlink dumps (links, addresses, routes), attach is
//! the tap ioctls plus 6 netlink requests, detach is 2.

use std::path::{Path, PathBuf};

pub mod forward;
pub mod holder;
mod interface;
mod netns;
pub mod private;
mod rtnl;
mod tap;
mod wiring;

pub use interface::{InvalidInterface, PodInterface, Problem, Route};

/// The tap every pod namespace gets (one NIC per pod).
pub const TAP_NAME: &str = "tap0_pgn";

/// Pod networking failed.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The namespace could not be entered (or its worker thread not started).
    #[error("entering network namespace {netns}")]
    Enter {
        /// The namespace.
        netns: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A queue of the pod's tap could not be opened (for a jailed VMM).
    #[error("opening a queue of tap {tap} in network namespace {netns}")]
    OpenTap {
        /// The tap.
        tap: String,
        /// The namespace.
        netns: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A private namespace (a template's) could not be made.
    #[error("creating network namespace {netns} with its tap")]
    Private {
        /// The namespace's file.
        netns: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// CRI port-forward could not be set up in the namespace (`forward.rs`).
    #[error("setting up port-forward in network namespace {netns}: {what}")]
    PortForward {
        /// The namespace.
        netns: PathBuf,
        /// What failed, with the command and its output.
        what: String,
    },
    /// The worker thread in the namespace stopped without an answer.
    #[error("the worker thread in network namespace {netns} stopped without an answer")]
    Worker {
        /// The namespace.
        netns: PathBuf,
    },
    /// Listing the namespace's links, addresses or routes failed.
    #[error("listing the {table} of network namespace {netns}")]
    Read {
        /// What was listed.
        table: Table,
        /// The namespace.
        netns: PathBuf,
        /// The kernel's answer.
        #[source]
        source: Cause,
    },
    /// Changing an interface failed.
    #[error("{op} {iface} in network namespace {netns}")]
    Change {
        /// The operation.
        op: Op,
        /// The interface it was applied to.
        iface: String,
        /// The namespace.
        netns: PathBuf,
        /// The kernel's answer.
        #[source]
        source: Cause,
    },
    /// The CNI interface has a value the guest cannot take.
    #[error("the pod interface in network namespace {netns}")]
    Invalid {
        /// The namespace.
        netns: PathBuf,
        /// What is wrong.
        #[source]
        source: InvalidInterface,
    },
}

/// What the kernel said when a request failed.
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    /// A netlink request failed (boxed: the error can hold a whole netlink message).
    #[error(transparent)]
    Netlink(Box<rtnetlink::Error>),
    /// A system call (TUN ioctl, socket) failed.
    #[error(transparent)]
    Os(#[from] std::io::Error),
}

impl From<rtnetlink::Error> for Cause {
    fn from(e: rtnetlink::Error) -> Self {
        Cause::Netlink(Box::new(e))
    }
}

/// A table of the namespace that discovery reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// `RTM_GETLINK`.
    Links,
    /// `RTM_GETADDR`, both families.
    Addresses,
    /// `RTM_GETROUTE`, both families.
    Routes,
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Table::Links => "links",
            Table::Addresses => "addresses",
            Table::Routes => "routes",
        })
    }
}

/// A change made to the namespace, named in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// TUNSETIFF + TUNSETPERSIST, then its index.
    CreateTap,
    /// Looking the existing tap up among the links.
    FindTap,
    /// `RTM_SETLINK`: the veth's MTU, up.
    SetUp,
    /// `RTM_NEWQDISC` ingress.
    AddIngress,
    /// `RTM_NEWTFILTER`: u32 match-all with a mirred egress redirect.
    AddRedirect,
    /// `RTM_DELQDISC` ingress.
    DeleteIngress,
    /// `RTM_DELLINK`.
    DeleteLink,
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Op::CreateTap => "creating the tap",
            Op::FindTap => "finding the tap",
            Op::SetUp => "setting the MTU and bringing up",
            Op::AddIngress => "adding the ingress qdisc to",
            Op::AddRedirect => "adding the mirred redirect filter to",
            Op::DeleteIngress => "deleting the ingress qdisc of",
            Op::DeleteLink => "deleting",
        })
    }
}

/// A pod namespace wired to its tap; [`PodNetwork::detach`] undoes it.
#[derive(Debug, Clone)]
pub struct PodNetwork {
    /// The pod's network namespace (a path such as `/var/run/netns/cni-...`).
    pub netns: PathBuf,
    /// The tap in it.
    pub tap: String,
    /// The interface mirrored.
    pub iface: PodInterface,
    tap_index: u32,
}

/// A queue descriptor of tap `tap` in `netns`, for a VMM that cannot open it itself (jailed).
///
/// # Errors
/// [`NetworkError::OpenTap`] (or entering the namespace failed).
pub async fn open_tap(netns: &Path, tap: &str) -> Result<std::os::fd::OwnedFd, NetworkError> {
    let (path, name) = (netns.to_path_buf(), tap.to_string());
    netns::run(netns, move || {
        tap::open_queue(&name).map_err(|source| NetworkError::OpenTap {
            tap: name.clone(),
            netns: path.clone(),
            source,
        })
    })
    .await
}

/// Reads the pod's interface in `netns`: None when it has no addressed Ethernet link (a pod
/// without CNI networking).
pub async fn discover(netns: &Path) -> Result<Option<PodInterface>, NetworkError> {
    let path = netns.to_path_buf();
    netns::run(netns, move || {
        rtnl::session(&path, async |ns| wiring::discover(ns, &path).await)
    })
    .await
}

/// Creates the tap in `netns` and mirrors it with `iface` both ways. On failure what was made
/// is removed again.
pub async fn attach(netns: &Path, iface: PodInterface) -> Result<PodNetwork, NetworkError> {
    let started = std::time::Instant::now();
    let path = netns.to_path_buf();
    let veth = iface.clone();
    let tap_index = netns::run(netns, move || {
        rtnl::session(&path, async |ns| wiring::attach(ns, &path, &veth).await)
    })
    .await?;
    let net = PodNetwork {
        netns: netns.to_path_buf(),
        tap: TAP_NAME.to_string(),
        iface,
        tap_index,
    };
    tracing::info!(
        netns = %netns.display(),
        veth = %net.iface.name,
        tap = %net.tap,
        mac = %net.iface.mac,
        addresses = ?net.iface.addresses,
        elapsed_us = started.elapsed().as_micros(),
        "pod network attached"
    );
    Ok(net)
}

/// Mirrors `iface` both ways with the tap [`TAP_NAME`] already in `netns` (made with the
/// namespace by [`private::create`], served by a VM since its boot): a pod whose interface was
/// added after its VM booted. On failure the qdiscs made are removed again.
pub async fn attach_existing(
    netns: &Path,
    iface: PodInterface,
) -> Result<PodNetwork, NetworkError> {
    let path = netns.to_path_buf();
    let veth = iface.clone();
    let tap_index = netns::run(netns, move || {
        rtnl::session(&path, async |ns| {
            wiring::attach_existing(ns, &path, &veth).await
        })
    })
    .await?;
    let net = PodNetwork {
        netns: netns.to_path_buf(),
        tap: TAP_NAME.to_string(),
        iface,
        tap_index,
    };
    tracing::info!(
        netns = %netns.display(),
        veth = %net.iface.name,
        mac = %net.iface.mac,
        addresses = ?net.iface.addresses,
        "pod network attached to the running VM's tap"
    );
    Ok(net)
}

impl PodNetwork {
    /// Removes the veth's ingress qdisc (and its filter) and the tap (with its own). Best
    /// effort: the namespace may already be gone, which removed both.
    pub async fn detach(&self) {
        if !self.netns.exists() {
            return;
        }
        let path = self.netns.clone();
        let (veth, tap) = (self.iface.index, self.tap_index);
        let names = (self.iface.name.clone(), self.tap.clone());
        let done = netns::run(&self.netns, move || {
            rtnl::session(&path, async |ns| {
                Ok(wiring::detach(ns, &path, (veth, &names.0), (tap, &names.1)).await)
            })
        })
        .await;
        let failures = match done {
            Ok(failures) => failures,
            Err(e) => vec![e],
        };
        for e in failures {
            tracing::debug!(error = %e, "pod network cleanup");
        }
    }
}
