//! A client of containerd's CRI streaming server (the URLs Exec, Attach and PortForward
//! return) over WebSocket, which that server offers beside SPDY: every binary message is one
//! chunk of one channel, its first byte the channel number.
//!
//! Channels: exec and attach (`v4.channel.k8s.io`) use 0 stdin, 1 stdout, 2 stderr, 3 the
//! final status (a JSON `Status`), 4 terminal resize; port-forward uses 0 data and 1 error per
//! port, each starting with the port as 2 bytes little-endian.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// The channel protocol containerd's streaming server speaks for all three.
pub const V4_CHANNEL: &str = "v4.channel.k8s.io";

/// Exec/attach channel numbers.
pub const STDIN: u8 = 0;
/// Standard output.
pub const STDOUT: u8 = 1;
/// Standard error.
pub const STDERR: u8 = 2;
/// The process's final status.
pub const STATUS: u8 = 3;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One open streaming session.
pub struct Channels {
    ws: Ws,
}

impl Channels {
    /// Opens the session at `url` (`http://…` as CRI returns it) with protocol [`V4_CHANNEL`].
    pub async fn open(url: &str) -> Result<Channels> {
        let ws_url = url
            .strip_prefix("http://")
            .map(|rest| format!("ws://{rest}"))
            .with_context(|| format!("a plain-HTTP streaming URL, not {url}"))?;
        let mut request = ws_url.as_str().into_client_request()?;
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", V4_CHANNEL.parse()?);
        let (ws, _) = tokio_tungstenite::connect_async(request)
            .await
            .with_context(|| format!("WebSocket to {ws_url}"))?;
        Ok(Channels { ws })
    }

    /// Sends `data` on `channel`.
    pub async fn send(&mut self, channel: u8, data: &[u8]) -> Result<()> {
        let mut frame = Vec::with_capacity(data.len() + 1);
        frame.push(channel);
        frame.extend_from_slice(data);
        self.ws.send(Message::Binary(frame.into())).await?;
        Ok(())
    }

    /// The next non-empty chunk, as (channel, bytes); None once the server closed.
    pub async fn recv(&mut self) -> Result<Option<(u8, Vec<u8>)>> {
        while let Some(msg) = self.ws.next().await {
            match msg {
                Ok(Message::Binary(b)) if b.len() > 1 => return Ok(Some((b[0], b[1..].to_vec()))),
                Ok(Message::Close(_)) => return Ok(None),
                Ok(_) => {}
                // containerd ends a finished session by closing its TCP connection.
                Err(tokio_tungstenite::tungstenite::Error::Protocol(_)) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(None)
    }

    /// Every channel's bytes until the server closes, within `patience`.
    pub async fn collect(mut self, patience: Duration) -> Result<BTreeMap<u8, Vec<u8>>> {
        let mut out: BTreeMap<u8, Vec<u8>> = BTreeMap::new();
        let all = async {
            while let Some((channel, data)) = self.recv().await? {
                out.entry(channel).or_default().extend(data);
            }
            anyhow::Ok(())
        };
        match tokio::time::timeout(patience, all).await {
            Ok(done) => done?,
            Err(_) => bail!("the streaming session did not end within {patience:?}: {out:?}"),
        }
        Ok(out)
    }

    /// Reads until channel `channel` has carried `text`, within `patience`; all of its bytes.
    pub async fn read_until(
        &mut self,
        channel: u8,
        text: &str,
        patience: Duration,
    ) -> Result<String> {
        let mut seen = Vec::new();
        let wait = async {
            while !String::from_utf8_lossy(&seen).contains(text) {
                match self.recv().await? {
                    Some((c, data)) if c == channel => seen.extend(data),
                    Some(_) => {}
                    None => bail!("the session closed before {text:?} on channel {channel}"),
                }
            }
            anyhow::Ok(())
        };
        match tokio::time::timeout(patience, wait).await {
            Ok(done) => done?,
            Err(_) => bail!("no {text:?} on channel {channel} within {patience:?}"),
        }
        Ok(String::from_utf8_lossy(&seen).into_owned())
    }
}

/// What a port-forward session carried for its one port.
#[derive(Debug)]
pub struct Forwarded {
    /// The data channel's bytes after its port prefix: the server's answer.
    pub data: Vec<u8>,
    /// The error channel's text after its port prefix (empty when forwarding worked).
    pub error: String,
}

/// Forwards `request` to `port` through the PortForward URL `url` (made for that one port) and
/// returns what came back once the server ended the session.
pub async fn port_forward(
    url: &str,
    port: u16,
    request: &[u8],
    patience: Duration,
) -> Result<Forwarded> {
    let mut session = Channels::open(url).await?;
    session.send(0, request).await?;
    let channels = session.collect(patience).await?;
    let strip = |channel: u8| -> Result<Vec<u8>> {
        let bytes = channels.get(&channel).cloned().unwrap_or_default();
        match bytes.get(..2) {
            Some(prefix) if prefix == port.to_le_bytes() => Ok(bytes[2..].to_vec()),
            _ => bail!("channel {channel} does not start with port {port}: {bytes:?}"),
        }
    };
    Ok(Forwarded {
        data: strip(0)?,
        error: String::from_utf8_lossy(&strip(1)?).into_owned(),
    })
}
