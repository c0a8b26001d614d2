//! Which link of the pod namespace is the pod's, and what of it the guest mirrors: the pure
//! half of discovery, over plain records that `rtnl.rs` makes from netlink dumps.
//!
//! The pod's interface is the lowest-index Ethernet link (not our tap) with at least one
//! address the guest takes: every IPv4 and IPv6 address except IPv6 link-local (fe80::/10; the
//! guest's kernel makes its own from the same MAC). Its routes are the main table's unicast
//! routes out of it, both families, except those the kernel made itself (`proto kernel`: the
//! subnet routes of the addresses, which the guest's kernel makes too) and link-local or
//! multicast destinations. Every value CNI set is checked here before it reaches the guest.

use std::net::IpAddr;

use ipnet::IpNet;
use pangolin_protocols::agent::{NetworkInterface, NetworkRoute, SetupNetworkRequest};

use super::TAP_NAME;

/// Smallest MTU an IPv4 link may have (RFC 791); IPv6 needs 1280, which the guest's kernel
/// enforces when the address is added.
const MIN_MTU: u32 = 68;
/// Largest MTU a Linux Ethernet link takes.
const MAX_MTU: u32 = 65_535;
/// `RT_TABLE_MAIN`.
pub(crate) const MAIN_TABLE: u32 = 254;

/// A link of the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Link {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// `ARPHRD_ETHER` (veths and taps are).
    pub ether: bool,
    /// Hardware address as the kernel gave it (any length).
    pub mac: Vec<u8>,
    /// MTU (0 when the kernel sent none).
    pub mtu: u32,
}

/// An address of a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Address {
    /// The link's index.
    pub index: u32,
    /// The local address.
    pub addr: IpAddr,
    /// Its prefix length.
    pub prefix_len: u8,
}

/// A route of the namespace, any table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RouteEntry {
    /// Routing table id.
    pub table: u32,
    /// `RTN_UNICAST`.
    pub unicast: bool,
    /// `RTPROT_KERNEL`: made by the kernel for an address.
    pub kernel: bool,
    /// Output interface (None for multipath routes).
    pub oif: Option<u32>,
    /// Destination network (`0.0.0.0/0` or `::/0` for a default route).
    pub destination: IpNet,
    /// Next hop.
    pub gateway: Option<IpAddr>,
}

/// A route the guest gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination network.
    pub destination: IpNet,
    /// Next hop; None for an on-link route.
    pub gateway: Option<IpAddr>,
}

/// The pod's interface as CNI configured it, mirrored into the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInterface {
    /// The veth's name in the namespace (`eth0`).
    pub name: String,
    /// Its interface index there.
    pub index: u32,
    /// Its MAC (`aa:bb:cc:dd:ee:ff`), which the guest NIC takes.
    pub mac: String,
    /// Its MTU.
    pub mtu: u32,
    /// Its addresses, IPv4 and IPv6, with their prefix lengths.
    pub addresses: Vec<IpNet>,
    /// Routes through it, both families.
    pub routes: Vec<Route>,
}

/// A value CNI set on the pod interface that the guest cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{iface}: {problem}")]
pub struct InvalidInterface {
    /// The interface.
    pub iface: String,
    /// What is wrong with it.
    pub problem: Problem,
}

/// What is wrong with a pod interface.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// The hardware address is not 6 bytes.
    #[error("hardware address of {0} bytes (an Ethernet MAC has 6)")]
    MacLength(usize),
    /// The MAC is all-zero or multicast.
    #[error("MAC {0} is not a unicast address")]
    MacNotUnicast(String),
    /// The MTU is outside what a link takes.
    #[error("MTU {0} outside {MIN_MTU}..={MAX_MTU}")]
    Mtu(u32),
    /// An address has a prefix longer than its family allows.
    #[error("address {addr}/{prefix_len}: prefix too long")]
    Prefix {
        /// The address.
        addr: IpAddr,
        /// Its prefix length.
        prefix_len: u8,
    },
    /// An address is not a unicast host address.
    #[error("address {0} is not a unicast address")]
    NotUnicast(IpAddr),
    /// A gateway is not a unicast address of its route's family.
    #[error("route {destination}: gateway {gateway} is not a unicast address of its family")]
    Gateway {
        /// The route's destination.
        destination: IpNet,
        /// The gateway.
        gateway: IpAddr,
    },
}

