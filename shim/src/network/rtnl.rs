//! [`Netns`] over rtnetlink: a route-netlink connection opened inside the pod's namespace (on
//! the thread `netns::run` moved there), served by a current-thread runtime on that thread.
//! The dumps are turned into `interface`'s plain records here; what to make of them is decided
//! there.

use std::net::IpAddr;
use std::path::Path;

use futures_util::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkLayerType, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::packet_route::tc::TcHandle;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use super::interface::{Address, Link, RouteEntry};
use super::wiring::Netns;
use super::{tap, Cause, NetworkError};

/// `ETH_P_ALL` as the filters' protocol: every protocol. The kernel compares it with
/// `skb->protocol`, so it goes in network byte order (`tc` sends `htons(ETH_P_ALL)`).
const ETH_P_ALL_BE: u16 = 0x0003_u16.to_be();
/// `ffff:`, the ingress qdisc's handle: the filters' parent (`tc filter add .. parent ffff:`).
const INGRESS_QDISC: u32 = 0xffff_0000;

/// A route-netlink connection in the current thread's network namespace.
pub(crate) struct Rtnl {
    handle: Handle,
}

/// Runs `body` with a connection opened in the calling thread's namespace, on a runtime of
/// this thread (which `netns::run` made for the purpose).
pub(crate) fn session<T>(
    netns: &Path,
    body: impl AsyncFnOnce(&mut Rtnl) -> Result<T, NetworkError>,
) -> Result<T, NetworkError> {
    let enter = |source| NetworkError::Enter {
        netns: netns.to_path_buf(),
        source,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(enter)?;
    runtime.block_on(async {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(enter)?;
        tokio::spawn(connection);
        body(&mut Rtnl { handle }).await
    })
}

fn index_i32(index: u32) -> Result<i32, Cause> {
    i32::try_from(index).map_err(|_| {
        Cause::Os(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("interface index {index} over i32"),
        ))
    })
}

/// The plain record of a link message.
fn link_of(msg: &LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        ether: msg.header.link_layer_type == LinkLayerType::Ether,
        mac: Vec::new(),
        mtu: 0,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(name) => link.name.clone_from(name),
            LinkAttribute::Address(mac) => link.mac.clone_from(mac),
            LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
            _ => {}
        }
    }
    link
}

/// The plain record of an address message: its local address (`IFA_LOCAL`, which IPv4 sets;
/// else `IFA_ADDRESS`, all IPv6 sends). None without either.
fn address_of(msg: &AddressMessage) -> Option<Address> {
    let find = |local: bool| {
        msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) if local => Some(*ip),
            AddressAttribute::Address(ip) if !local => Some(*ip),
            _ => None,
        })
    };
    Some(Address {
        index: msg.header.index,
        addr: find(true).or_else(|| find(false))?,
        prefix_len: msg.header.prefix_len,
    })
}

