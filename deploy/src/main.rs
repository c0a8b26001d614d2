//! `pangolin-deploy install|uninstall`: Pangolin on a node, with or without Kubernetes.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use pangolin_deploy::install::{self, Options};
use pangolin_deploy::node::Restart;

#[derive(Parser)]
#[command(
    name = "pangolin-deploy",
    version,
    about = "Install Pangolin on a node, or remove it"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Put the binaries and guest artifacts on the node, add the runtime handler to
    /// containerd's configuration, restart containerd, label the node.
    Install(Args),
    /// Undo what `install` did (restoring what was there before), restart containerd.
    Uninstall(Args),
}

#[derive(Clone, Copy, ValueEnum)]
enum RestartArg {
    /// Leave containerd running (restart it yourself).
    None,
    /// `systemctl restart containerd` on the node.
    Systemd,
}

#[derive(clap::Args)]
struct Args {
    /// The node's root as this process sees it (the DaemonSet mounts it at /host).
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// The payload (bin/, libexec/, share/, etc/); default: the directory above this binary's.
    #[arg(long)]
    from: Option<PathBuf>,
    /// containerd's main configuration file (default: <root>/etc/containerd/config.toml).
    #[arg(long)]
    containerd_config: Option<PathBuf>,
    /// containerd's version, when its configuration file does not say its format
    /// (default: the node's `containerd --version`).
    #[arg(long)]
    containerd_version: Option<String>,
    /// The CRI runtime handler name (the RuntimeClass's handler).
    #[arg(long, default_value = "pangolin")]
    handler: String,
    /// How to restart containerd afterwards.
    #[arg(long, value_enum, default_value = "systemd")]
    restart: RestartArg,
    /// Label this Kubernetes node pangolin.io/runtime=true (kubectl; in-cluster credentials).
    #[arg(long)]
    label_node: Option<String>,
    /// Afterwards, wait for SIGTERM (a DaemonSet's pod stays Running).
    #[arg(long)]
    stay: bool,
}

/// Blocks until SIGTERM or SIGINT.
fn wait_for_termination() -> anyhow::Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block().context("blocking SIGTERM")?;
    let signal = set.wait().context("waiting for SIGTERM")?;
    tracing::info!(?signal, "stopping");
    Ok(())
}

fn options(a: &Args) -> anyhow::Result<Options> {
    let from = match a.from.clone() {
        Some(f) => f,
        None => std::env::current_exe()
            .context("this binary's path")?
            .parent()
            .and_then(std::path::Path::parent)
            .context("the payload directory above this binary")?
            .to_path_buf(),
    };
    let containerd_config = a
        .containerd_config
        .clone()
        .unwrap_or_else(|| a.root.join("etc/containerd/config.toml"));
    Ok(Options {
        root: a.root.clone(),
        from,
        containerd_config,
        containerd_version: a.containerd_version.clone(),
        handler: a.handler.clone(),
        restart: match a.restart {
            RestartArg::None => Restart::None,
            RestartArg::Systemd => Restart::Systemd,
        },
        label_node: a.label_node.clone(),
    })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let command = Cli::parse().command;
    let result = match &command {
        Command::Install(a) => options(a).and_then(|o| {
            let state = install::install(&o)?;
            for f in &state.files {
                println!("installed {}", o.root.join(&f.path).display());
            }
            if let Some(c) = &state.containerd {
                let how = match (&c.drop_in, c.handler_added) {
                    (Some(d), _) => format!("drop-in {}", d.display()),
                    (None, true) => format!("added to {}", c.config.display()),
                    (None, false) => format!("already in {} (kept)", c.config.display()),
                };
                println!("runtime handler {:?}: {how}", c.handler);
            }
            Ok(())
        }),
        Command::Uninstall(a) => options(a).and_then(|o| {
            match install::uninstall(&o)? {
                Some(state) => println!(
                    "removed {} files and the runtime handler; {} restored",
                    state.files.len(),
                    state.files.iter().filter(|f| f.backup.is_some()).count()
                ),
                None => println!("nothing installed under {}", o.root.display()),
            }
            Ok(())
        }),
    };
    let stay = match &command {
        Command::Install(a) | Command::Uninstall(a) => a.stay,
    };
    let result = result.and_then(|()| if stay { wait_for_termination() } else { Ok(()) });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pangolin-deploy: {e:#}");
            ExitCode::FAILURE
        }
    }
}
