//! `pangolin`: run a command as a container in a fresh microVM, or check what this host offers.

mod check;
mod console;
mod monitor;
mod run;
mod template;
mod term;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit status for failures of pangolin itself (as `docker run` uses 125).
const EXIT_RUNTIME_ERROR: u8 = 125;

#[derive(Parser)]
#[command(name = "pangolin", version, about = "Containers in microVMs")]
struct Cli {
    /// Configuration file (default: $PANGOLIN_CONFIG, /etc/pangolin/configuration.toml, built-in).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Report what this host offers and which backend `auto` picks; exit 0 if Pangolin can run.
    Check,
    /// Boot a microVM, run CMD as a container on --rootfs, and exit with its status.
    Run(run::RunArgs),
    /// Manage the VM templates pods are restored from (built-in VMM).
    #[command(subcommand)]
    Template(template::TemplateCommand),
    /// A shell (or CMD) in a pod's VM outside every container ([agent] debug_console).
    Console(console::ConsoleArgs),
    /// The sandboxes on this node: id, pod, backend, vCPUs, memory, uptime, containers.
    List,
    /// Serve Prometheus metrics of this node's sandboxes on /metrics.
    Monitor(monitor::MonitorArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,ttrpc=error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("pangolin: cannot start the async runtime: {err}");
            return ExitCode::from(EXIT_RUNTIME_ERROR);
        }
    };
    let result = match cli.command {
        Command::Check => runtime.block_on(check::check(cli.config.as_deref())),
        Command::Run(args) => runtime.block_on(run::run(cli.config.as_deref(), args)),
        Command::Template(cmd) => runtime.block_on(template::template(cli.config.as_deref(), cmd)),
        Command::Console(args) => runtime
            .block_on(console::console(cli.config.as_deref(), args))
            // The process's status, as a shell reports it (128 + signal for a signal).
            .map(|status| u8::try_from(status).unwrap_or(u8::MAX)),
        Command::List => console::list(cli.config.as_deref()).map(|()| 0),
        Command::Monitor(args) => runtime.block_on(monitor::monitor(cli.config.as_deref(), args)),
    };
    // A read of stdin may still be blocked in the runtime's blocking pool (the console's
    // input): it is not waited for.
    runtime.shutdown_background();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("pangolin: {err:#}");
            ExitCode::from(EXIT_RUNTIME_ERROR)
        }
    }
}
