//! The guest end of CRI port-forward: a vsock listener on [`AGENT_FORWARD_PORT`] that connects
//! each host connection to the TCP port it names on the guest's loopback and relays bytes.
//!
//! Containers share the guest's network namespace, so its loopback is the pod's `localhost`:
//! a server bound to `127.0.0.1`, `::1` or a wildcard address is reached, as runc's pods are
//! reached by containerd dialling `localhost` in the pod's namespace. The protocol is in
//! `pangolin_protocols` ([`AGENT_FORWARD_PORT`]).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use pangolin_protocols::{AGENT_FORWARD_PORT, FORWARD_CONNECTED, FORWARD_REFUSED};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY};

/// Forwarded connections open at once; more wait for one to end (the host bounds its own).
const MAX_CONNECTIONS: usize = 256;

/// How long the host may take to name the port, and a loopback connect may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Listens on the forward port; each accepted connection is served on its own task.
///
/// # Errors
/// The listener could not be bound.
pub fn serve() -> std::io::Result<()> {
    let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, AGENT_FORWARD_PORT))?;
    crate::vsock_server::spawn(listener, MAX_CONNECTIONS, "port-forward", forward);
    Ok(())
}

/// Serves one host connection: reads the port, connects, answers, relays.
async fn forward(mut host: VsockStream) -> std::io::Result<()> {
    let mut port = [0u8; 2];
    tokio::time::timeout(STEP_TIMEOUT, host.read_exact(&mut port)).await??;
    let port = u16::from_be_bytes(port);
    let Some(target) = connect_loopback(port).await else {
        host.write_all(&[FORWARD_REFUSED]).await?;
        return Ok(());
    };
    host.write_all(&[FORWARD_CONNECTED]).await?;
    tracing::debug!(port, "port-forward connected");
    pangolin_protocols::relay(host, target).await
}

/// A connection to `port` on the loopback, IPv4 first then IPv6 (as containerd dials
/// `localhost` for runc's pods); None when neither accepts or `port` is 0.
async fn connect_loopback(port: u16) -> Option<TcpStream> {
    if port == 0 {
        return None;
    }
    for ip in [Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()] {
        let addr = SocketAddr::new(ip, port);
        if let Ok(Ok(stream)) = tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(addr)).await {
            return Some(stream);
        }
    }
    None
}
