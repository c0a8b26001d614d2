//! The steps of pod networking and their order, over the [`Netns`] operations of one network
//! namespace (netlink in production, a fake in the tests).
//!
//! Attach: create the tap; give it the veth's MTU and bring it up; ingress qdisc on the veth
//! and a match-all filter redirecting to the tap's egress; the same on the tap towards the
//! veth. A failure at any step undoes the steps before it (the veth's qdisc, then the tap,
//! which takes its own qdisc and filter along), so a failed attach leaves the namespace as
//! CNI made it. Detach deletes the veth's qdisc, then the tap, going on past failures.

use std::path::Path;

use super::interface::{self, Address, Link, PodInterface, RouteEntry};
use super::{Cause, NetworkError, Op, Table, TAP_NAME};

/// The operations pod networking makes in one network namespace.
pub(crate) trait Netns {
    /// Every link.
    async fn links(&mut self) -> Result<Vec<Link>, Cause>;
    /// Every address, both families.
    async fn addresses(&mut self) -> Result<Vec<Address>, Cause>;
    /// Every route, both families, all tables.
    async fn routes(&mut self) -> Result<Vec<RouteEntry>, Cause>;
    /// Creates the persistent tap `name` (failing if it exists); its index.
    async fn create_tap(&mut self, name: &str) -> Result<u32, Cause>;
    /// Sets the MTU of link `index` and brings it up.
    async fn set_up(&mut self, index: u32, mtu: u32) -> Result<(), Cause>;
    /// Adds an ingress qdisc to link `index`.
    async fn add_ingress(&mut self, index: u32) -> Result<(), Cause>;
    /// Adds a filter to `from`'s ingress that redirects every frame to `to`'s egress.
    async fn add_redirect(&mut self, from: u32, to: u32) -> Result<(), Cause>;
    /// Deletes link `index`'s ingress qdisc with its filters.
    async fn delete_ingress(&mut self, index: u32) -> Result<(), Cause>;
    /// Deletes link `index`.
    async fn delete_link(&mut self, index: u32) -> Result<(), Cause>;
}

/// Reads the namespace and picks the pod's interface.
pub(crate) async fn discover(
    ns: &mut impl Netns,
    netns: &Path,
) -> Result<Option<PodInterface>, NetworkError> {
    let read = |table| {
        move |source| NetworkError::Read {
            table,
            netns: netns.to_path_buf(),
            source,
        }
    };
    let links = ns.links().await.map_err(read(Table::Links))?;
    let addresses = ns.addresses().await.map_err(read(Table::Addresses))?;
    let routes = ns.routes().await.map_err(read(Table::Routes))?;
    interface::pod_interface(&links, &addresses, &routes).map_err(|source| NetworkError::Invalid {
        netns: netns.to_path_buf(),
        source,
    })
}

fn change(op: Op, iface: &str, netns: &Path) -> impl FnOnce(Cause) -> NetworkError {
    let (iface, netns) = (iface.to_string(), netns.to_path_buf());
    move |source| NetworkError::Change {
        op,
        iface,
        netns,
        source,
    }
}

/// Wires a new tap to `veth` both ways; the tap's index. Undoes itself on failure.
pub(crate) async fn attach(
    ns: &mut impl Netns,
    netns: &Path,
    veth: &PodInterface,
) -> Result<u32, NetworkError> {
    let tap = ns
        .create_tap(TAP_NAME)
        .await
        .map_err(change(Op::CreateTap, TAP_NAME, netns))?;
    match wire(ns, netns, veth, tap).await {
        Ok(()) => Ok(tap),
        Err((e, veth_qdisc)) => {
            let veth_part = veth_qdisc.then_some((veth.index, veth.name.as_str()));
            for undone in remove(ns, netns, veth_part, (tap, TAP_NAME)).await {
                tracing::warn!(error = %undone, "undoing a failed pod network attach");
            }
            Err(e)
        }
    }
}

