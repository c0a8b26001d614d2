//! `pangolin run`: one container in one fresh microVM, wired to this process's stdio.

use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use pangolin_protocols::GUEST_SHARED_DIR;
use pangolin_runtime_config::HypervisorKind;
use pangolin_shim::agent::AgentClient;
use pangolin_shim::sandbox::Sandbox;
use pangolin_shim::spec::{container_spec, RunSpec};
use tokio::io::AsyncReadExt;
use tokio::signal::unix::{signal, SignalKind};

use crate::term::{window_size, RawMode};

/// Exit status when the command does not exist in the container.
const EXIT_NOT_FOUND: u8 = 127;

/// The container's id inside its VM.
const CONTAINER_ID: &str = "main";

/// Options of `pangolin run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// auto, qemu or builtin (default: from the configuration).
    #[arg(long)]
    hypervisor: Option<HypervisorKind>,
    /// vCPUs of the VM (1-16).
    #[arg(long)]
    cpus: Option<u8>,
    /// Memory of the VM in MiB (64-65536).
    #[arg(long)]
    memory: Option<u32>,
    /// Allocate a terminal for the container.
    #[arg(short = 't', long)]
    tty: bool,
    /// Keep stdin open and pass it to the container.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Directory to use as the container's root filesystem.
    #[arg(long)]
    rootfs: PathBuf,
    /// cgroup memory limit of the container in MiB.
    #[arg(long)]
    memory_limit: Option<u32>,
    /// Extra environment variable (KEY=VALUE), repeatable.
    #[arg(short = 'e', long = "env")]
    env: Vec<String>,
    /// Working directory in the container.
    #[arg(short = 'w', long)]
    workdir: Option<String>,
    /// Mount the root filesystem read-only.
    #[arg(long)]
    read_only: bool,
    /// Keep the guest's serial console output in this file.
    #[arg(long)]
    console_log: Option<PathBuf>,
    /// Print a timing breakdown (JSON) to stderr at the end.
    #[arg(long)]
    timings: bool,
    /// Boot the VM's kernel even where a VM template fits (`template.enabled = false`).
    #[arg(long)]
    no_template: bool,
    /// Command and arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

fn check_args(args: &RunArgs) -> anyhow::Result<()> {
    if !args.rootfs.is_dir() {
        bail!("--rootfs {}: not a directory", args.rootfs.display());
    }
    if args.command.is_empty() {
        bail!("no command given (pangolin run --rootfs DIR -- CMD...)");
    }
    Ok(())
}

