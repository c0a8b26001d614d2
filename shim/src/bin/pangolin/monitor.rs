//! `pangolin monitor [--listen ADDR]`: Prometheus metrics of this node's sandboxes.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;

/// `pangolin monitor` arguments.
#[derive(clap::Args)]
pub struct MonitorArgs {
    /// Where to serve `/metrics`.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
}

/// Serves until killed.
pub async fn monitor(config_file: Option<&Path>, args: MonitorArgs) -> anyhow::Result<u8> {
    let config = pangolin_shim::artifacts::load(config_file)?.config;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}", args.listen))?;
    eprintln!(
        "pangolin monitor: http://{}/metrics for the sandboxes under {}",
        listener.local_addr()?,
        config.runtime.state_dir.display()
    );
    pangolin_shim::monitor::serve::serve(listener, config.runtime.state_dir.clone()).await?;
    Ok(0)
}
