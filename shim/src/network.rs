//! Pod networking on the host. CNI gave the pod a network namespace holding a veth with the
//! pod's IP; here that namespace also gets a tap, and tc mirrors every frame between veth and
//! tap in both directions (Kata's tc-redirect model: no host bridge changes). The VMM runs in
//! the namespace and serves the tap as the guest's virtio-net NIC with the veth's MAC; the agent
//! then gives that NIC the veth's addresses, MTU and routes.
//!
//! The namespace is inspected and changed with iproute2 (`ip -j`, `tc`) run through `nsenter`,
//! as an administrator would, which keeps this module small; its errors carry their stderr.

use std::path::{Path, PathBuf};

use pangolin_protocols::agent::{NetworkInterface, NetworkRoute, SetupNetworkRequest};
use serde::{Deserialize, Serialize};

/// The tap every pod namespace gets (one NIC per pod).
pub const TAP_NAME: &str = "tap0_pgn";

/// Pod networking failed.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A command could not run or failed.
    #[error("`{command}` in network namespace {netns}: {message}")]
    Command {
        /// The command line.
        command: String,
        /// The namespace.
        netns: PathBuf,
        /// Its stderr, or why it did not run.
        message: String,
    },
    /// `ip -j` printed something unexpected.
    #[error("reading the pod network in {netns}: {why}")]
    Parse {
        /// The namespace.
        netns: PathBuf,
        /// What was wrong.
        why: String,
    },
}

/// The pod's interface as CNI configured it, mirrored into the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodInterface {
    /// The veth's name in the namespace (`eth0`).
    pub name: String,
    /// Its MAC, which the guest NIC takes.
    pub mac: String,
    /// Its MTU.
    pub mtu: u32,
    /// Its IPv4 addresses in CIDR form.
    pub addresses: Vec<String>,
    /// IPv4 routes through it: (destination CIDR, gateway or empty).
    pub routes: Vec<(String, String)>,
}

