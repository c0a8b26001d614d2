//! Guest network configuration: loopback up at boot, and the pod's interface (found by the MAC
//! the VMM gave it) with every address (IPv4 and IPv6), its MTU and routes of both families,
//! through route netlink (`netlink.rs`; the guest has no `ip` binary).
//!
//! A request is checked whole before anything changes ([`plan`]), then applied in the order the
//! kernel needs: MTU and link up (routes need a running device), addresses, on-link routes,
//! then routes through a gateway (which must be reachable by then). IPv6 addresses are added
//! with `IFA_F_NODAD` and the NIC's `accept_dad` is cleared, so they are usable at once: the
//! pod's bridge may run in hairpin mode and echo the guest's own duplicate-address probes, which
//! would fail DAD (CNI's bridge plugin disables DAD on the veth for the same reason).

use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use netlink_packet_route::link::{LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use pangolin_protocols::agent::SetupNetworkRequest;

use crate::netlink::Rtnl;

/// Smallest MTU a link takes for IPv4 (IPv6 needs 1280; the kernel says so if it matters).
const MIN_MTU: u32 = 68;
/// Largest MTU a Linux Ethernet link takes.
const MAX_MTU: u32 = 65_535;

/// A network setting could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A request field does not parse or is not usable.
    #[error("{field}: {value:?}: {problem}")]
    Invalid {
        /// The request field.
        field: String,
        /// Its value.
        value: String,
        /// What is wrong with it.
        problem: Problem,
    },
    /// No guest NIC has the requested MAC.
    #[error("interfaces[{index}].mac: no guest interface has MAC {mac}")]
    NoSuchMac {
        /// Index in the request.
        index: usize,
        /// The MAC asked for.
        mac: String,
    },
    /// The kernel refused a setting.
    #[error("{what} on {dev}")]
    Kernel {
        /// Which setting.
        what: &'static str,
        /// The interface, or the route's destination.
        dev: String,
        /// The kernel's answer.
        #[source]
        source: std::io::Error,
    },
}

/// What is wrong with a request field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// Not CIDR (`10.88.0.5/16`, `fd00::5/64`).
    #[error("not an address with a prefix length")]
    NotCidr,
    /// Not an IP address.
    #[error("not an IP address")]
    NotIp,
    /// Not a unicast address.
    #[error("not a unicast address")]
    NotUnicast,
    /// A route destination with host bits set.
    #[error("host bits set in a route destination")]
    HostBits,
    /// A gateway of the other family than its destination.
    #[error("gateway of the other address family")]
    FamilyMismatch,
    /// An MTU out of range.
    #[error("MTU outside {MIN_MTU}..={MAX_MTU}")]
    Mtu,
    /// Routes but no interface to send them through.
    #[error("routes need an interface")]
    NoInterface,
    /// Not a unicast Ethernet MAC (`aa:bb:cc:dd:ee:ff`, first octet even).
    #[error("not a unicast MAC address")]
    NotMac,
}

/// One interface as the request wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkPlan {
    /// The guest's name for it.
    pub dev: String,
    /// Its index.
    pub index: u32,
    /// New MTU (None: keep).
    pub mtu: Option<u32>,
    /// New MAC (None: keep; a template's clone gets its pod's).
    pub mac: Option<[u8; 6]>,
    /// Addresses to add.
    pub addresses: Vec<IpNet>,
}

/// `aa:bb:cc:dd:ee:ff` as bytes, when it is a unicast MAC.
fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    (parts.next().is_none() && mac[0] & 1 == 0).then_some(mac)
}

/// One route as the request wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePlan {
    /// Destination network.
    pub destination: IpNet,
    /// Next hop (None: on-link).
    pub gateway: Option<IpAddr>,
    /// Output interface index.
    pub index: u32,
}

/// A checked request, in the order it is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Interfaces.
    pub links: Vec<LinkPlan>,
    /// Routes: on-link ones first.
    pub routes: Vec<RoutePlan>,
}

fn invalid(field: String, value: &str, problem: Problem) -> NetError {
    NetError::Invalid {
        field,
        value: value.to_string(),
        problem,
    }
}

fn is_unicast(addr: IpAddr) -> bool {
    !(addr.is_unspecified() || addr.is_multicast() || addr.is_loopback())
        && addr != IpAddr::V4(Ipv4Addr::BROADCAST)
}