/// Runs the container; returns its shell-style exit status.
pub async fn run(config_file: Option<&Path>, args: RunArgs) -> anyhow::Result<u8> {
    let total = Instant::now();
    check_args(&args)?;
    let mut config = pangolin_shim::artifacts::load(config_file)?.config;
    if let Some(kind) = args.hypervisor {
        config.hypervisor.kind = kind;
    }
    if let Some(cpus) = args.cpus {
        config.hypervisor.vcpus = cpus;
    }
    if let Some(mem) = args.memory {
        config.hypervisor.memory_mib = mem;
    }
    if args.no_template {
        config.template.enabled = false;
    }
    // The configuration's own limits apply to the overrides (--cpus: hypervisor.vcpus, ...).
    config.validate().context("--hypervisor/--cpus/--memory")?;
    let spec = container_spec(&RunSpec {
        args: args.command.clone(),
        terminal: args.tty,
        env: args.env.clone(),
        cwd: args.workdir.clone(),
        hostname: None,
        memory_limit_mib: args.memory_limit,
        readonly: args.read_only,
    })?;
    let spec_json = serde_json::to_string(&spec).context("encoding the OCI spec")?;
    let rootfs = std::fs::canonicalize(&args.rootfs)
        .with_context(|| format!("--rootfs {}", args.rootfs.display()))?;

    let id = format!(
        "run-{}-{}",
        std::process::id(),
        total.elapsed().subsec_nanos()
    );
    // From here a termination signal must not kill us before the teardown: during the boot it
    // cancels it, before the container runs it is kept and delivered once the container starts.
    let early = EarlySignals::watch()?;
    let mut sandbox = Sandbox::start_with(
        &id,
        &config,
        pangolin_shim::sandbox::BootOptions {
            share: Some(&rootfs),
            console_log: args.console_log.as_deref(),
            netns: None,
            cgroup: None,
            cancel: Some(early.cancel.clone()),
            netns_holder: false,
        },
    )
    .await?;
    if let Some(sig) = early.pending() {
        sandbox.shutdown().await;
        return Ok(u8::try_from(128 + sig).unwrap_or(u8::MAX));
    }
    let booted = Instant::now();
    let agent = sandbox.agent().clone();
    // Guest clock: kernel start to the agent serving.
    // (A template's clone reports the template's: its guest booted once, before the snapshot.)
    let guest_ready_ms = sandbox.details.agent_ready_boottime_ns as f64 / 1e6;
    let started_from = sandbox.started_from;
    let result = tokio::select! {
        r = run_in(agent, &args, spec_json, early) => r,
        err = sandbox.vmm_exited() => Err(anyhow::Error::new(err).context("the microVM died")),
    };
    let teardown = Instant::now();
    sandbox.shutdown().await;
    let done = Instant::now();
    let (status, created) = match result {
        Ok(r) => r,
        Err(err) => {
            let not_found = err
                .downcast_ref::<pangolin_shim::agent::AgentError>()
                .and_then(pangolin_shim::agent::AgentError::code)
                == Some(ttrpc::Code::NOT_FOUND);
            if not_found {
                // As docker run: 127 when the command cannot be found.
                eprintln!("pangolin: {err:#}");
                return Ok(EXIT_NOT_FOUND);
            }
            return Err(err);
        }
    };
    if args.timings {
        eprintln!(
            "pangolin-timings: {{\"started_from\":\"{started_from}\",\"boot_ms\":{:.1},\"guest_agent_ready_ms\":{:.1},\"create_start_ms\":{:.1},\"teardown_ms\":{:.1},\"total_ms\":{:.1}}}",
            ms(total, booted),
            guest_ready_ms,
            ms(booted, created),
            ms(teardown, done),
            ms(total, done)
        );
    }
    Ok(u8::try_from(status).unwrap_or(u8::MAX))
}

fn ms(a: Instant, b: Instant) -> f64 {
    b.duration_since(a).as_secs_f64() * 1000.0
}

/// Creates, starts and waits for the container; returns (exit status, instant started).
async fn run_in(
    agent: AgentClient,
    args: &RunArgs,
    spec_json: String,
    early: EarlySignals,
) -> anyhow::Result<(i32, Instant)> {
    agent
        .create_container(CONTAINER_ID, spec_json, GUEST_SHARED_DIR, args.interactive)
        .await
        .context("creating the container")?;
    let raw = if args.tty { RawMode::enter() } else { None };
    if args.tty {
        let (rows, cols) = window_size(std::io::stdout().as_fd()).unwrap_or((24, 80));
        agent
            .resize(CONTAINER_ID, "", rows, cols)
            .await
            .context("sizing the terminal")?;
    }
    let stdout = tokio::spawn(pump_output(agent.clone(), false));
    let stderr = (!args.tty).then(|| tokio::spawn(pump_output(agent.clone(), true)));
    agent
        .start_container(CONTAINER_ID)
        .await
        .context("starting the container")?;
    let started = Instant::now();
    if args.interactive {
        tokio::spawn(pump_stdin(agent.clone()));
    }
    let oom = Arc::new(AtomicBool::new(false));
    let oom_task = tokio::spawn(watch_oom(agent.clone(), oom.clone()));
    let signals = tokio::spawn(forward_signals(agent.clone(), args.tty));
    // A signal that came before the start is the container's now.
    if let Some(sig) = early.stop() {
        let _ = agent
            .signal(CONTAINER_ID, "", sig.unsigned_abs(), false)
            .await;
    }

    let status = agent
        .wait(CONTAINER_ID, "")
        .await
        .context("waiting for the container")?;
    // Output ends when the last writer closes; a leftover background process can keep it open.
    let drain = async {
        let _ = stdout.await;
        if let Some(e) = stderr {
            let _ = e.await;
        }
    };
    if tokio::time::timeout(std::time::Duration::from_secs(5), drain)
        .await
        .is_err()
    {
        tracing::warn!("container output still open 5 s after exit; cutting it");
    }
    signals.abort();
    oom_task.abort();
    drop(raw);
    if oom.load(Ordering::SeqCst) {
        eprintln!("pangolin: container was OOM-killed (cgroup memory limit reached)");
    }
    Ok((status.exit_status, started))
}

