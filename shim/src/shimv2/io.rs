//! containerd's stdio FIFOs ↔ the agent's process streams.
//!
//! Output: a task per stream reads the agent's stdout/stderr until EOF and writes the FIFO.
//! Input: a task reads the stdin FIFO and forwards to the agent, closing the process's stdin at
//! EOF. The exit waiter joins the output tasks before reporting the exit, so containerd sees all
//! output before TaskExit (the agent ends a stream once its exited process's buffered output is
//! read, so the join is prompt).

use std::path::PathBuf;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use std::sync::Arc;

use super::guest::Guest;

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
            let mut fifo = match pipe::OpenOptions::new().open_sender(&path) {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "opening an output FIFO");
                    None
                }
            };
            loop {
                match agent.read_output(&id, &exec_id, stderr).await {
                    Ok(Some(data)) => {
                        if let Some(f) = fifo.as_mut() {
                            if f.write_all(&data).await.is_err() {
                                fifo = None; // reader gone: keep draining the guest side
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
