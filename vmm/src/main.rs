//! `pangolin-vmm --config FILE`: boots the VM a JSON [`VmConfig`] describes and runs it until the
//! guest powers off (exit 0), the VMM fails (1), the config is bad (2), a `stop` request arrives
//! (3), or SIGTERM/SIGINT (4).

use std::process::ExitCode;

use pangolin_vmm::builder;
use pangolin_vmm::config::VmConfig;

fn usage() -> ExitCode {
    eprintln!("usage: pangolin-vmm --config FILE | --config-json JSON");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = match args.as_slice() {
        [flag, path] if flag == "--config" => match std::fs::read_to_string(path) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("pangolin-vmm: reading {path}: {e}");
                return ExitCode::from(2);
            }
        },
        [flag, json] if flag == "--config-json" => json.clone(),
        _ => return usage(),
    };
    let config: VmConfig = match serde_json::from_str(&json) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pangolin-vmm: config: {e}");
            return ExitCode::from(2);
        }
    };
    let vmm = match builder::build(&config) {
        Ok(v) => v,
        Err(builder::BuildError::Config(e)) => {
            eprintln!("pangolin-vmm: config: {e}");
            return ExitCode::from(2);
        }
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            eprintln!("pangolin-vmm: {msg}");
            return ExitCode::from(1);
        }
    };
    let code = vmm.run().code();
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
