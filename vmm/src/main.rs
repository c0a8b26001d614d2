//! `pangolin-vmm --config FILE`: boots the VM a JSON [`VmConfig`] describes (or restores it from
//! the snapshot the config names) and runs it until the guest powers off (exit 0), the VMM fails
//! (1), the config is bad (2), a `stop` request arrives (3), SIGTERM/SIGINT (4), or a template
//! VMM has written its snapshot (5).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use pangolin_vmm::builder;
use pangolin_vmm::config::VmConfig;
use pangolin_vmm::jail;
use pangolin_vmm::resources::Resources;

/// Pangolin's built-in VMM: one KVM microVM per process.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The VM configuration, a JSON file.
    #[arg(long, value_name = "FILE", required_unless_present = "config_json")]
    config: Option<PathBuf>,
    /// The VM configuration as a JSON string.
    #[arg(long, value_name = "JSON", conflicts_with = "config")]
    config_json: Option<String>,
}

/// Closes every descriptor above stdio the VMM inherited: it keeps only what the host sends on
/// stdin ([`Resources`]), so nothing else of its parent's leaks into it.
fn close_inherited() {
    // SAFETY: close_range(2) only closes descriptors; no Rust object owns any of them yet
    // (main has not opened anything).
    let rc = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if rc != 0 {
        eprintln!(
            "pangolin-vmm: close_range: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn main() -> ExitCode {
    close_inherited();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    // clap exits with status 2 on bad arguments, the "bad configuration" status.
    let args = Args::parse();
    let json = match (args.config, args.config_json) {
        (_, Some(json)) => json,
        (Some(path), None) => match std::fs::read_to_string(&path) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("pangolin-vmm: reading {}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
        (None, None) => return ExitCode::from(2),
    };
    let config: VmConfig = match serde_json::from_str(&json) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pangolin-vmm: config: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = config.validate() {
        eprintln!("pangolin-vmm: config: {e}");
        return ExitCode::from(2);
    }
    // Everything the VMM needs on the host, opened (or adopted from the host side) before the
    // jail closes the host's filesystem off.
    let resources = match Resources::of(&config) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pangolin-vmm: {}", chain(&e));
            return ExitCode::from(1);
        }
    };
    match &config.jail {
        Some(j) => {
            if let Err(e) = jail::enter(j) {
                eprintln!("pangolin-vmm: {}", chain(&e));
                return ExitCode::from(1);
            }
        }
        None => tracing::warn!("not jailed: the VMM keeps the privileges it was started with"),
    }
    let vmm = match builder::build(&config, resources) {
        Ok(v) => v,
        Err(builder::BuildError::Config(e)) => {
            eprintln!("pangolin-vmm: config: {e}");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("pangolin-vmm: {}", chain(&e));
            return ExitCode::from(1);
        }
    };
    let code = vmm.run().code();
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// An error with every source appended.
fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    msg
}
