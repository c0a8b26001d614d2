//! Guest network configuration: loopback up at boot, and the pod's interface (found by the MAC
//! the VMM gave it) with its IPv4 address, MTU and routes, through the classic `SIOC*` ioctls
//! (the guest has no `ip` binary, and these few calls need no netlink client).

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use pangolin_protocols::agent::SetupNetworkRequest;

/// A network setting could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A request field does not parse.
    #[error("{field}: {why}")]
    Invalid {
        /// The request field.
        field: String,
        /// What is wrong with it.
        why: String,
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
    Ioctl {
        /// Which setting.
        what: &'static str,
        /// The interface.
        dev: String,
        /// The kernel's answer.
        #[source]
        source: std::io::Error,
    },
}

/// An IPv4 network in CIDR form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// Address.
    pub addr: Ipv4Addr,
    /// Prefix length (0-32).
    pub prefix: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/n`; `field` names the request field in the error.
    pub fn parse(s: &str, field: &str) -> Result<Cidr, NetError> {
        let bad = |why: &str| NetError::Invalid {
            field: field.to_string(),
            why: format!("{s:?}: {why}"),
        };
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| bad("not CIDR (a.b.c.d/n)"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad("not an IPv4 address"))?;
        let prefix: u8 = prefix.parse().map_err(|_| bad("bad prefix length"))?;
        if prefix > 32 {
            return Err(bad("prefix length over 32"));
        }
        Ok(Cidr { addr, prefix })
    }

    /// The network this address is in (host bits cleared).
    pub fn network(self) -> Cidr {
        Cidr {
            addr: Ipv4Addr::from(u32::from(self.addr) & u32::from(self.netmask())),
            prefix: self.prefix,
        }
    }

    /// The netmask of the prefix.
    pub fn netmask(self) -> Ipv4Addr {
        let bits = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        Ipv4Addr::from(bits)
    }
}

fn control_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the returned descriptor is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(dev: &str) -> Result<libc::ifreq, NetError> {
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = dev.as_bytes();
    if name.is_empty() || name.len() >= req.ifr_name.len() {
        return Err(NetError::Invalid {
            field: "interface name".into(),
            why: format!("{dev:?} is not a valid interface name"),
        });
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name) {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    Ok(req)
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap_or_default(),
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads it as sockaddr_in
    // because of sin_family.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl(
    sock: &OwnedFd,
    request: libc::Ioctl,
    arg: *mut libc::c_void,
    what: &'static str,
    dev: &str,
) -> Result<(), NetError> {
    // SAFETY: `arg` points at a live ifreq/rtentry of the type `request` expects.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request, arg) };
    if rc < 0 {
        return Err(NetError::Ioctl {
            what,
            dev: dev.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Sets IFF_UP on `dev`.
pub fn link_up(dev: &str) -> Result<(), NetError> {
    let sock = control_socket().map_err(|source| NetError::Ioctl {
        what: "socket",
        dev: dev.into(),
        source,
    })?;
    let mut req = ifreq(dev)?;
    ioctl(
        &sock,
        libc::SIOCGIFFLAGS,
        std::ptr::addr_of_mut!(req).cast(),
        "reading flags",
        dev,
    )?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe {
        req.ifr_ifru.ifru_flags |= libc::c_short::try_from(libc::IFF_UP).unwrap_or_default();
    }
    ioctl(
        &sock,
        libc::SIOCSIFFLAGS,
        std::ptr::addr_of_mut!(req).cast(),
        "setting IFF_UP",
        dev,
    )
}

/// The guest interface whose MAC is `mac` (case-insensitive), from sysfs.
pub fn find_by_mac(mac: &str) -> Option<String> {
    let want = mac.to_ascii_lowercase();
    std::fs::read_dir("/sys/class/net")
        .ok()?
        .flatten()
        .find_map(|e| {
            let addr = std::fs::read_to_string(e.path().join("address")).ok()?;
            (addr.trim() == want).then(|| e.file_name().to_string_lossy().into_owned())
        })
}

/// Applies `req`: each interface's first address, MTU and link state, then the routes.
pub fn setup(req: &SetupNetworkRequest) -> Result<(), NetError> {
    let sock = control_socket().map_err(|source| NetError::Ioctl {
        what: "socket",
        dev: "-".into(),
        source,
    })?;
    // Subnets of the configured addresses: the kernel adds their on-link routes itself.
    let mut subnets = Vec::new();
    // Routes go through the (one) pod NIC, the last configured; an on-link route needs its
    // device named.
    let mut route_dev = None;
    for (index, iface) in req.interfaces.iter().enumerate() {
        let dev = find_by_mac(&iface.mac).ok_or_else(|| NetError::NoSuchMac {
            index,
            mac: iface.mac.clone(),
        })?;
        if iface.mtu > 0 {
            let mut r = ifreq(&dev)?;
            r.ifr_ifru.ifru_mtu =
                libc::c_int::try_from(iface.mtu).map_err(|_| NetError::Invalid {
                    field: format!("interfaces[{index}].mtu"),
                    why: format!("{} is too large", iface.mtu),
                })?;
            ioctl(
                &sock,
                libc::SIOCSIFMTU,
                std::ptr::addr_of_mut!(r).cast(),
                "setting the MTU",
                &dev,
            )?;
        }
        for (n, a) in iface.addresses.iter().enumerate() {
            let cidr = Cidr::parse(a, &format!("interfaces[{index}].addresses[{n}]"))?;
            subnets.push(cidr.network());
            if n > 0 {
                tracing::warn!(dev, address = %a, "only one address per interface is configured");
                continue;
            }
            let mut r = ifreq(&dev)?;
            r.ifr_ifru.ifru_addr = sockaddr_in(cidr.addr);
            ioctl(
                &sock,
                libc::SIOCSIFADDR,
                std::ptr::addr_of_mut!(r).cast(),
                "setting the address",
                &dev,
            )?;
            let mut r = ifreq(&dev)?;
            r.ifr_ifru.ifru_netmask = sockaddr_in(cidr.netmask());
            ioctl(
                &sock,
                libc::SIOCSIFNETMASK,
                std::ptr::addr_of_mut!(r).cast(),
                "setting the netmask",
                &dev,
            )?;
        }
        link_up(&dev)?;
        tracing::info!(dev, mac = %iface.mac, mtu = iface.mtu, addresses = ?iface.addresses, "interface configured");
        route_dev = Some(std::ffi::CString::new(dev).map_err(|_| NetError::Invalid {
            field: format!("interfaces[{index}]"),
            why: "interface name with a NUL byte".into(),
        })?);
    }
    for (index, route) in req.routes.iter().enumerate() {
        let dst = Cidr::parse(&route.destination, &format!("routes[{index}].destination"))?;
        if route.gateway.is_empty() && subnets.contains(&dst.network()) {
            continue;
        }
        let gateway = if route.gateway.is_empty() {
            None
        } else {
            Some(
                route
                    .gateway
                    .parse::<Ipv4Addr>()
                    .map_err(|_| NetError::Invalid {
                        field: format!("routes[{index}].gateway"),
                        why: format!("{:?} is not an IPv4 address", route.gateway),
                    })?,
            )
        };
        // SAFETY: rtentry is plain data; all-zero is a valid value.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr_in(dst.addr);
        rt.rt_genmask = sockaddr_in(dst.netmask());
        rt.rt_flags = libc::RTF_UP;
        if let Some(dev) = &route_dev {
            // The kernel only reads the name during the ioctl; `dev` outlives it.
            rt.rt_dev = dev.as_ptr().cast_mut();
        }
        if let Some(gw) = gateway {
            rt.rt_gateway = sockaddr_in(gw);
            rt.rt_flags |= libc::RTF_GATEWAY;
        }
        match ioctl(
            &sock,
            libc::SIOCADDRT,
            std::ptr::addr_of_mut!(rt).cast(),
            "adding a route",
            &route.destination,
        ) {
            // The kernel already made the subnet route of an address.
            Err(NetError::Ioctl { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {}
            other => other?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_bad_ones_name_the_field() {
        let c = Cidr::parse("10.88.0.5/16", "f").expect("cidr");
        assert_eq!(c.addr, Ipv4Addr::new(10, 88, 0, 5));
        assert_eq!(c.netmask(), Ipv4Addr::new(255, 255, 0, 0));
        assert_eq!(c.network(), Cidr::parse("10.88.0.0/16", "f").expect("net"));
        assert_eq!(
            Cidr::parse("0.0.0.0/0", "f").expect("default").netmask(),
            Ipv4Addr::UNSPECIFIED
        );
        assert_eq!(
            Cidr::parse("1.2.3.4/32", "f").expect("host").netmask(),
            Ipv4Addr::BROADCAST
        );
        for bad in ["10.0.0.1", "10.0.0.1/33", "fe80::1/64", "x/8"] {
            let err = Cidr::parse(bad, "routes[0].destination").expect_err(bad);
            assert!(
                err.to_string().starts_with("routes[0].destination: "),
                "{err}"
            );
        }
    }

    #[test]
    fn interface_names_are_bounded() {
        assert!(ifreq("eth0").is_ok());
        assert!(ifreq("").is_err());
        assert!(ifreq("a-name-far-too-long-for-ifnamsiz").is_err());
    }
}
