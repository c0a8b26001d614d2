//! The debug console (`pangolin console`): a vsock listener on [`AGENT_CONSOLE_PORT`] that runs
//! a shell or a command in the guest, outside every container (the agent's own namespaces, as
//! root), with or without a terminal, and relays its streams in the frames of
//! `pangolin_protocols::console`.
//!
//! Off unless the host asks for it in GetGuestDetails (`[agent] debug_console`, off by
//! default): then the host has put a static busybox in the share and names it. Its applets are
//! linked into a directory of their own at the front of the session's PATH. At most
//! [`MAX_SESSIONS`] at once; a session ends with its process's exit status.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use pangolin_protocols::console::{read_frame, write_frame, Kind, Request};
use pangolin_protocols::AGENT_CONSOLE_PORT;
use tokio::sync::mpsc;
use tokio_vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY};

use crate::reaper::Reaper;
use crate::stdio::{pipes, pty_host, HostStdio, Output, Pty};

/// Console sessions open at once.
const MAX_SESSIONS: usize = 4;

/// How long the host may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Where busybox's applets are linked for console sessions.
const APPLETS: &str = "/run/pangolin/debug-bin";

/// Listening already: a repeated GetGuestDetails does not bind twice.
static LISTENING: OnceLock<()> = OnceLock::new();

/// Starts the console with `busybox` (a guest path) as its shell; once per boot.
///
/// # Errors
/// `busybox` is missing, or the listener could not be bound.
pub fn enable(busybox: &str, reaper: Reaper) -> std::io::Result<()> {
    if LISTENING.get().is_some() {
        return Ok(());
    }
    let busybox = PathBuf::from(busybox);
    if !busybox.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("debug console shell {}", busybox.display()),
        ));
    }
    link_applets(&busybox)?;
    let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, AGENT_CONSOLE_PORT))?;
    let _ = LISTENING.set(());
    tracing::warn!(port = AGENT_CONSOLE_PORT, "debug console enabled");
    let busybox = Arc::new(busybox);
    crate::vsock_server::spawn(listener, MAX_SESSIONS, "debug console", move |stream| {
        let (busybox, reaper) = (Arc::clone(&busybox), reaper.clone());
        async move { session(stream, &busybox, &reaper).await }
    });
    Ok(())
}

/// Links every applet of `busybox` into [`APPLETS`].
fn link_applets(busybox: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(APPLETS)?;
    let out = std::process::Command::new(busybox).arg("--list").output()?;
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet.contains('/') {
            continue;
        }
        let link = Path::new(APPLETS).join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink(busybox, link)?;
        }
    }
    Ok(())
}

/// One session: the request, the process, its streams, its exit.
async fn session(stream: VsockStream, busybox: &Path, reaper: &Reaper) -> std::io::Result<()> {
    let (mut from_host, mut to_host) = tokio::io::split(stream);
    let first = tokio::time::timeout(REQUEST_TIMEOUT, read_frame(&mut from_host)).await??;
    let Some((Kind::Request, payload)) = first else {
        return Err(std::io::Error::other(
            "the session did not start with a request",
        ));
    };
    let request = Request::decode(&payload)?;
    let argv = if request.argv.is_empty() {
        vec!["sh".to_string()]
    } else {
        request.argv.clone()
    };
    tracing::warn!(?argv, tty = request.tty.is_some(), "debug console session");
    let (pid, mut host, pty) = spawn(&argv, request.tty, busybox)?;

    // Output: every stream to the host, in frames, until each ends.
    let (out_tx, mut out_rx) = mpsc::channel::<(Kind, Vec<u8>)>(16);
    let mut pumps = Vec::new();
    for (kind, output) in [
        (Kind::Stdout, host.stdout.take()),
        (Kind::Stderr, host.stderr.take()),
    ] {
        if let Some(output) = output {
            pumps.push(tokio::spawn(pump(kind, output, out_tx.clone())));
        }
    }
    drop(out_tx);
    // Input and resizes from the host, until it closes its side.
    let mut stdin = host.stdin.take();
    let input = async {
        while let Ok(Some((kind, data))) = read_frame(&mut from_host).await {
            match (kind, &pty) {
                (Kind::Stdin, _) if data.is_empty() => stdin = None,
                (Kind::Stdin, _) => {
                    if let Some(s) = stdin.as_mut() {
                        if s.write(&data).await.is_err() {
                            stdin = None;
                        }
                    }
                }
                (Kind::Resize, Some(pty)) if data.len() == 4 => {
                    let rows = u16::from_be_bytes([data[0], data[1]]);
                    let cols = u16::from_be_bytes([data[2], data[3]]);
                    let _ = pty.resize(rows, cols);
                }
                // Anything else from the host is ignored.
                _ => {}
            }
        }
        // The host is gone: so is the session's process.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        std::future::pending::<()>().await;
    };
    let output = async {
        while let Some((kind, data)) = out_rx.recv().await {
            write_frame(&mut to_host, kind, &data).await?;
        }
        std::io::Result::Ok(())
    };
    tokio::select! {
        () = input => {}
        sent = output => sent?,
    }
    let status = reaper.wait(pid).await.status.shell_status();
    write_frame(&mut to_host, Kind::Exit, &status.to_be_bytes()).await
}