fn ip_of(addr: &RouteAddress) -> Option<IpAddr> {
    match addr {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

/// The plain record of an IPv4 or IPv6 route message; None for other families or a
/// destination that does not fit its prefix length.
fn route_of(msg: &RouteMessage) -> Option<RouteEntry> {
    let h = &msg.header;
    let unspecified = match h.address_family {
        AddressFamily::Inet => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        AddressFamily::Inet6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        _ => return None,
    };
    let mut entry = RouteEntry {
        table: u32::from(h.table),
        unicast: h.kind == RouteType::Unicast,
        kernel: h.protocol == RouteProtocol::Kernel,
        oif: None,
        destination: IpNet::new(unspecified, 0).ok()?,
        gateway: None,
    };
    let mut destination = unspecified;
    for attr in &msg.attributes {
        match attr {
            // Tables past 255 only come in RTA_TABLE.
            RouteAttribute::Table(t) => entry.table = *t,
            RouteAttribute::Oif(i) => entry.oif = Some(*i),
            RouteAttribute::Destination(a) => destination = ip_of(a)?,
            RouteAttribute::Gateway(a) => entry.gateway = ip_of(a),
            _ => {}
        }
    }
    if destination.is_ipv4() != unspecified.is_ipv4() {
        return None;
    }
    entry.destination = IpNet::new(destination, h.destination_prefix_length).ok()?;
    Some(entry)
}

impl Netns for Rtnl {
    async fn links(&mut self) -> Result<Vec<Link>, Cause> {
        let msgs: Vec<LinkMessage> = self.handle.link().get().execute().try_collect().await?;
        Ok(msgs.iter().map(link_of).collect())
    }

    async fn addresses(&mut self) -> Result<Vec<Address>, Cause> {
        let msgs: Vec<AddressMessage> = self.handle.address().get().execute().try_collect().await?;
        Ok(msgs.iter().filter_map(address_of).collect())
    }

    async fn routes(&mut self) -> Result<Vec<RouteEntry>, Cause> {
        // AF_UNSPEC: the kernel dumps every family's tables.
        let all = RouteMessageBuilder::<IpAddr>::new().build();
        let msgs: Vec<RouteMessage> = self.handle.route().get(all).execute().try_collect().await?;
        Ok(msgs.iter().filter_map(route_of).collect())
    }

    async fn create_tap(&mut self, name: &str) -> Result<u32, Cause> {
        tap::create_persistent(name)?;
        let found: Result<Vec<LinkMessage>, _> = self
            .handle
            .link()
            .get()
            .match_name(name)
            .execute()
            .try_collect()
            .await;
        let index = found.map(|links| links.first().map(|l| l.header.index));
        if let Ok(Some(index)) = index {
            return Ok(index);
        }
        // The caller only undoes a tap it got an index for: remove this one by name.
        let by_name = LinkUnspec::new_with_name(name).build();
        if let Err(e) = self.handle.link().del_with_message(by_name).execute().await {
            tracing::warn!(tap = name, error = %e, "removing a tap whose index could not be read");
        }
        Err(match index {
            Err(e) => e.into(),
            Ok(_) => Cause::Os(std::io::Error::from_raw_os_error(libc::ENODEV)),
        })
    }

    async fn set_up(&mut self, index: u32, mtu: u32) -> Result<(), Cause> {
        let msg = LinkUnspec::new_with_index(index).mtu(mtu).up().build();
        Ok(self.handle.link().set(msg).execute().await?)
    }

    async fn add_ingress(&mut self, index: u32) -> Result<(), Cause> {
        let index = index_i32(index)?;
        Ok(self.handle.qdisc().add(index).ingress().execute().await?)
    }

    async fn add_redirect(&mut self, from: u32, to: u32) -> Result<(), Cause> {
        let request = self
            .handle
            .traffic_filter(index_i32(from)?)
            .add()
            .parent(INGRESS_QDISC)
            .protocol(ETH_P_ALL_BE)
            .redirect(to)?;
        Ok(request.execute().await?)
    }

    async fn delete_ingress(&mut self, index: u32) -> Result<(), Cause> {
        let mut request = self.handle.qdisc().del(index_i32(index)?);
        request.message_mut().header.parent = TcHandle::INGRESS;
        Ok(request.execute().await?)
    }

    async fn delete_link(&mut self, index: u32) -> Result<(), Cause> {
        Ok(self.handle.link().del(index).execute().await?)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use rtnetlink::packet_route::address::AddressHeader;
    use rtnetlink::packet_route::route::RouteHeader;

    use super::*;

    #[test]
    fn the_filter_protocol_is_eth_p_all_in_network_byte_order() {
        // A filter with 0x0003 in host order on a little-endian host would match no frame.
        assert_eq!(ETH_P_ALL_BE.to_ne_bytes(), [0x00, 0x03]);
    }

    #[test]
    fn link_messages_become_links() {
        let mut msg = LinkMessage::default();
        msg.header.index = 3;
        msg.header.link_layer_type = LinkLayerType::Ether;
        msg.attributes = vec![
            LinkAttribute::IfName("eth0".into()),
            LinkAttribute::Address(vec![0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x01]),
            LinkAttribute::Mtu(1450),
        ];
        assert_eq!(
            link_of(&msg),
            Link {
                index: 3,
                name: "eth0".into(),
                ether: true,
                mac: vec![0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x01],
                mtu: 1450,
            }
        );
        msg.header.link_layer_type = LinkLayerType::Loopback;
        assert!(!link_of(&msg).ether);
    }

    #[test]
    fn address_messages_take_the_local_address() {
        let mut msg = AddressMessage::default();
        msg.header = AddressHeader {
            family: AddressFamily::Inet,
            prefix_len: 24,
            index: 3,
            ..AddressHeader::default()
        };
        msg.attributes = vec![
            AddressAttribute::Address(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))),
            AddressAttribute::Local(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2))),
        ];
        let a = address_of(&msg).expect("address");
        assert_eq!(
            (a.index, a.addr, a.prefix_len),
            (3, "10.0.0.2".parse().expect("ip"), 24)
        );
        // IPv6 sends only IFA_ADDRESS.
        msg.header.family = AddressFamily::Inet6;
        msg.header.prefix_len = 64;
        let v6 = IpAddr::V6("fd23::2".parse::<Ipv6Addr>().expect("ip"));
        msg.attributes = vec![AddressAttribute::Address(v6)];
        assert_eq!(address_of(&msg).expect("address").addr, v6);
        msg.attributes.clear();
        assert_eq!(address_of(&msg), None);
    }

    fn route_msg(family: AddressFamily, attrs: Vec<RouteAttribute>, len: u8) -> RouteMessage {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family;
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.kind = RouteType::Unicast;
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.destination_prefix_length = len;
        msg.attributes = attrs;
        msg
    }

    #[test]
    fn route_messages_become_routes_of_both_families() {
        let default6 = route_msg(
            AddressFamily::Inet6,
            vec![
                RouteAttribute::Table(254),
                RouteAttribute::Gateway(RouteAddress::Inet6("fd23::1".parse().expect("ip"))),
                RouteAttribute::Oif(3),
            ],
            0,
        );
        let r = route_of(&default6).expect("route");
        assert_eq!(r.destination, "::/0".parse::<IpNet>().expect("net"));
        assert_eq!(r.gateway, Some("fd23::1".parse().expect("ip")));
        assert_eq!(
            (r.table, r.oif, r.unicast, r.kernel),
            (254, Some(3), true, false)
        );

        let mut subnet = route_msg(
            AddressFamily::Inet,
            vec![
                RouteAttribute::Destination(RouteAddress::Inet(Ipv4Addr::new(10, 231, 1, 0))),
                RouteAttribute::Oif(3),
            ],
            24,
        );
        subnet.header.protocol = RouteProtocol::Kernel;
        let r = route_of(&subnet).expect("route");
        assert_eq!(
            r.destination,
            "10.231.1.0/24".parse::<IpNet>().expect("net")
        );
        assert!(r.kernel);
        assert_eq!(r.gateway, None);

        // Other families, mismatched or overlong destinations are dropped.
        assert!(route_of(&route_msg(AddressFamily::Mpls, vec![], 0)).is_none());
        let mixed = route_msg(
            AddressFamily::Inet6,
            vec![RouteAttribute::Destination(RouteAddress::Inet(
                Ipv4Addr::LOCALHOST,
            ))],
            8,
        );
        assert!(route_of(&mixed).is_none());
        assert!(route_of(&route_msg(AddressFamily::Inet, vec![], 33)).is_none());
    }
}
