//! `pangolin console SANDBOX [-- CMD...]`: a shell (or CMD) in a pod's VM outside every
//! container, through the agent's debug console (vsock port 1027), with a terminal when stdin
//! is one and no CMD is given (or `-t`); and `pangolin list`, the node's sandboxes.

use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use pangolin_protocols::console::{read_frame, write_frame, Kind, Request};
use pangolin_protocols::AGENT_CONSOLE_PORT;
use pangolin_shim::sandbox::info;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::term::{window_size, RawMode};

/// `pangolin console` arguments.
#[derive(clap::Args)]
pub struct ConsoleArgs {
    /// The sandbox (its id, or a unique prefix of it; `pangolin list` shows them).
    sandbox: String,
    /// Run on a terminal even with a command (default: only the interactive shell).
    #[arg(short = 't', long)]
    tty: bool,
    /// What to run (default: the guest's busybox shell).
    #[arg(last = true)]
    command: Vec<String>,
}

/// How long the agent may take to accept the session.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens a console session; the process's exit status.
pub async fn console(config_file: Option<&Path>, args: ConsoleArgs) -> anyhow::Result<i32> {
    let config = pangolin_shim::artifacts::load(config_file)?.config;
    let state_dir = &config.runtime.state_dir;
    let Some((workdir, sandbox)) = info::find(state_dir, &args.sandbox) else {
        bail!(
            "no sandbox {:?} under {} (`pangolin list` shows them)",
            args.sandbox,
            state_dir.display()
        );
    };
    if !sandbox.debug_console {
        bail!(
            "sandbox {}: the debug console is off ([agent] debug_console = false in the \
             configuration it was started with)",
            sandbox.id
        );
    }
    let interactive =
        args.command.is_empty() && nix::unistd::isatty(std::io::stdin().as_fd()).unwrap_or(false);
    let tty = (args.tty || interactive)
        .then(|| window_size(std::io::stdout().as_fd()).unwrap_or((24, 80)));
    let stream = pangolin_shim::vsock::connect(
        &info::vsock_socket(&workdir),
        AGENT_CONSOLE_PORT,
        CONNECT_TIMEOUT,
    )
    .await
    .with_context(|| format!("sandbox {}: connecting to its debug console", sandbox.id))?;
    let (mut from_guest, mut to_guest) = tokio::io::split(stream);
    let request = Request {
        argv: args.command,
        tty,
    };
    write_frame(&mut to_guest, Kind::Request, &request.encode()?).await?;
    let _raw = if tty.is_some() {
        RawMode::enter()
    } else {
        None
    };

    // Input (and, with a terminal, its resizes) to the guest.
    let input = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 16 * 1024];
        let mut winch =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok();
        loop {
            tokio::select! {
                n = stdin.read(&mut buf) => {
                    let n = n.unwrap_or(0);
                    // An empty frame closes the process's stdin.
                    if write_frame(&mut to_guest, Kind::Stdin, &buf[..n]).await.is_err() || n == 0 {
                        break;
                    }
                }
                Some(()) = async { match winch.as_mut() { Some(w) => w.recv().await, None => None } }, if tty.is_some() => {
                    if let Some((rows, cols)) = window_size(std::io::stdout().as_fd()) {
                        let mut size = rows.to_be_bytes().to_vec();
                        size.extend_from_slice(&cols.to_be_bytes());
                        let _ = write_frame(&mut to_guest, Kind::Resize, &size).await;
                    }
                }
            }
        }
        // Keep the connection open (the agent ends the process when the host goes away).
        std::future::pending::<()>().await;
    });
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let status = loop {
        match read_frame(&mut from_guest).await {
            Ok(Some((Kind::Stdout, data))) => {
                stdout.write_all(&data).await?;
                stdout.flush().await?;
            }
            Ok(Some((Kind::Stderr, data))) => {
                stderr.write_all(&data).await?;
                stderr.flush().await?;
            }
            Ok(Some((Kind::Exit, data))) if data.len() == 4 => {
                break i32::from_be_bytes([data[0], data[1], data[2], data[3]]);
            }
            Ok(Some((kind, _))) => bail!("the guest sent a {kind:?} frame"),
            Ok(None) => bail!("the console session ended without an exit status"),
            Err(e) => return Err(e).context("reading the console session"),
        }
    };
    input.abort();
    Ok(status)
}

/// `pangolin list`: a table of the sandboxes under the state directory.
pub fn list(config_file: Option<&Path>) -> anyhow::Result<()> {
    let config = pangolin_shim::artifacts::load(config_file)?.config;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    println!(
        "{:<20} {:<32} {:<8} {:>5} {:>8} {:>9} {:>10} CONSOLE",
        "SANDBOX", "POD", "BACKEND", "VCPUS", "MEMORY", "UPTIME", "CONTAINERS"
    );
    for (_, s, pod) in info::list(&config.runtime.state_dir) {
        let id: String = s.id.chars().take(20).collect();
        let uptime = now.saturating_sub(s.ready_unix_ms) / 1000;
        println!(
            "{:<20} {:<32} {:<8} {:>5} {:>6}Mi {:>8}s {:>10} {}",
            id,
            pod.pod.as_deref().unwrap_or("-"),
            s.hypervisor,
            s.vcpus,
            s.memory_mib,
            uptime,
            pod.containers.len(),
            if s.debug_console { "on" } else { "off" },
        );
    }
    Ok(())
}