/// Reads `output` to its end, in frames of `kind`.
async fn pump(kind: Kind, mut output: Output, tx: mpsc::Sender<(Kind, Vec<u8>)>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match output.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send((kind, buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Spawns `argv` (busybox applets first on PATH) with pipes, or on a new terminal of `tty`'s
/// size as its controlling terminal; its pid, the agent's ends, and the terminal.
fn spawn(
    argv: &[String],
    tty: Option<(u16, u16)>,
    busybox: &Path,
) -> std::io::Result<(i32, HostStdio, Option<Arc<Pty>>)> {
    let program = if argv[0].contains('/') {
        PathBuf::from(&argv[0])
    } else {
        // An applet by name, or a guest program on the usual PATH.
        let applet = Path::new(APPLETS).join(&argv[0]);
        if applet.exists() {
            busybox.to_path_buf()
        } else {
            PathBuf::from(&argv[0])
        }
    };
    let mut cmd = std::process::Command::new(&program);
    cmd.arg0(&argv[0])
        .args(&argv[1..])
        .env_clear()
        .env("PATH", format!("{APPLETS}:/usr/sbin:/usr/bin:/sbin:/bin"))
        .env("HOME", "/")
        .env("TERM", "xterm")
        .current_dir("/");
    let (host, pty) = match tty {
        Some((rows, cols)) => {
            let pair = nix::pty::openpty(None, None)?;
            // The session's process gets the slave only.
            nix::fcntl::fcntl(
                &pair.master,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            )?;
            let slave = pair.slave;
            cmd.stdin(Stdio::from(slave.try_clone()?))
                .stdout(Stdio::from(slave.try_clone()?))
                .stderr(Stdio::from(slave));
            // SAFETY: between fork and exec only setsid(2) and ioctl(2) run, both
            // async-signal-safe, on the child's own fd 0 (the terminal's slave).
            unsafe {
                cmd.pre_exec(|| {
                    nix::unistd::setsid()?;
                    if libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let pty = Arc::new(Pty::new(pair.master)?);
            pty.resize(rows.max(1), cols.max(1))?;
            (pty_host(Arc::clone(&pty), true), Some(pty))
        }
        None => {
            let (child, host) = pipes(true)?;
            cmd.stdin(Stdio::from(child.stdin))
                .stdout(Stdio::from(child.stdout))
                .stderr(Stdio::from(child.stderr));
            (host, None)
        }
    };
    // Its exit comes from the reaper (PID 1 reaps every child): the Child is not waited on.
    let child = cmd.spawn()?;
    let pid = i32::try_from(child.id()).map_err(|_| std::io::Error::other("pid out of range"))?;
    drop(cmd);
    Ok((pid, host, pty))
}
