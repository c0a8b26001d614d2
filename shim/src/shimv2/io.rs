//! containerd's stdio FIFOs ↔ the agent's process streams.
//!
//! Output: a task per stream reads the agent's stdout/stderr until EOF and writes the FIFO.
//! It holds a read end of the FIFO too, as containerd's runc shim does: while containerd is
//! away (restarted), the FIFO has a reader still, so writes go into the pipe's buffer for the
//! restarted containerd to read instead of failing with EPIPE and losing the output. A write
//! that cannot go anywhere for [`STALLED`] (nobody read a full pipe) gives up on the FIFO and
//! drains the guest side on, so the process's exit is never held back by a reader that is gone.
//! Input: a task reads the stdin FIFO and forwards to the agent, closing the process's stdin at
//! EOF. The exit waiter joins the output tasks before reporting the exit, so containerd sees all
//! output before TaskExit (the agent ends a stream once its exited process's buffered output is
//! read, so the join is prompt).

use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use std::sync::Arc;

use super::guest::Guest;

/// How long an output write may wait for a reader of a full FIFO before the FIFO is given up.
pub const STALLED: Duration = Duration::from_secs(10);

/// The FIFO paths containerd gave for one process (empty: not wanted).
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    /// stdin FIFO.
    pub stdin: String,
    /// stdout FIFO.
    pub stdout: String,
    /// stderr FIFO.
    pub stderr: String,
    /// Whether the process has a terminal (stdout carries both streams).
    pub terminal: bool,
}

/// The running pumps of one process.
pub struct Pumps {
    /// Output tasks (joined before the exit is reported).
    pub outputs: Vec<JoinHandle<()>>,
    /// Ends stdin after forwarding what is already in the FIFO (CloseIO).
    pub close_stdin: Option<oneshot::Sender<()>>,
}

/// Starts the pumps for process `exec_id` of container `id`.
pub fn start(guest: &Arc<dyn Guest>, id: &str, exec_id: &str, paths: &StdioPaths) -> Pumps {
    let mut outputs = Vec::new();
    for (path, stderr) in [(&paths.stdout, false), (&paths.stderr, true)] {
        if path.is_empty() || (stderr && paths.terminal) {
            continue;
        }
        let (agent, id, exec_id, path) = (
            Arc::clone(guest),
            id.to_string(),
            exec_id.to_string(),
            PathBuf::from(path),
        );
        outputs.push(tokio::spawn(async move {
            // Our own reader, never read from: it keeps the FIFO open across a containerd
            // restart (see the module header). Opened first, so the writer's open succeeds.
            let keep = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(&path);
            let mut fifo = match pipe::OpenOptions::new().open_sender(&path) {
                Ok(f) => Some((f, keep.ok())),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "opening an output FIFO");
                    None
                }
            };
            loop {
                match agent.read_output(&id, &exec_id, stderr).await {
                    Ok(Some(data)) => {
                        if let Some((f, _)) = fifo.as_mut() {
                            match tokio::time::timeout(STALLED, f.write_all(&data)).await {
                                Ok(Ok(())) => {}
                                Ok(Err(e)) => {
                                    tracing::debug!(path = %path.display(), error = %e, "output FIFO closed");
                                    fifo = None; // keep draining the guest side
                                }
                                Err(_) => {
                                    tracing::warn!(path = %path.display(), "output FIFO full and unread for {STALLED:?}: its output is dropped from here on");
                                    fifo = None;
                                }
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "reading process output");
                        break;
                    }
                }
            }
        }));
    }
    let mut close_stdin = None;
    if !paths.stdin.is_empty() {
        let (tx, mut close_rx) = oneshot::channel::<()>();
        close_stdin = Some(tx);
        let (agent, id, exec_id, path) = (
            Arc::clone(guest),
            id.to_string(),
            exec_id.to_string(),
            PathBuf::from(&paths.stdin),
        );
        tokio::spawn(async move {
            // Read-write: a FIFO with no writer yet would read as EOF at once. The end of input
            // comes as CloseIO instead (containerd sends it when its client's stdin ends).
            let Ok(mut fifo) = pipe::OpenOptions::new()
                .read_write(true)
                .open_receiver(&path)
            else {
                tracing::warn!(path = %path.display(), "opening the stdin FIFO");
                return;
            };
            let mut buf = vec![0u8; 32 * 1024];
            let mut closing = false;
            loop {
                let read = if closing {
                    // CloseIO came: forward what the client wrote before it, then stop.
                    let quick = std::time::Duration::from_millis(50);
                    match tokio::time::timeout(quick, fifo.read(&mut buf)).await {
                        Ok(r) => r,
                        Err(_) => break,
                    }
                } else {
                    tokio::select! {
                        r = fifo.read(&mut buf) => r,
                        _ = &mut close_rx => {
                            closing = true;
                            continue;
                        }
                    }
                };
                match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if agent
                            .write_stdin(&id, &exec_id, buf[..n].to_vec())
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
            let _ = agent.close_stdin(&id, &exec_id).await;
        });
    }
    Pumps {
        outputs,
        close_stdin,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shimv2::fakes::FakeGuest;
    use crate::test_dir::TestDir;
    use std::io::Read;

    fn read_some(fifo: &mut std::fs::File, want: &[u8]) -> Vec<u8> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while got.len() < want.len() && std::time::Instant::now() < deadline {
            match fifo.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("read: {e}"),
            }
        }
        got
    }

    fn open_reader(path: &std::path::Path) -> std::fs::File {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .expect("open the FIFO as containerd does")
    }

    /// containerd restarting: its reader goes away and a new one comes; what the process wrote
    /// in between is in the FIFO for the new reader, once, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn output_written_while_containerd_is_away_reaches_its_next_reader() {
        let dir = TestDir::new("io-restart");
        let path = dir.path.join("stdout");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        let mut containerd = open_reader(&path);
        let fake = FakeGuest::new();
        let (feed, rx) = mpsc_feed();
        *fake.stdout_feed.lock().await = Some(rx);
        let guest: Arc<dyn Guest> = fake;
        let paths = StdioPaths {
            stdout: path.display().to_string(),
            ..StdioPaths::default()
        };
        let pumps = start(&guest, "c1", "", &paths);
        feed.send(b"before\n".to_vec()).expect("feed");
        assert_eq!(read_some(&mut containerd, b"before\n"), b"before\n");
        drop(containerd);
        for line in [&b"while away 1\n"[..], b"while away 2\n"] {
            feed.send(line.to_vec()).expect("feed");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut restarted = open_reader(&path);
        feed.send(b"after\n".to_vec()).expect("feed");
        let want = b"while away 1\nwhile away 2\nafter\n";
        assert_eq!(read_some(&mut restarted, want), want);
        drop(feed);
        for task in pumps.outputs {
            task.await.expect("the pump ends with its stream");
        }
    }

    fn mpsc_feed() -> (
        tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
        tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    ) {
        tokio::sync::mpsc::unbounded_channel()
    }
}