async fn pump_output(agent: AgentClient, stderr: bool) {
    loop {
        match agent.read_output(CONTAINER_ID, "", stderr).await {
            Ok(Some(data)) => {
                let written = if stderr {
                    std::io::stderr()
                        .write_all(&data)
                        .and_then(|()| std::io::stderr().flush())
                } else {
                    std::io::stdout()
                        .write_all(&data)
                        .and_then(|()| std::io::stdout().flush())
                };
                if written.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(err) => {
                tracing::warn!(%err, stderr, "reading container output failed");
                return;
            }
        }
    }
}

async fn pump_stdin(agent: AgentClient) {
    let mut stdin = tokio::io::stdin();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match stdin.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if agent
                    .write_stdin(CONTAINER_ID, "", buf[..n].to_vec())
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
    let _ = agent.close_stdin(CONTAINER_ID, "").await;
}

async fn watch_oom(agent: AgentClient, flag: Arc<AtomicBool>) {
    while let Ok(id) = agent.next_oom().await {
        if id == CONTAINER_ID {
            flag.store(true, Ordering::SeqCst);
        }
    }
}

/// SIGINT/SIGTERM/SIGHUP before the container runs: the first cancels the boot and is kept.
struct EarlySignals {
    cancel: tokio_util::sync::CancellationToken,
    pending: Arc<std::sync::atomic::AtomicI32>,
    task: tokio::task::JoinHandle<()>,
}

impl EarlySignals {
    fn watch() -> anyhow::Result<EarlySignals> {
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut hup = signal(SignalKind::hangup())?;
        let cancel = tokio_util::sync::CancellationToken::new();
        let pending = Arc::new(std::sync::atomic::AtomicI32::new(0));
        let (c, p) = (cancel.clone(), pending.clone());
        let task = tokio::spawn(async move {
            let sig = tokio::select! {
                _ = int.recv() => libc::SIGINT,
                _ = term.recv() => libc::SIGTERM,
                _ = hup.recv() => libc::SIGHUP,
            };
            p.store(sig, Ordering::SeqCst);
            c.cancel();
        });
        Ok(EarlySignals {
            cancel,
            pending,
            task,
        })
    }

    /// The signal that came, if one did.
    fn pending(&self) -> Option<i32> {
        Some(self.pending.load(Ordering::SeqCst)).filter(|&s| s != 0)
    }

    /// Stops watching (the container's forwarder has taken over); the signal that came.
    fn stop(self) -> Option<i32> {
        self.task.abort();
        self.pending()
    }
}

/// Forwards SIGINT/SIGTERM/SIGHUP to the container, and SIGWINCH as terminal resizes.
async fn forward_signals(agent: AgentClient, tty: bool) -> anyhow::Result<()> {
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut winch = signal(SignalKind::window_change())?;
    loop {
        let sig = tokio::select! {
            _ = int.recv() => libc::SIGINT,
            _ = term.recv() => libc::SIGTERM,
            _ = hup.recv() => libc::SIGHUP,
            _ = winch.recv() => {
                if tty {
                    if let Some((rows, cols)) = window_size(std::io::stdout().as_fd()) {
                        let _ = agent.resize(CONTAINER_ID, "", rows, cols).await;
                    }
                }
                continue;
            }
        };
        let _ = agent
            .signal(CONTAINER_ID, "", sig.unsigned_abs(), false)
            .await;
    }
}