/// Checks `req` whole; `nic` finds a guest NIC (name, index) by MAC.
pub fn plan(
    req: &SetupNetworkRequest,
    nic: impl Fn(&str) -> Option<(String, u32)>,
) -> Result<Plan, NetError> {
    let mut links = Vec::new();
    for (index, iface) in req.interfaces.iter().enumerate() {
        // A clone of a template still has the template's MAC: found by it, given the pod's.
        let (find, mac) = if iface.guest_mac.is_empty() {
            (&iface.mac, None)
        } else {
            let field = format!("interfaces[{index}].mac");
            let mac =
                parse_mac(&iface.mac).ok_or_else(|| invalid(field, &iface.mac, Problem::NotMac))?;
            (&iface.guest_mac, Some(mac))
        };
        let (dev, ifindex) = nic(find).ok_or_else(|| NetError::NoSuchMac {
            index,
            mac: find.clone(),
        })?;
        let mtu = match iface.mtu {
            0 => None,
            m if (MIN_MTU..=MAX_MTU).contains(&m) => Some(m),
            m => {
                let field = format!("interfaces[{index}].mtu");
                return Err(invalid(field, &m.to_string(), Problem::Mtu));
            }
        };
        let mut addresses = Vec::new();
        for (n, a) in iface.addresses.iter().enumerate() {
            let field = || format!("interfaces[{index}].addresses[{n}]");
            let net: IpNet = a
                .parse()
                .map_err(|_| invalid(field(), a, Problem::NotCidr))?;
            if !is_unicast(net.addr()) {
                return Err(invalid(field(), a, Problem::NotUnicast));
            }
            addresses.push(net);
        }
        links.push(LinkPlan {
            dev,
            index: ifindex,
            mtu,
            mac,
            addresses,
        });
    }
    // Routes go through the pod's (one) NIC, the last configured.
    let mut routes = Vec::new();
    for (index, route) in req.routes.iter().enumerate() {
        let field = |name: &str| format!("routes[{index}].{name}");
        let dst = &route.destination;
        let destination: IpNet = dst
            .parse()
            .map_err(|_| invalid(field("destination"), dst, Problem::NotCidr))?;
        if destination != destination.trunc() {
            return Err(invalid(field("destination"), dst, Problem::HostBits));
        }
        let gateway = match route.gateway.as_str() {
            "" => None,
            gw => {
                let ip: IpAddr = gw
                    .parse()
                    .map_err(|_| invalid(field("gateway"), gw, Problem::NotIp))?;
                if ip.is_ipv4() != destination.addr().is_ipv4() {
                    return Err(invalid(field("gateway"), gw, Problem::FamilyMismatch));
                }
                if !is_unicast(ip) {
                    return Err(invalid(field("gateway"), gw, Problem::NotUnicast));
                }
                Some(ip)
            }
        };
        let Some(link) = links.last() else {
            return Err(invalid("routes".into(), dst, Problem::NoInterface));
        };
        routes.push(RoutePlan {
            destination,
            gateway,
            index: link.index,
        });
    }
    // A gateway must be reachable when its route is added: on-link routes first (stable).
    routes.sort_by_key(|r| r.gateway.is_some());
    Ok(Plan { links, routes })
}

fn family(addr: IpAddr) -> AddressFamily {
    if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

/// `RTM_SETLINK`: IFF_UP, and the MTU and MAC if given (the kernel sets the address before
/// the flags; virtio-net changes it live).
fn link_message(index: u32, mtu: Option<u32>, mac: Option<[u8; 6]>) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.header.flags = LinkFlags::Up;
    msg.header.change_mask = LinkFlags::Up;
    if let Some(mtu) = mtu {
        msg.attributes
            .push(netlink_packet_route::link::LinkAttribute::Mtu(mtu));
    }
    if let Some(mac) = mac {
        msg.attributes
            .push(netlink_packet_route::link::LinkAttribute::Address(
                mac.to_vec(),
            ));
    }
    msg
}

/// `RTM_NEWADDR` for `net` on link `index`: IPv4 with its broadcast address (as `ip addr add
/// .. brd +` and the old SIOCSIFNETMASK gave), IPv6 without duplicate address detection.
fn address_message(index: u32, net: IpNet) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.family = family(net.addr());
    msg.header.prefix_len = net.prefix_len();
    msg.header.index = index;
    msg.attributes.push(AddressAttribute::Local(net.addr()));
    msg.attributes.push(AddressAttribute::Address(net.addr()));
    match net {
        IpNet::V4(v4) if v4.prefix_len() < 31 => {
            msg.attributes
                .push(AddressAttribute::Broadcast(v4.broadcast()));
        }
        IpNet::V4(_) => {}
        IpNet::V6(_) => {
            msg.header.flags = AddressHeaderFlags::Nodad;
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
    }
    msg
}

