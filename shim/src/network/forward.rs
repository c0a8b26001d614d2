//! CRI port-forward into the VM. containerd serves PortForward (`kubectl port-forward`) by
//! dialling `localhost:<port>` (tcp4, then tcp6) from inside the pod's network namespace on the
//! host, where nothing listens: the pod's processes run in the guest, and the veth's stack
//! never sees a frame (tc mirrors them all to the tap). So the namespace gets:
//!
//! - one listener of the shim's on `127.0.0.1:<P>` (P chosen by the kernel);
//! - one nat `OUTPUT` rule, in that namespace only, that sends every other TCP connection to
//!   `127.0.0.1` to it: `iptables -t nat -A OUTPUT -o lo -d 127.0.0.1/32 -p tcp ! --dport P -j
//!   DNAT --to-destination 127.0.0.1:P`.
//!
//! Each accepted connection's original port comes from conntrack (`SO_ORIGINAL_DST`); its bytes
//! go over hybrid vsock to the agent's forwarder (`AGENT_FORWARD_PORT`), which connects to that
//! port on the guest's loopback, so loopback-bound and wildcard-bound servers are both reached.
//! Pod-IP traffic is untouched (the rule matches only `lo`). Both the rule and the listener's
//! socket live in the namespace: the rule goes with it, the socket with [`PortForward`].
//!
//! The guest is untrusted: its answer is one byte, read with a timeout, and the connections
//! open at once are bounded ([`MAX_CONNECTIONS`]; more are reset).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use pangolin_protocols::{AGENT_FORWARD_PORT, FORWARD_CONNECTED};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{netns, NetworkError};

/// Forwarded connections open at once per pod; a connection beyond is reset.
pub const MAX_CONNECTIONS: usize = 64;

/// How long the VMM may take to connect the forwarder's vsock port.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the guest may take to answer (its own loopback connect is bounded by 10 s).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

/// Where `iptables` is looked for after `PATH` (containerd may start the shim without sbin).
const IPTABLES: &[&str] = &["iptables", "/usr/sbin/iptables", "/sbin/iptables"];

/// A pod namespace's port-forward listener and its relays; dropping it closes them.
#[derive(Debug)]
pub struct PortForward {
    /// The listener's port on `127.0.0.1` in the pod namespace.
    pub port: u16,
    task: tokio::task::AbortHandle,
}

impl Drop for PortForward {
    fn drop(&mut self) {
        // The accept loop owns the listener and every relay (its JoinSet): all close.
        self.task.abort();
    }
}

/// The iptables arguments that send TCP connections to `127.0.0.1` other than to `port` on to
/// `127.0.0.1:port`.
fn rule(port: u16) -> Vec<String> {
    [
        "-w",
        "5",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-o",
        "lo",
        "-d",
        "127.0.0.1/32",
        "-p",
        "tcp",
        "!",
        "--dport",
    ]
    .iter()
    .map(ToString::to_string)
    .chain([
        port.to_string(),
        "-j".into(),
        "DNAT".into(),
        "--to-destination".into(),
        format!("127.0.0.1:{port}"),
    ])
    .collect()
}

/// Opens the listener and adds the rule in `netns`; relays to the guest through the hybrid
/// vsock socket `uds` (which may not exist yet: it is connected per connection).
///
/// # Errors
/// [`NetworkError::PortForward`] naming what failed (no iptables, the rule refused).
pub async fn start(netns: &Path, uds: &Path) -> Result<PortForward, NetworkError> {
    let path = netns.to_path_buf();
    let fail = move |what: String| NetworkError::PortForward {
        netns: path.clone(),
        what,
    };
    let failed = fail.clone();
    let listener = netns::run(netns, move || {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| failed(format!("listening on 127.0.0.1: {e}")))?;
        let port = listener
            .local_addr()
            .map_err(|e| failed(format!("reading the listener's port: {e}")))?
            .port();
        let iptables = IPTABLES
            .iter()
            .find_map(|p| crate::daemon::resolve_program(Path::new(p)))
            .ok_or_else(|| {
                failed("no iptables program (PATH, /usr/sbin, /sbin): install iptables".into())
            })?;
        // The child inherits this thread's namespace.
        let out = Command::new(&iptables)
            .args(rule(port))
            .output()
            .map_err(|e| failed(format!("running {}: {e}", iptables.display())))?;
        if !out.status.success() {
            return Err(failed(format!(
                "{} {} failed ({}): {}",
                iptables.display(),
                rule(port).join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(listener)
    })
    .await?;
    let listener = TcpListener::from_std(listener)
        .map_err(|e| fail(format!("registering the listener: {e}")))?;
    let port = listener
        .local_addr()
        .map_err(|e| fail(format!("reading the listener's port: {e}")))?
        .port();
    let uds = uds.to_path_buf();
    let task = tokio::spawn(accept_loop(listener, port, uds)).abort_handle();
    tracing::info!(netns = %netns.display(), port, "port-forward listening");
    Ok(PortForward { port, task })
}

async fn accept_loop(listener: TcpListener, own: u16, uds: PathBuf) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut relays = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                        tracing::warn!(limit = MAX_CONNECTIONS, "port-forward: too many connections; reset");
                        let _ = client.set_zero_linger();
                        continue;
                    };
                    let uds = uds.clone();
                    relays.spawn(async move {
                        if let Err(err) = relay(client, own, &uds).await {
                            tracing::debug!(%err, "port-forward connection ended");
                        }
                        drop(slot);
                    });
                }
                Err(err) => {
                    tracing::warn!(%err, "port-forward accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = relays.join_next(), if !relays.is_empty() => {}
        }
    }
}