/// Wires the tap [`TAP_NAME`] that is already in the namespace (a VM's NIC serves it since its
/// boot) to `veth` both ways; the tap's index. On failure the qdiscs made are removed again;
/// the tap stays (its VM holds it).
pub(crate) async fn attach_existing(
    ns: &mut impl Netns,
    netns: &Path,
    veth: &PodInterface,
) -> Result<u32, NetworkError> {
    let links = ns.links().await.map_err(|source| NetworkError::Read {
        table: Table::Links,
        netns: netns.to_path_buf(),
        source,
    })?;
    let tap = links
        .iter()
        .find(|l| l.name == TAP_NAME)
        .map(|l| l.index)
        .ok_or_else(|| {
            change(Op::FindTap, TAP_NAME, netns)(Cause::Os(std::io::Error::from_raw_os_error(
                libc::ENODEV,
            )))
        })?;
    match wire(ns, netns, veth, tap).await {
        Ok(()) => Ok(tap),
        Err((e, veth_qdisc)) => {
            let undo = [
                veth_qdisc.then_some((veth.index, veth.name.as_str())),
                Some((tap, TAP_NAME)),
            ];
            for (index, name) in undo.into_iter().flatten() {
                // The tap's qdisc may not exist yet: its deletion failing is expected then.
                if let Err(undone) = ns.delete_ingress(index).await {
                    tracing::debug!(iface = name, error = %undone, "undoing a failed late attach");
                }
            }
            Err(e)
        }
    }
}

/// Brings `tap` up with the veth's MTU and adds the redirects both ways; on failure the error
/// and whether the veth's qdisc was made.
async fn wire(
    ns: &mut impl Netns,
    netns: &Path,
    veth: &PodInterface,
    tap: u32,
) -> Result<(), (NetworkError, bool)> {
    ns.set_up(tap, veth.mtu)
        .await
        .map_err(|e| (change(Op::SetUp, TAP_NAME, netns)(e), false))?;
    ns.add_ingress(veth.index)
        .await
        .map_err(|e| (change(Op::AddIngress, &veth.name, netns)(e), false))?;
    let made = |op, name: &str| {
        let name = name.to_string();
        move |e| (change(op, &name, netns)(e), true)
    };
    ns.add_redirect(veth.index, tap)
        .await
        .map_err(made(Op::AddRedirect, &veth.name))?;
    ns.add_ingress(tap)
        .await
        .map_err(made(Op::AddIngress, TAP_NAME))?;
    ns.add_redirect(tap, veth.index)
        .await
        .map_err(made(Op::AddRedirect, TAP_NAME))
}

/// Undoes [`attach`]: the veth's qdisc, then the tap. The failures, for the log.
pub(crate) async fn detach(
    ns: &mut impl Netns,
    netns: &Path,
    veth: (u32, &str),
    tap: (u32, &str),
) -> Vec<NetworkError> {
    remove(ns, netns, Some(veth), tap).await
}