fn is_link_local(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(_) => false,
        IpAddr::V6(a) => a.segments()[0] & 0xffc0 == 0xfe80,
    }
}

fn is_unicast(addr: IpAddr) -> bool {
    !(addr.is_unspecified() || addr.is_multicast() || addr.is_loopback())
        && addr != IpAddr::V4(std::net::Ipv4Addr::BROADCAST)
}

/// The addresses of link `index` the guest takes.
fn addresses_of(index: u32, addresses: &[Address]) -> impl Iterator<Item = &Address> {
    addresses
        .iter()
        .filter(move |a| a.index == index && !is_link_local(a.addr))
}

/// Formats a MAC the way QEMU and the agent take it; checks it is a unicast Ethernet MAC.
fn mac_string(mac: &[u8]) -> Result<String, Problem> {
    let bytes: [u8; 6] = mac.try_into().map_err(|_| Problem::MacLength(mac.len()))?;
    let text = bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    if bytes == [0; 6] || bytes[0] & 1 == 1 {
        return Err(Problem::MacNotUnicast(text));
    }
    Ok(text)
}

/// Picks the pod's interface out of a namespace's links, addresses and routes, checked.
/// Ok(None) when no link qualifies.
pub(crate) fn pod_interface(
    links: &[Link],
    addresses: &[Address],
    routes: &[RouteEntry],
) -> Result<Option<PodInterface>, InvalidInterface> {
    let mut candidates: Vec<&Link> = links
        .iter()
        .filter(|l| l.ether && l.name != TAP_NAME)
        .filter(|l| addresses_of(l.index, addresses).next().is_some())
        .collect();
    candidates.sort_by_key(|l| l.index);
    let Some(link) = candidates.first() else {
        return Ok(None);
    };
    if candidates.len() > 1 {
        let ignored: Vec<&str> = candidates[1..].iter().map(|l| l.name.as_str()).collect();
        tracing::warn!(pod = %link.name, ?ignored, "one NIC per pod: other addressed links are not mirrored");
    }
    let invalid = |problem| InvalidInterface {
        iface: link.name.clone(),
        problem,
    };
    let mac = mac_string(&link.mac).map_err(invalid)?;
    if !(MIN_MTU..=MAX_MTU).contains(&link.mtu) {
        return Err(invalid(Problem::Mtu(link.mtu)));
    }
    let addresses = addresses_of(link.index, addresses)
        .map(|a| {
            if !is_unicast(a.addr) {
                return Err(invalid(Problem::NotUnicast(a.addr)));
            }
            IpNet::new(a.addr, a.prefix_len).map_err(|_| {
                invalid(Problem::Prefix {
                    addr: a.addr,
                    prefix_len: a.prefix_len,
                })
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let routes = routes
        .iter()
        .filter(|r| r.table == MAIN_TABLE && r.unicast && !r.kernel && r.oif == Some(link.index))
        .filter(|r| {
            let dst = r.destination.addr();
            !is_link_local(dst) && !dst.is_multicast()
        })
        .map(|r| {
            if let Some(gateway) = r.gateway {
                let same_family = gateway.is_ipv4() == r.destination.addr().is_ipv4();
                if !same_family || !is_unicast(gateway) {
                    return Err(invalid(Problem::Gateway {
                        destination: r.destination,
                        gateway,
                    }));
                }
            }
            Ok(Route {
                destination: r.destination.trunc(),
                gateway: r.gateway,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(PodInterface {
        name: link.name.clone(),
        index: link.index,
        mac,
        mtu: link.mtu,
        addresses,
        routes,
    }))
}

impl PodInterface {
    /// The agent request that configures the guest like this interface; `guest_mac` is the
    /// guest NIC's MAC when it is not this interface's (a VM restored from a template).
    pub fn agent_request(&self, guest_mac: Option<&str>) -> SetupNetworkRequest {
        let mut iface = NetworkInterface::new();
        iface.mac.clone_from(&self.mac);
        iface.guest_mac = guest_mac.unwrap_or_default().into();
        iface.mtu = self.mtu;
        iface.addresses = self.addresses.iter().map(IpNet::to_string).collect();
        let mut req = SetupNetworkRequest::new();
        req.interfaces.push(iface);
        for route in &self.routes {
            let mut r = NetworkRoute::new();
            r.destination = route.destination.to_string();
            r.gateway = route.gateway.map(|g| g.to_string()).unwrap_or_default();
            req.routes.push(r);
        }
        req
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("cidr")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn link(index: u32, name: &str, mac: &[u8]) -> Link {
        Link {
            index,
            name: name.into(),
            ether: true,
            mac: mac.to_vec(),
            mtu: 1450,
        }
    }

    fn addr(index: u32, cidr: &str) -> Address {
        let n = net(cidr);
        Address {
            index,
            addr: n.addr(),
            prefix_len: n.prefix_len(),
        }
    }

    fn route(oif: u32, dst: &str, gateway: Option<&str>) -> RouteEntry {
        RouteEntry {
            table: MAIN_TABLE,
            unicast: true,
            kernel: false,
            oif: Some(oif),
            destination: net(dst),
            gateway: gateway.map(ip),
        }
    }

    const MAC: [u8; 6] = [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x01];

    /// A dual-stack CNI namespace: lo, the veth eth0 (index 3), a stale tap.
    fn namespace() -> (Vec<Link>, Vec<Address>, Vec<RouteEntry>) {
        let mut lo = link(1, "lo", &[0; 6]);
        lo.ether = false;
        let links = vec![
            lo,
            link(3, "eth0", &MAC),
            link(4, TAP_NAME, &[2, 0, 0, 0, 0, 9]),
        ];
        let addresses = vec![
            addr(1, "127.0.0.1/8"),
            addr(3, "10.231.1.2/24"),
            addr(3, "10.231.9.2/16"),
            addr(3, "fd23:1:1::2/64"),
            addr(3, "fe80::a8bb:ccff:fedd:ee01/64"),
            addr(4, "192.0.2.9/24"),
        ];
        let mut kernel = route(3, "10.231.1.0/24", None);
        kernel.kernel = true;
        let mut kernel6 = route(3, "fd23:1:1::/64", None);
        kernel6.kernel = true;
        let mut local = route(3, "10.231.1.2/32", None);
        local.table = 255;
        local.unicast = false;
        let mut multipath = route(3, "198.51.100.0/24", Some("10.231.1.1"));
        multipath.oif = None;
        let routes = vec![
            route(3, "0.0.0.0/0", Some("10.231.1.1")),
            kernel,
            local,
            multipath,
            route(3, "192.0.2.7/32", Some("10.231.1.1")),
            route(3, "fe80::/64", None),
            route(3, "ff00::/8", None),
            kernel6,
            route(3, "::/0", Some("fd23:1:1::1")),
            route(4, "203.0.113.0/24", None),
        ];
        (links, addresses, routes)
    }

    #[test]
    fn the_veth_is_mirrored_with_every_address_and_route_of_both_families() {
        let (links, addresses, routes) = namespace();
        let iface = pod_interface(&links, &addresses, &routes)
            .expect("valid")
            .expect("an interface");
        assert_eq!((iface.name.as_str(), iface.index), ("eth0", 3));
        assert_eq!(iface.mac, "aa:bb:cc:dd:ee:01");
        assert_eq!(iface.mtu, 1450);
        assert_eq!(
            iface.addresses,
            [
                net("10.231.1.2/24"),
                net("10.231.9.2/16"),
                net("fd23:1:1::2/64")
            ]
        );
        assert_eq!(
            iface.routes,
            [
                Route {
                    destination: net("0.0.0.0/0"),
                    gateway: Some(ip("10.231.1.1"))
                },
                Route {
                    destination: net("192.0.2.7/32"),
                    gateway: Some(ip("10.231.1.1"))
                },
                Route {
                    destination: net("::/0"),
                    gateway: Some(ip("fd23:1:1::1"))
                },
            ]
        );
        let req = iface.agent_request(None);
        assert_eq!(req.interfaces.len(), 1);
        assert_eq!(req.interfaces[0].mac, "aa:bb:cc:dd:ee:01");
        assert_eq!(
            req.interfaces[0].guest_mac, "",
            "a booted guest has the pod's MAC"
        );
        let clone = iface.agent_request(Some("02:50:47:00:00:01"));
        assert_eq!(
            (
                clone.interfaces[0].mac.as_str(),
                clone.interfaces[0].guest_mac.as_str()
            ),
            ("aa:bb:cc:dd:ee:01", "02:50:47:00:00:01")
        );
        assert_eq!(
            req.interfaces[0].addresses,
            ["10.231.1.2/24", "10.231.9.2/16", "fd23:1:1::2/64"]
        );
        let routes: Vec<(&str, &str)> = req
            .routes
            .iter()
            .map(|r| (r.destination.as_str(), r.gateway.as_str()))
            .collect();
        assert_eq!(
            routes,
            [
                ("0.0.0.0/0", "10.231.1.1"),
                ("192.0.2.7/32", "10.231.1.1"),
                ("::/0", "fd23:1:1::1")
            ]
        );
    }

    #[test]
    fn an_ipv6_only_veth_is_the_pods_and_on_link_routes_have_no_gateway() {
        let links = vec![link(2, "eth0", &MAC)];
        let addresses = vec![addr(2, "fe80::1/64"), addr(2, "fd23::5/64")];
        let routes = vec![route(2, "fd24::/48", None)];
        let iface = pod_interface(&links, &addresses, &routes)
            .expect("valid")
            .expect("interface");
        assert_eq!(iface.addresses, [net("fd23::5/64")]);
        assert_eq!(iface.agent_request(None).routes[0].gateway, "");
    }

    #[test]
    fn no_interface_without_an_addressed_ethernet_link_other_than_the_tap() {
        let (links, mut addresses, routes) = namespace();
        addresses.retain(|a| a.index != 3);
        assert_eq!(pod_interface(&links, &addresses, &routes), Ok(None));
        // Only link-local on the veth: nothing the guest would take.
        addresses.push(addr(3, "fe80::1/64"));
        assert_eq!(pod_interface(&links, &addresses, &routes), Ok(None));
        assert_eq!(pod_interface(&[], &[], &[]), Ok(None));
    }

    #[test]
    fn the_lowest_index_candidate_wins() {
        let links = vec![link(7, "net1", &[2, 0, 0, 0, 0, 7]), link(5, "eth0", &MAC)];
        let addresses = vec![addr(7, "10.0.7.2/24"), addr(5, "10.0.5.2/24")];
        let iface = pod_interface(&links, &addresses, &[])
            .expect("valid")
            .expect("interface");
        assert_eq!(iface.name, "eth0");
    }

    #[test]
    fn cni_values_the_guest_cannot_take_are_refused_naming_the_interface() {
        let (links, addresses, routes) = namespace();
        let with_link = |edit: &dyn Fn(&mut Link)| {
            let mut links = links.clone();
            edit(&mut links[1]);
            pod_interface(&links, &addresses, &routes).map(|_| ())
        };
        let problem = |r: Result<(), InvalidInterface>| {
            let e = r.expect_err("refused");
            assert_eq!(e.iface, "eth0");
            e.problem
        };
        assert_eq!(
            problem(with_link(&|l| l.mac = vec![1, 2, 3])),
            Problem::MacLength(3)
        );
        assert_eq!(
            problem(with_link(&|l| l.mac = vec![1, 0, 0, 0, 0, 1])),
            Problem::MacNotUnicast("01:00:00:00:00:01".into())
        );
        assert_eq!(
            problem(with_link(&|l| l.mac = vec![0; 6])),
            Problem::MacNotUnicast("00:00:00:00:00:00".into())
        );
        assert_eq!(problem(with_link(&|l| l.mtu = 0)), Problem::Mtu(0));
        assert_eq!(
            problem(with_link(&|l| l.mtu = 70_000)),
            Problem::Mtu(70_000)
        );

        let mut bad_addr = addresses.clone();
        bad_addr.push(Address {
            index: 3,
            addr: ip("10.0.0.1"),
            prefix_len: 33,
        });
        assert!(matches!(
            problem(pod_interface(&links, &bad_addr, &routes).map(|_| ())),
            Problem::Prefix { prefix_len: 33, .. }
        ));
        let mut multicast = addresses.clone();
        multicast.push(addr(3, "224.0.0.1/32"));
        assert_eq!(
            problem(pod_interface(&links, &multicast, &routes).map(|_| ())),
            Problem::NotUnicast(ip("224.0.0.1"))
        );
        let mut mixed = routes.clone();
        mixed.push(route(3, "::/0", Some("10.231.1.1")));
        assert!(matches!(
            problem(pod_interface(&links, &addresses, &mixed).map(|_| ())),
            Problem::Gateway { .. }
        ));
        let err = pod_interface(&links, &multicast, &routes).expect_err("refused");
        assert_eq!(
            err.to_string(),
            "eth0: address 224.0.0.1 is not a unicast address"
        );
    }
}