/// `RTM_NEWROUTE` in the main table: on-link routes with link scope, others universe.
fn route_message(route: &RoutePlan) -> RouteMessage {
    let mut msg = RouteMessage::default();
    let dst = route.destination;
    msg.header.address_family = family(dst.addr());
    msg.header.destination_prefix_length = dst.prefix_len();
    msg.header.table = RouteHeader::RT_TABLE_MAIN;
    msg.header.protocol = RouteProtocol::Boot;
    msg.header.kind = RouteType::Unicast;
    msg.header.scope = match route.gateway {
        None => RouteScope::Link,
        Some(_) => RouteScope::Universe,
    };
    if dst.prefix_len() > 0 {
        msg.attributes
            .push(RouteAttribute::Destination(dst.addr().into()));
    }
    if let Some(gw) = route.gateway {
        msg.attributes.push(RouteAttribute::Gateway(gw.into()));
    }
    msg.attributes.push(RouteAttribute::Oif(route.index));
    msg
}

fn kernel(what: &'static str, dev: &str) -> impl FnOnce(std::io::Error) -> NetError {
    let dev = dev.to_string();
    move |source| NetError::Kernel { what, dev, source }
}

/// The index of guest interface `dev`, from sysfs.
fn ifindex(dev: &str) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{dev}/ifindex")).ok()?;
    text.trim().parse().ok()
}

/// Sets IFF_UP on `dev`.
pub fn link_up(dev: &str) -> Result<(), NetError> {
    let index = ifindex(dev).ok_or_else(|| {
        kernel("finding the interface", dev)(std::io::Error::from_raw_os_error(libc::ENODEV))
    })?;
    let mut rtnl = Rtnl::open().map_err(kernel("opening route netlink", dev))?;
    rtnl.request(
        RouteNetlinkMessage::SetLink(link_message(index, None, None)),
        0,
    )
    .map_err(kernel("setting IFF_UP", dev))
}

/// The guest interface (name, index) whose MAC is `mac` (case-insensitive), from sysfs.
pub fn find_by_mac(mac: &str) -> Option<(String, u32)> {
    let want = mac.to_ascii_lowercase();
    std::fs::read_dir("/sys/class/net")
        .ok()?
        .flatten()
        .find_map(|e| {
            let addr = std::fs::read_to_string(e.path().join("address")).ok()?;
            let name = e.file_name().to_string_lossy().into_owned();
            (addr.trim() == want).then(|| ifindex(&name).map(|i| (name, i)))?
        })
}

/// Turns off duplicate address detection on `dev` (see the module header). Best effort: a
/// kernel without IPv6 on the device has no such file, and NODAD covers our own addresses.
fn no_dad(dev: &str) {
    let path = format!("/proc/sys/net/ipv6/conf/{dev}/accept_dad");
    if let Err(e) = std::fs::write(&path, "0") {
        tracing::warn!(dev, error = %e, "cannot turn off DAD for the link-local address");
    }
}

/// Applies `req`: each interface's MTU, link state and addresses, then the routes.
pub fn setup(req: &SetupNetworkRequest) -> Result<(), NetError> {
    let plan = plan(req, find_by_mac)?;
    let mut rtnl = Rtnl::open().map_err(kernel("opening route netlink", "-"))?;
    for link in &plan.links {
        if link.addresses.iter().any(|a| a.addr().is_ipv6()) {
            no_dad(&link.dev);
        }
        rtnl.request(
            RouteNetlinkMessage::SetLink(link_message(link.index, link.mtu, link.mac)),
            0,
        )
        .map_err(kernel("setting the MTU, MAC and IFF_UP", &link.dev))?;
        for net in &link.addresses {
            rtnl.replace(RouteNetlinkMessage::NewAddress(address_message(
                link.index, *net,
            )))
            .map_err(kernel("adding an address", &link.dev))?;
        }
        tracing::info!(dev = %link.dev, mtu = ?link.mtu, addresses = ?link.addresses, "interface configured");
    }
    for route in &plan.routes {
        rtnl.replace(RouteNetlinkMessage::NewRoute(route_message(route)))
            .map_err(kernel("adding a route", &route.destination.to_string()))?;
    }
    tracing::info!(routes = plan.routes.len(), "routes configured");
    Ok(())
}

