//! The Pangolin agent API, shared by the host (shim, `pangolin` CLI) and the guest agent.
//!
//! `agent.proto` is the source of truth; this crate only compiles it. Bump [`API_VERSION`]
//! together with the proto package name on any incompatible change.
#![deny(missing_docs)]

/// Version of the agent API spoken by this build; reported by `GetGuestDetails`.
pub const API_VERSION: u32 = 1;

/// vsock port the agent's ttrpc server listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Host vsock port (CID 2) the agent dials once it serves: the host's readiness signal, so
/// the host never polls a guest that is still booting.
pub const AGENT_READY_PORT: u32 = 1025;

/// vsock port of the agent's port forwarder (CRI PortForward). Its protocol, one connection
/// per forwarded TCP connection: the host writes the guest TCP port, 2 bytes big-endian; the
/// agent connects to it on the guest's loopback (`127.0.0.1`, then `::1`) and answers one byte,
/// [`FORWARD_CONNECTED`] or [`FORWARD_REFUSED`]; after [`FORWARD_CONNECTED`] the stream carries
/// the TCP connection's bytes both ways until either side closes.
pub const AGENT_FORWARD_PORT: u32 = 1026;

/// vsock port of the agent's debug console (`pangolin console`), listening only when the
/// host asked for it (`debug_console_shell` in GetGuestDetails). Its frames: [`console`].
pub const AGENT_CONSOLE_PORT: u32 = 1027;

/// The forwarder's answer: connected, the bytes that follow are the connection's.
pub const FORWARD_CONNECTED: u8 = 0;

/// The forwarder's answer: nothing accepted the connection on that port (or port 0 was asked).
pub const FORWARD_REFUSED: u8 = 1;

/// Relays a forwarded connection until the server's side ends, as both ends of the
/// forwarder do: `client` is the side that asked (containerd's connection, or the host's
/// stream in the guest), `server` the side that was connected to. The client's end of input
/// only half-closes the server's side (a request may still be answered); the server's end of
/// output ends the relay, and both are closed, so the client sees the connection end even
/// where a transport does not carry half-closes (hybrid vsock through a VMM need not).
///
/// # Errors
/// Reading from the server or writing to the client failed.
pub async fn relay<C, S>(client: C, server: S) -> std::io::Result<()>
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite,
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    use tokio::io::AsyncWriteExt;
    let (mut client_in, mut client_out) = tokio::io::split(client);
    let (mut server_in, mut server_out) = tokio::io::split(server);
    let requests = async {
        if tokio::io::copy(&mut client_in, &mut server_out)
            .await
            .is_ok()
        {
            let _ = server_out.shutdown().await;
        }
        // Only the answers end the relay.
        std::future::pending::<()>().await;
    };
    let answers = async {
        tokio::io::copy(&mut server_in, &mut client_out).await?;
        client_out.shutdown().await
    };
    tokio::select! {
        done = answers => done,
        () = requests => Ok(()),
    }
}

/// Guest path where the agent mounts the sandbox's virtio-fs share.
pub const GUEST_SHARED_DIR: &str = "/run/pangolin/shared";

/// Kernel command line key setting the agent's log level.
pub const LOG_PARAM: &str = "pangolin.log";

pub mod console;

/// Protobuf messages of the agent API.
#[allow(missing_docs, warnings, clippy::all, clippy::pedantic)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

/// ttrpc client and server stubs of the agent API.
#[allow(missing_docs, warnings, clippy::all, clippy::pedantic)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn the_relay_ends_when_the_server_ends_though_the_client_stays_open() {
        let (client, mut client_peer) = tokio::io::duplex(64);
        let (server, mut server_peer) = tokio::io::duplex(64);
        let relay = tokio::spawn(super::relay(client, server));
        client_peer.write_all(b"ask").await.expect("ask");
        let mut asked = [0u8; 3];
        server_peer.read_exact(&mut asked).await.expect("asked");
        assert_eq!(&asked, b"ask");
        server_peer.write_all(b"answer").await.expect("answer");
        drop(server_peer);
        let mut answer = Vec::new();
        // The client never closes its side: the answer still ends.
        client_peer.read_to_end(&mut answer).await.expect("answer");
        assert_eq!(answer, b"answer");
        relay.await.expect("join").expect("relay");
    }

    #[tokio::test]
    async fn a_client_that_closes_its_side_still_gets_the_answer() {
        let (client, mut client_peer) = tokio::io::duplex(64);
        let (server, mut server_peer) = tokio::io::duplex(64);
        let relay = tokio::spawn(super::relay(client, server));
        client_peer.write_all(b"ask").await.expect("ask");
        client_peer.shutdown().await.expect("half-close");
        let mut asked = Vec::new();
        server_peer
            .read_to_end(&mut asked)
            .await
            .expect("asked, then EOF");
        assert_eq!(asked, b"ask");
        server_peer.write_all(b"late answer").await.expect("answer");
        drop(server_peer);
        let mut answer = Vec::new();
        client_peer.read_to_end(&mut answer).await.expect("answer");
        assert_eq!(answer, b"late answer");
        relay.await.expect("join").expect("relay");
    }
}