impl PodInterface {
    /// The agent request that configures the guest like this interface.
    pub fn agent_request(&self) -> SetupNetworkRequest {
        let mut iface = NetworkInterface::new();
        iface.mac.clone_from(&self.mac);
        iface.mtu = self.mtu;
        iface.addresses.clone_from(&self.addresses);
        let mut req = SetupNetworkRequest::new();
        req.interfaces.push(iface);
        for (destination, gateway) in &self.routes {
            let mut r = NetworkRoute::new();
            r.destination.clone_from(destination);
            r.gateway.clone_from(gateway);
            req.routes.push(r);
        }
        req
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
}

async fn run_in(netns: &Path, args: &[&str]) -> Result<String, NetworkError> {
    let command = args.join(" ");
    let fail = |message: String| NetworkError::Command {
        command: command.clone(),
        netns: netns.to_path_buf(),
        message,
    };
    let out = tokio::process::Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg("--")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| fail(format!("cannot run nsenter/iproute2: {e}")))?;
    if !out.status.success() {
        return Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[derive(Deserialize)]
struct IpLink {
    ifname: String,
    #[serde(default)]
    mtu: u32,
    #[serde(default)]
    link_type: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    addr_info: Vec<IpAddr>,
}

#[derive(Deserialize)]
struct IpAddr {
    family: String,
    local: String,
    prefixlen: u8,
}

#[derive(Deserialize)]
struct IpRoute {
    dst: String,
    #[serde(default)]
    gateway: Option<String>,
    #[serde(default)]
    dev: Option<String>,
}

/// The pod's interface from `ip -j addr` and `ip -j route` output: the first Ethernet link with
/// an IPv4 address (not our tap). None when the namespace has no such link (a pod without CNI).
pub fn parse_interface(addr_json: &str, route_json: &str) -> Result<Option<PodInterface>, String> {
    let links: Vec<IpLink> =
        serde_json::from_str(addr_json).map_err(|e| format!("ip -j addr: {e}"))?;
    let routes: Vec<IpRoute> =
        serde_json::from_str(route_json).map_err(|e| format!("ip -j route: {e}"))?;
    let Some(link) = links.into_iter().find(|l| {
        l.link_type == "ether"
            && l.ifname != TAP_NAME
            && l.addr_info.iter().any(|a| a.family == "inet")
    }) else {
        return Ok(None);
    };
    let addresses = link
        .addr_info
        .iter()
        .filter(|a| a.family == "inet")
        .map(|a| format!("{}/{}", a.local, a.prefixlen))
        .collect();
    let routes = routes
        .into_iter()
        .filter(|r| r.dev.as_deref() == Some(link.ifname.as_str()))
        .map(|r| {
            let dst = match r.dst.as_str() {
                "default" => "0.0.0.0/0".to_string(),
                d if d.contains('/') => d.to_string(),
                d => format!("{d}/32"),
            };
            (dst, r.gateway.unwrap_or_default())
        })
        .collect();
    Ok(Some(PodInterface {
        name: link.ifname,
        mac: link.address,
        mtu: link.mtu,
        addresses,
        routes,
    }))
}

/// Reads the pod's interface in `netns`.
pub async fn discover(netns: &Path) -> Result<Option<PodInterface>, NetworkError> {
    let addrs = run_in(netns, &["ip", "-j", "addr", "show"]).await?;
    let routes = run_in(netns, &["ip", "-j", "-4", "route", "show"]).await?;
    parse_interface(&addrs, &routes).map_err(|why| NetworkError::Parse {
        netns: netns.to_path_buf(),
        why,
    })
}

/// Creates the tap in `netns` and mirrors it with `iface` both ways. On failure what was made
/// is removed again.
pub async fn attach(netns: &Path, iface: PodInterface) -> Result<PodNetwork, NetworkError> {
    let net = PodNetwork {
        netns: netns.to_path_buf(),
        tap: TAP_NAME.to_string(),
        iface,
    };
    let mtu = net.iface.mtu.to_string();
    let (veth, tap) = (net.iface.name.as_str(), net.tap.as_str());
    let steps: [&[&str]; 6] = [
        &["ip", "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"],
        &["ip", "link", "set", "dev", tap, "mtu", &mtu, "up"],
        &["tc", "qdisc", "add", "dev", veth, "ingress"],
        &[
            "tc", "filter", "add", "dev", veth, "parent", "ffff:", "protocol", "all", "u32",
            "match", "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", tap,
        ],
        &["tc", "qdisc", "add", "dev", tap, "ingress"],
        &[
            "tc", "filter", "add", "dev", tap, "parent", "ffff:", "protocol", "all", "u32",
            "match", "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", veth,
        ],
    ];
    for step in steps {
        if let Err(e) = run_in(netns, step).await {
            net.detach().await;
            return Err(e);
        }
    }
    tracing::info!(netns = %netns.display(), veth, tap, mac = %net.iface.mac, "pod network attached");
    Ok(net)
}

impl PodNetwork {
    /// Removes the veth's ingress qdisc (and its filter) and the tap (with its own). Best
    /// effort: the namespace may already be gone, which removed both.
    pub async fn detach(&self) {
        if !self.netns.exists() {
            return;
        }
        for step in [
            [
                "tc",
                "qdisc",
                "del",
                "dev",
                self.iface.name.as_str(),
                "ingress",
            ]
            .as_slice(),
            ["ip", "link", "del", "dev", self.tap.as_str()].as_slice(),
        ] {
            if let Err(e) = run_in(&self.netns, step).await {
                tracing::debug!(error = %e, "pod network cleanup");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADDRS: &str = r#"[
      {"ifindex":1,"ifname":"lo","mtu":65536,"link_type":"loopback","address":"00:00:00:00:00:00",
       "addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8}]},
      {"ifindex":3,"ifname":"eth0","mtu":1450,"link_type":"ether","address":"aa:bb:cc:dd:ee:01",
       "addr_info":[{"family":"inet","local":"10.231.1.2","prefixlen":24},
                    {"family":"inet6","local":"fe80::1","prefixlen":64}]}]"#;
    const ROUTES: &str = r#"[
      {"dst":"default","gateway":"10.231.1.1","dev":"eth0"},
      {"dst":"10.231.1.0/24","dev":"eth0","protocol":"kernel","scope":"link","prefsrc":"10.231.1.2"},
      {"dst":"192.0.2.7","gateway":"10.231.1.1","dev":"eth0"}]"#;

    #[test]
    fn the_cni_veth_is_found_with_addresses_and_routes() {
        let iface = parse_interface(ADDRS, ROUTES)
            .expect("parse")
            .expect("an interface");
        assert_eq!(iface.name, "eth0");
        assert_eq!(iface.mac, "aa:bb:cc:dd:ee:01");
        assert_eq!(iface.mtu, 1450);
        assert_eq!(iface.addresses, ["10.231.1.2/24"]);
        assert_eq!(
            iface.routes,
            [
                ("0.0.0.0/0".to_string(), "10.231.1.1".to_string()),
                ("10.231.1.0/24".to_string(), String::new()),
                ("192.0.2.7/32".to_string(), "10.231.1.1".to_string()),
            ]
        );
        let req = iface.agent_request();
        assert_eq!(req.interfaces[0].mac, "aa:bb:cc:dd:ee:01");
        assert_eq!(req.routes.len(), 3);
    }

    #[test]
    fn a_namespace_without_an_addressed_ethernet_link_has_no_interface() {
        let lo_only = r#"[{"ifname":"lo","mtu":65536,"link_type":"loopback","address":"00:00:00:00:00:00","addr_info":[]}]"#;
        assert_eq!(parse_interface(lo_only, "[]").expect("parse"), None);
        assert!(parse_interface("not json", "[]").is_err());
    }
}