/// The port `client` dialled before the DNAT rule sent it here.
fn original_port(client: &TcpStream) -> std::io::Result<u16> {
    let dst = nix::sys::socket::getsockopt(client, nix::sys::socket::sockopt::OriginalDst)?;
    Ok(u16::from_be(dst.sin_port))
}

/// Carries one connection to the guest: names the port, reads the answer, relays.
async fn relay(client: TcpStream, own: u16, uds: &Path) -> Result<(), String> {
    let port = original_port(&client).map_err(|e| format!("SO_ORIGINAL_DST: {e}"))?;
    if port == own {
        // Dialled the listener itself: nothing in the guest was asked for.
        return Err(format!("a connection to the forwarder's own port {own}"));
    }
    let refuse = |client: &TcpStream, why: String| {
        // A reset, as a refused connect would be for runc's pods.
        let _ = client.set_zero_linger();
        Err(format!("port {port}: {why}"))
    };
    let mut guest = match crate::vsock::connect(uds, AGENT_FORWARD_PORT, CONNECT_TIMEOUT).await {
        Ok(guest) => guest,
        Err(e) => return refuse(&client, e.to_string()),
    };
    let mut answer = [0u8; 1];
    let asked = async {
        guest.write_all(&port.to_be_bytes()).await?;
        guest.read_exact(&mut answer).await
    };
    match tokio::time::timeout(ANSWER_TIMEOUT, asked).await {
        Ok(Ok(_)) if answer[0] == FORWARD_CONNECTED => {}
        Ok(Ok(_)) => return refuse(&client, "nothing listens on it in the guest".into()),
        Ok(Err(e)) => return refuse(&client, format!("the guest's forwarder: {e}")),
        Err(_) => return refuse(&client, format!("no answer within {ANSWER_TIMEOUT:?}")),
    }
    tracing::debug!(port, peer = ?client.peer_addr().ok().map(|a: SocketAddr| a.port()), "port-forward connected");
    pangolin_protocols::relay(client, guest)
        .await
        .map_err(|e| format!("port {port}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::private::PrivateNetns;
    use crate::test_dir::TestDir;
    use std::io::{Read, Write};
    use tokio::net::UnixListener;

    /// The guest's forwarder behind a VMM's hybrid vsock socket: port 7 answers with the port
    /// and an echo of what it is sent, any other port is refused.
    async fn fake_guest(listener: UnixListener) {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut line = Vec::new();
                let mut byte = [0u8; 1];
                while conn.read_exact(&mut byte).await.is_ok() && byte[0] != b'\n' {
                    line.push(byte[0]);
                }
                assert_eq!(line, format!("CONNECT {AGENT_FORWARD_PORT}").as_bytes());
                conn.write_all(b"OK 1073741824\n").await.expect("ack");
                let mut port = [0u8; 2];
                conn.read_exact(&mut port).await.expect("port");
                let port = u16::from_be_bytes(port);
                if port != 7 {
                    conn.write_all(&[pangolin_protocols::FORWARD_REFUSED])
                        .await
                        .expect("answer");
                    return;
                }
                conn.write_all(&[FORWARD_CONNECTED]).await.expect("answer");
                let mut got = [0u8; 2];
                conn.read_exact(&mut got).await.expect("data");
                let reply = format!("{port}:{}", String::from_utf8_lossy(&got));
                conn.write_all(reply.as_bytes()).await.expect("reply");
            });
        }
    }

    /// Connects to `127.0.0.1:port` from inside `netns`, sends "hi"; what came back.
    async fn dial(netns: &Path, port: u16) -> std::io::Result<String> {
        netns::run(netns, move || {
            let attempt = (|| {
                let mut c = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
                c.set_read_timeout(Some(Duration::from_secs(10)))?;
                c.write_all(b"hi")?;
                let mut reply = String::new();
                c.read_to_string(&mut reply)?;
                Ok(reply)
            })();
            Ok(attempt)
        })
        .await
        .expect("netns")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_loopback_connection_in_the_pod_namespace_reaches_the_port_it_dialled_in_the_guest() {
        let dir = TestDir::new("forward");
        let netns = PrivateNetns::new(dir.path.join("netns"))
            .await
            .expect("a network namespace (needs root)");
        netns::run(&netns.path, || {
            let up = Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status();
            assert!(up.is_ok_and(|s| s.success()), "ip link set lo up");
            Ok(())
        })
        .await
        .expect("netns");
        let uds = dir.path.join("vm.vsock");
        let guest = tokio::spawn(fake_guest(UnixListener::bind(&uds).expect("uds")));
        let forward = start(&netns.path, &uds).await.expect("port-forward");

        assert_eq!(dial(&netns.path, 7).await.expect("port 7"), "7:hi");
        let refused = dial(&netns.path, 9).await;
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset)
                || refused.as_ref().is_ok_and(String::is_empty),
            "a port nothing listens on in the guest: {refused:?}"
        );

        let own = forward.port;
        drop(forward);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let gone = dial(&netns.path, own).await;
        assert!(
            gone.as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused),
            "the listener is closed with its PortForward: {gone:?}"
        );
        guest.abort();
    }

    #[test]
    fn the_rule_redirects_loopback_tcp_except_the_listeners_own_port() {
        assert_eq!(
            rule(41234).join(" "),
            "-w 5 -t nat -A OUTPUT -o lo -d 127.0.0.1/32 -p tcp ! --dport 41234 \
             -j DNAT --to-destination 127.0.0.1:41234"
        );
    }
}