async fn remove(
    ns: &mut impl Netns,
    netns: &Path,
    veth: Option<(u32, &str)>,
    (tap, tap_name): (u32, &str),
) -> Vec<NetworkError> {
    let mut failures = Vec::new();
    if let Some((index, name)) = veth {
        if let Err(e) = ns.delete_ingress(index).await {
            failures.push(change(Op::DeleteIngress, name, netns)(e));
        }
    }
    if let Err(e) = ns.delete_link(tap).await {
        failures.push(change(Op::DeleteLink, tap_name, netns)(e));
    }
    failures
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::net::IpAddr;

    use super::*;
    use crate::network::interface::MAIN_TABLE;

    /// A namespace in memory: links, ingress qdiscs, redirect filters, and a call log; `fail`
    /// makes the named call fail once it is reached.
    #[derive(Default)]
    struct FakeNetns {
        links: Vec<Link>,
        addresses: Vec<Address>,
        routes: Vec<RouteEntry>,
        up: BTreeSet<u32>,
        qdiscs: BTreeSet<u32>,
        filters: BTreeSet<(u32, u32)>,
        calls: Vec<String>,
        fail: Option<String>,
    }

    impl FakeNetns {
        fn call(&mut self, call: String) -> Result<(), Cause> {
            let failed = self.fail.as_deref() == Some(call.as_str());
            self.calls.push(call);
            if failed {
                return Err(Cause::Os(std::io::Error::from_raw_os_error(libc::EPERM)));
            }
            Ok(())
        }

        fn known(&self, index: u32) -> Result<(), Cause> {
            if self.links.iter().any(|l| l.index == index) {
                Ok(())
            } else {
                Err(Cause::Os(std::io::Error::from_raw_os_error(libc::ENODEV)))
            }
        }

        /// What CNI made: lo and eth0 (index 2) with a dual-stack address pair and routes.
        fn cni() -> FakeNetns {
            let link = |index, name: &str, ether| Link {
                index,
                name: name.into(),
                ether,
                mac: vec![0x0a, 0x58, 0x0a, 0xe7, 0x01, 0x02],
                mtu: 1500,
            };
            let address = |addr: &str, prefix_len| Address {
                index: 2,
                addr: addr.parse::<IpAddr>().expect("ip"),
                prefix_len,
            };
            let route = |dst: &str, gw: &str| RouteEntry {
                table: MAIN_TABLE,
                unicast: true,
                kernel: false,
                oif: Some(2),
                destination: dst.parse().expect("net"),
                gateway: gw.parse().ok(),
            };
            FakeNetns {
                links: vec![link(1, "lo", false), link(2, "eth0", true)],
                addresses: vec![address("10.231.3.2", 24), address("fd23:1:3::2", 64)],
                routes: vec![
                    route("0.0.0.0/0", "10.231.3.1"),
                    route("::/0", "fd23:1:3::1"),
                ],
                ..FakeNetns::default()
            }
        }

        /// The namespace holds nothing of ours.
        fn untouched(&self) -> bool {
            self.links.iter().all(|l| l.name != TAP_NAME)
                && self.qdiscs.is_empty()
                && self.filters.is_empty()
        }
    }

    impl Netns for FakeNetns {
        async fn links(&mut self) -> Result<Vec<Link>, Cause> {
            self.call("links".into())?;
            Ok(self.links.clone())
        }

        async fn addresses(&mut self) -> Result<Vec<Address>, Cause> {
            self.call("addresses".into())?;
            Ok(self.addresses.clone())
        }

        async fn routes(&mut self) -> Result<Vec<RouteEntry>, Cause> {
            self.call("routes".into())?;
            Ok(self.routes.clone())
        }

        async fn create_tap(&mut self, name: &str) -> Result<u32, Cause> {
            self.call(format!("create_tap {name}"))?;
            if self.links.iter().any(|l| l.name == name) {
                return Err(Cause::Os(std::io::Error::from_raw_os_error(libc::EBUSY)));
            }
            let index = self.links.iter().map(|l| l.index).max().unwrap_or(0) + 1;
            self.links.push(Link {
                index,
                name: name.into(),
                ether: true,
                mac: vec![2, 0, 0, 0, 0, 1],
                mtu: 1500,
            });
            Ok(index)
        }

        async fn set_up(&mut self, index: u32, mtu: u32) -> Result<(), Cause> {
            self.call(format!("set_up {index} mtu {mtu}"))?;
            self.known(index)?;
            self.up.insert(index);
            Ok(())
        }

        async fn add_ingress(&mut self, index: u32) -> Result<(), Cause> {
            self.call(format!("add_ingress {index}"))?;
            self.known(index)?;
            if !self.qdiscs.insert(index) {
                return Err(Cause::Os(std::io::Error::from_raw_os_error(libc::EEXIST)));
            }
            Ok(())
        }

        async fn add_redirect(&mut self, from: u32, to: u32) -> Result<(), Cause> {
            self.call(format!("add_redirect {from} -> {to}"))?;
            self.known(to)?;
            if !self.qdiscs.contains(&from) {
                return Err(Cause::Os(std::io::Error::from_raw_os_error(libc::EINVAL)));
            }
            self.filters.insert((from, to));
            Ok(())
        }

        async fn delete_ingress(&mut self, index: u32) -> Result<(), Cause> {
            self.call(format!("delete_ingress {index}"))?;
            if !self.qdiscs.remove(&index) {
                return Err(Cause::Os(std::io::Error::from_raw_os_error(libc::EINVAL)));
            }
            self.filters.retain(|(from, _)| *from != index);
            Ok(())
        }

        async fn delete_link(&mut self, index: u32) -> Result<(), Cause> {
            self.call(format!("delete_link {index}"))?;
            self.known(index)?;
            // A link takes its qdisc and filters along.
            self.links.retain(|l| l.index != index);
            self.up.remove(&index);
            self.qdiscs.remove(&index);
            self.filters.retain(|(from, _)| *from != index);
            Ok(())
        }
    }

    fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    const NETNS: &str = "/var/run/netns/cni-test";

    #[test]
    fn discover_reads_the_three_tables_and_picks_the_veth() {
        let mut ns = FakeNetns::cni();
        let iface = block_on(discover(&mut ns, Path::new(NETNS)))
            .expect("discover")
            .expect("interface");
        assert_eq!(ns.calls, ["links", "addresses", "routes"]);
        assert_eq!((iface.name.as_str(), iface.index), ("eth0", 2));
        assert_eq!(iface.addresses.len(), 2);
        assert_eq!(iface.routes.len(), 2);

        let mut ns = FakeNetns::cni();
        ns.fail = Some("addresses".into());
        let err = block_on(discover(&mut ns, Path::new(NETNS))).expect_err("fails");
        assert!(matches!(
            err,
            NetworkError::Read {
                table: Table::Addresses,
                ..
            }
        ));
        assert_eq!(
            err.to_string(),
            format!("listing the addresses of network namespace {NETNS}")
        );
    }

    fn pod_iface(ns: &mut FakeNetns) -> PodInterface {
        block_on(discover(ns, Path::new(NETNS)))
            .expect("discover")
            .expect("interface")
    }

    #[test]
    fn attach_wires_both_directions_in_order_and_detach_removes_everything() {
        let mut ns = FakeNetns::cni();
        let veth = pod_iface(&mut ns);
        ns.calls.clear();
        let tap = block_on(attach(&mut ns, Path::new(NETNS), &veth)).expect("attach");
        assert_eq!(tap, 3);
        assert_eq!(
            ns.calls,
            [
                "create_tap tap0_pgn",
                "set_up 3 mtu 1500",
                "add_ingress 2",
                "add_redirect 2 -> 3",
                "add_ingress 3",
                "add_redirect 3 -> 2",
            ]
        );
        assert_eq!(ns.filters, BTreeSet::from([(2, 3), (3, 2)]));
        assert!(ns.up.contains(&3));

        ns.calls.clear();
        let failures = block_on(detach(
            &mut ns,
            Path::new(NETNS),
            (2, "eth0"),
            (3, TAP_NAME),
        ));
        assert!(failures.is_empty(), "{failures:?}");
        assert_eq!(ns.calls, ["delete_ingress 2", "delete_link 3"]);
        assert!(ns.untouched());
        assert_eq!(ns.links.len(), 2, "the veth stays (CNI removes it)");
    }

    /// CNI's namespace with the tap a VM has served since its boot (index 3, no address).
    fn with_tap() -> FakeNetns {
        let mut ns = FakeNetns::cni();
        ns.links.push(Link {
            index: 3,
            name: TAP_NAME.into(),
            ether: true,
            mac: vec![0x02, 0, 0, 0, 0, 0x01],
            mtu: 1500,
        });
        ns
    }

    #[test]
    fn a_late_interface_is_wired_to_the_existing_tap_and_a_failure_keeps_the_tap() {
        let mut ns = with_tap();
        let veth = pod_iface(&mut ns);
        assert_eq!(
            veth.name, "eth0",
            "the unaddressed tap is not the pod's interface"
        );
        ns.calls.clear();
        let tap = block_on(attach_existing(&mut ns, Path::new(NETNS), &veth)).expect("attach");
        assert_eq!(tap, 3);
        assert_eq!(
            ns.calls,
            [
                "links",
                "set_up 3 mtu 1500",
                "add_ingress 2",
                "add_redirect 2 -> 3",
                "add_ingress 3",
                "add_redirect 3 -> 2",
            ]
        );
        assert_eq!(ns.filters, BTreeSet::from([(2, 3), (3, 2)]));

        let mut ns = with_tap();
        let veth = pod_iface(&mut ns);
        ns.fail = Some("add_redirect 3 -> 2".into());
        let err = block_on(attach_existing(&mut ns, Path::new(NETNS), &veth)).expect_err("fails");
        assert!(
            err.to_string()
                .contains("mirred redirect filter to tap0_pgn"),
            "{err}"
        );
        assert!(
            ns.qdiscs.is_empty() && ns.filters.is_empty(),
            "{:?}",
            ns.calls
        );
        assert!(
            ns.links.iter().any(|l| l.name == TAP_NAME),
            "the VM's tap stays"
        );

        let mut ns = FakeNetns::cni();
        let veth = pod_iface(&mut ns);
        let err = block_on(attach_existing(&mut ns, Path::new(NETNS), &veth)).expect_err("no tap");
        assert_eq!(
            err.to_string(),
            format!("finding the tap tap0_pgn in network namespace {NETNS}")
        );
    }

    #[test]
    fn a_failure_at_any_attach_step_leaves_nothing_and_names_the_step() {
        let steps = [
            ("create_tap tap0_pgn", "creating the tap tap0_pgn"),
            (
                "set_up 3 mtu 1500",
                "setting the MTU and bringing up tap0_pgn",
            ),
            ("add_ingress 2", "adding the ingress qdisc to eth0"),
            (
                "add_redirect 2 -> 3",
                "adding the mirred redirect filter to eth0",
            ),
            ("add_ingress 3", "adding the ingress qdisc to tap0_pgn"),
            (
                "add_redirect 3 -> 2",
                "adding the mirred redirect filter to tap0_pgn",
            ),
        ];
        for (step, message) in steps {
            let mut ns = FakeNetns::cni();
            let veth = pod_iface(&mut ns);
            ns.fail = Some(step.into());
            let err = block_on(attach(&mut ns, Path::new(NETNS), &veth)).expect_err(step);
            assert_eq!(
                err.to_string(),
                format!("{message} in network namespace {NETNS}"),
                "failing {step}"
            );
            assert!(ns.untouched(), "failing {step} left {:?}", ns.calls);
            // Only what was made is undone: no qdisc deletion before the qdisc existed.
            let undo: Vec<&str> = ns
                .calls
                .iter()
                .map(String::as_str)
                .filter(|c| c.starts_with("delete"))
                .collect();
            let want: &[&str] = match step {
                "create_tap tap0_pgn" => &[],
                "set_up 3 mtu 1500" | "add_ingress 2" => &["delete_link 3"],
                _ => &["delete_ingress 2", "delete_link 3"],
            };
            assert_eq!(undo, want, "failing {step}");
        }
    }

    #[test]
    fn an_existing_tap_is_not_adopted_nor_deleted() {
        let mut ns = FakeNetns::cni();
        let veth = pod_iface(&mut ns);
        block_on(ns.create_tap(TAP_NAME)).expect("someone else's tap");
        let err = block_on(attach(&mut ns, Path::new(NETNS), &veth)).expect_err("busy");
        assert!(matches!(
            err,
            NetworkError::Change {
                op: Op::CreateTap,
                ..
            }
        ));
        assert!(ns.links.iter().any(|l| l.name == TAP_NAME), "left alone");
    }

    #[test]
    fn detach_goes_on_past_a_failure() {
        let mut ns = FakeNetns::cni();
        let veth = pod_iface(&mut ns);
        let tap = block_on(attach(&mut ns, Path::new(NETNS), &veth)).expect("attach");
        ns.fail = Some("delete_ingress 2".into());
        let failures = block_on(detach(
            &mut ns,
            Path::new(NETNS),
            (2, "eth0"),
            (tap, TAP_NAME),
        ));
        assert_eq!(failures.len(), 1);
        assert!(matches!(
            failures[0],
            NetworkError::Change {
                op: Op::DeleteIngress,
                ..
            }
        ));
        assert!(
            ns.links.iter().all(|l| l.name != TAP_NAME),
            "tap deleted anyway"
        );
    }
}
