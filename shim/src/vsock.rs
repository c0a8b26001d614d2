//! Host side of hybrid vsock: reaching a guest port through the VMM's Unix socket.
//!
//! Protocol (Firecracker's, also spoken by vhost-device-vsock and our built-in VMM):
//! the host connects to the VM's Unix socket, writes `CONNECT <port>\n`, and reads
//! `OK <host-side-port>\n`; from then on the stream carries the guest connection's bytes.
//! If nothing listens on the guest port the VMM closes the stream instead of answering.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Longest acknowledgement line accepted ("OK 4294967295\n" is 14 bytes).
const MAX_ACK: usize = 32;

/// Why a hybrid vsock connection failed.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The VMM's socket could not be connected.
    #[error("cannot connect to {0}")]
    Connect(PathBuf, #[source] std::io::Error),
    /// The handshake failed: nobody listens on the port yet, or the VMM refused.
    #[error("guest port {port} refused the connection ({reason})")]
    Refused {
        /// Guest port.
        port: u32,
        /// What was seen.
        reason: &'static str,
    },
    /// The handshake did not finish in time.
    #[error("no answer to CONNECT {0} within {1:?}")]
    Timeout(u32, Duration),
}

/// Opens a stream to guest `port` through the hybrid vsock socket `uds`.
pub async fn connect(uds: &Path, port: u32, timeout: Duration) -> Result<UnixStream, VsockError> {
    let mut stream = UnixStream::connect(uds)
        .await
        .map_err(|e| VsockError::Connect(uds.into(), e))?;
    let handshake = async {
        stream
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .await
            .map_err(|_| VsockError::Refused {
                port,
                reason: "write failed",
            })?;
        // Read byte by byte: bytes after the newline belong to the guest's stream.
        let mut line = Vec::with_capacity(MAX_ACK);
        loop {
            let mut byte = [0u8; 1];
            match stream.read(&mut byte).await {
                Ok(0) | Err(_) => {
                    return Err(VsockError::Refused {
                        port,
                        reason: "closed",
                    })
                }
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) if line.len() >= MAX_ACK => {
                    return Err(VsockError::Refused {
                        port,
                        reason: "overlong answer",
                    })
                }
                Ok(_) => line.push(byte[0]),
            }
        }
        if line.starts_with(b"OK ") {
            Ok(())
        } else {
            Err(VsockError::Refused {
                port,
                reason: "unexpected answer",
            })
        }
    };
    match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(())) => Ok(stream),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(VsockError::Timeout(port, timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::TestDir;
    use tokio::net::UnixListener;

    async fn fake_vmm(answer: &'static [u8]) -> (TestDir, tokio::task::JoinHandle<Vec<u8>>) {
        let dir = TestDir::new("vsock");
        let listener = UnixListener::bind(dir.path.join("vm.vsock")).expect("bind");
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut buf = vec![0u8; 64];
            let n = s.read(&mut buf).await.expect("read");
            s.write_all(answer).await.expect("write");
            buf.truncate(n);
            buf
        });
        (dir, task)
    }

    #[tokio::test]
    async fn handshake_sends_connect_and_accepts_ok() {
        let (dir, task) = fake_vmm(b"OK 1073741824\nhello").await;
        let mut s = connect(&dir.path.join("vm.vsock"), 1024, Duration::from_secs(2))
            .await
            .expect("connect");
        assert_eq!(task.await.expect("join"), b"CONNECT 1024\n");
        let mut rest = [0u8; 5];
        s.read_exact(&mut rest).await.expect("payload");
        assert_eq!(&rest, b"hello", "bytes after the ack belong to the stream");
    }

    #[tokio::test]
    async fn a_closed_or_garbled_answer_is_refused() {
        let (dir, _task) = fake_vmm(b"").await;
        let err = connect(&dir.path.join("vm.vsock"), 1024, Duration::from_secs(2))
            .await
            .expect_err("closed");
        assert!(matches!(err, VsockError::Refused { .. }), "{err}");
        let (dir, _task) = fake_vmm(b"NO\n").await;
        let err = connect(&dir.path.join("vm.vsock"), 1024, Duration::from_secs(2))
            .await
            .expect_err("bad");
        assert!(
            matches!(
                err,
                VsockError::Refused {
                    reason: "unexpected answer",
                    ..
                }
            ),
            "{err}"
        );
        let (dir, _task) = fake_vmm(&[b'x'; 100]).await;
        let err = connect(&dir.path.join("vm.vsock"), 1024, Duration::from_secs(2))
            .await
            .expect_err("long");
        assert!(
            matches!(
                err,
                VsockError::Refused {
                    reason: "overlong answer",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_missing_socket_is_a_connect_error() {
        let err = connect(
            Path::new("/nonexistent/vm.vsock"),
            1024,
            Duration::from_secs(1),
        )
        .await
        .expect_err("missing");
        assert!(matches!(err, VsockError::Connect(..)));
    }
}