#[cfg(test)]
mod tests {
    use pangolin_protocols::agent::{NetworkInterface, NetworkRoute};

    use super::*;

    fn request(addresses: &[&str], routes: &[(&str, &str)]) -> SetupNetworkRequest {
        let mut iface = NetworkInterface::new();
        iface.mac = "AA:BB:CC:DD:EE:01".into();
        iface.mtu = 1450;
        iface.addresses = addresses.iter().map(|a| (*a).to_string()).collect();
        let mut req = SetupNetworkRequest::new();
        req.interfaces.push(iface);
        for (dst, gw) in routes {
            let mut r = NetworkRoute::new();
            r.destination = (*dst).into();
            r.gateway = (*gw).into();
            req.routes.push(r);
        }
        req
    }

    fn nic(mac: &str) -> Option<(String, u32)> {
        (mac == "AA:BB:CC:DD:EE:01").then(|| ("eth0".to_string(), 2))
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("cidr")
    }

    #[test]
    fn a_dual_stack_request_plans_every_address_and_on_link_routes_first() {
        let req = request(
            &["10.231.1.2/24", "10.231.9.2/16", "fd23:1:1::2/64"],
            &[
                ("0.0.0.0/0", "10.231.1.1"),
                ("::/0", "fd23:1:1::1"),
                ("192.0.2.0/24", ""),
            ],
        );
        let plan = plan(&req, nic).expect("plan");
        assert_eq!(
            plan.links,
            [LinkPlan {
                dev: "eth0".into(),
                index: 2,
                mtu: Some(1450),
                mac: None,
                addresses: vec![
                    net("10.231.1.2/24"),
                    net("10.231.9.2/16"),
                    net("fd23:1:1::2/64")
                ],
            }]
        );
        let order: Vec<String> = plan
            .routes
            .iter()
            .map(|r| r.destination.to_string())
            .collect();
        assert_eq!(order, ["192.0.2.0/24", "0.0.0.0/0", "::/0"]);
        assert!(plan.routes.iter().all(|r| r.index == 2));
        assert_eq!(
            plan.routes[2].gateway,
            Some("fd23:1:1::1".parse().expect("ip"))
        );
    }

    #[test]
    fn bad_fields_are_refused_before_anything_changes_naming_the_field() {
        let cases: [(SetupNetworkRequest, &str, Problem); 8] = [
            (
                request(&["10.0.0.1"], &[]),
                "interfaces[0].addresses[0]",
                Problem::NotCidr,
            ),
            (
                request(&["10.0.0.1/33"], &[]),
                "interfaces[0].addresses[0]",
                Problem::NotCidr,
            ),
            (
                request(&["ff02::1/64"], &[]),
                "interfaces[0].addresses[0]",
                Problem::NotUnicast,
            ),
            (
                request(&[], &[("10.0.0.1/8", "")]),
                "routes[0].destination",
                Problem::HostBits,
            ),
            (
                request(&[], &[("x/8", "")]),
                "routes[0].destination",
                Problem::NotCidr,
            ),
            (
                request(&[], &[("::/0", "10.0.0.1")]),
                "routes[0].gateway",
                Problem::FamilyMismatch,
            ),
            (
                request(&[], &[("0.0.0.0/0", "nope")]),
                "routes[0].gateway",
                Problem::NotIp,
            ),
            (
                request(&[], &[("0.0.0.0/0", "0.0.0.0")]),
                "routes[0].gateway",
                Problem::NotUnicast,
            ),
        ];
        for (req, want_field, want) in cases {
            match plan(&req, nic) {
                Err(NetError::Invalid { field, problem, .. }) => {
                    assert_eq!((field.as_str(), problem), (want_field, want));
                }
                other => panic!("{want_field}: {other:?}"),
            }
        }
        let mut mtu = request(&[], &[]);
        mtu.interfaces[0].mtu = 70_000;
        assert!(matches!(
            plan(&mtu, nic),
            Err(NetError::Invalid {
                problem: Problem::Mtu,
                ..
            })
        ));
        let mut unknown = request(&[], &[]);
        unknown.interfaces[0].mac = "02:00:00:00:00:09".into();
        assert!(matches!(
            plan(&unknown, nic),
            Err(NetError::NoSuchMac { index: 0, .. })
        ));
        let mut orphan = request(&[], &[("0.0.0.0/0", "10.0.0.1")]);
        orphan.interfaces.clear();
        assert!(matches!(
            plan(&orphan, nic),
            Err(NetError::Invalid {
                problem: Problem::NoInterface,
                ..
            })
        ));
    }

    #[test]
    fn ipv6_addresses_skip_dad_and_ipv4_ones_get_their_broadcast() {
        let v6 = address_message(2, net("fd23:1:1::2/64"));
        assert_eq!(v6.header.family, AddressFamily::Inet6);
        assert_eq!((v6.header.prefix_len, v6.header.index), (64, 2));
        assert!(v6.header.flags.contains(AddressHeaderFlags::Nodad));
        assert!(v6
            .attributes
            .contains(&AddressAttribute::Flags(AddressFlags::Nodad)));
        let v4 = address_message(2, net("10.231.1.2/24"));
        assert_eq!(v4.header.family, AddressFamily::Inet);
        assert!(v4
            .attributes
            .contains(&AddressAttribute::Broadcast(Ipv4Addr::new(10, 231, 1, 255))));
        assert!(!v4.header.flags.contains(AddressHeaderFlags::Nodad));
        let p2p = address_message(2, net("10.0.0.1/31"));
        assert!(!p2p
            .attributes
            .iter()
            .any(|a| matches!(a, AddressAttribute::Broadcast(_))));
    }

    #[test]
    fn routes_are_main_table_unicast_with_link_scope_when_on_link() {
        let default6 = route_message(&RoutePlan {
            destination: net("::/0"),
            gateway: Some("fd23:1:1::1".parse().expect("ip")),
            index: 2,
        });
        assert_eq!(default6.header.address_family, AddressFamily::Inet6);
        assert_eq!(default6.header.table, RouteHeader::RT_TABLE_MAIN);
        assert_eq!(default6.header.scope, RouteScope::Universe);
        assert_eq!(default6.header.kind, RouteType::Unicast);
        assert!(!default6
            .attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::Destination(_))));
        assert!(default6.attributes.contains(&RouteAttribute::Oif(2)));
        let on_link = route_message(&RoutePlan {
            destination: net("192.0.2.0/24"),
            gateway: None,
            index: 2,
        });
        assert_eq!(on_link.header.scope, RouteScope::Link);
        assert_eq!(on_link.header.destination_prefix_length, 24);
        assert!(on_link.attributes.contains(&RouteAttribute::Destination(
            Ipv4Addr::new(192, 0, 2, 0).into()
        )));
    }

    #[test]
    fn link_up_sets_only_the_up_flag_and_the_mtu_when_asked() {
        let msg = link_message(2, Some(1450), None);
        assert_eq!(
            (msg.header.flags, msg.header.change_mask),
            (LinkFlags::Up, LinkFlags::Up)
        );
        assert_eq!(
            msg.attributes,
            [netlink_packet_route::link::LinkAttribute::Mtu(1450)]
        );
        assert!(link_message(1, None, None).attributes.is_empty());
        let mac = [0x02, 0, 0, 0, 0, 9];
        assert_eq!(
            link_message(1, None, Some(mac)).attributes,
            [netlink_packet_route::link::LinkAttribute::Address(
                mac.to_vec()
            )]
        );
    }

    #[test]
    fn a_clone_s_nic_is_found_by_the_template_mac_and_gets_the_pod_s() {
        let mut req = request(&["10.231.1.2/24"], &[]);
        req.interfaces[0].guest_mac = "AA:BB:CC:DD:EE:01".into();
        req.interfaces[0].mac = "0a:58:0a:e7:01:02".into();
        let planned = plan(&req, nic).expect("plan");
        assert_eq!(planned.links[0].dev, "eth0");
        assert_eq!(
            planned.links[0].mac,
            Some([0x0a, 0x58, 0x0a, 0xe7, 0x01, 0x02])
        );
        for bad in [
            "01:00:5e:00:00:01",
            "0a:58:0a:e7:01",
            "0a:58:0a:e7:01:02:03",
            "zz:58:0a:e7:01:02",
            "",
        ] {
            req.interfaces[0].mac = bad.into();
            let err = plan(&req, nic).expect_err(bad);
            assert!(
                err.to_string().contains("interfaces[0].mac"),
                "{bad}: {err}"
            );
        }
        req.interfaces[0].mac = "0a:58:0a:e7:01:02".into();
        req.interfaces[0].guest_mac = "02:00:00:00:00:77".into();
        assert!(matches!(
            plan(&req, nic),
            Err(NetError::NoSuchMac { index: 0, .. })
        ));
    }
}
