//! `pangolin template build|list|rm`: the VM templates pods are restored from, by hand. Pods
//! build their size class's template on first use anyway; `build` does it ahead of time (or
//! again), `rm` makes the next pod build a fresh one.

use std::path::Path;

use anyhow::Context;
use clap::{Args, Subcommand};
use pangolin_shim::template;

/// `pangolin template ...`.
#[derive(Subcommand, Debug)]
pub enum TemplateCommand {
    /// Build the template of a size class now, replacing the one there is.
    Build(SizeArgs),
    /// List the templates with their size class, age, build time and disk use.
    List,
    /// Remove the template of a size class, or all of them.
    Rm(RmArgs),
}

/// A size class (default: the configuration's).
#[derive(Args, Debug)]
pub struct SizeArgs {
    /// vCPUs (1-16).
    #[arg(long)]
    cpus: Option<u8>,
    /// Memory in MiB (64-65536).
    #[arg(long)]
    memory: Option<u32>,
    /// The class of pods with a network interface (every CRI pod): a template with a NIC.
    #[arg(long)]
    nic: bool,
}

/// What to remove.
#[derive(Args, Debug)]
pub struct RmArgs {
    /// The size class's template (default: the configuration's).
    #[command(flatten)]
    size: SizeArgs,
    /// Every template.
    #[arg(long, conflicts_with_all = ["cpus", "memory", "nic"])]
    all: bool,
}

/// Runs one template command; its exit status.
pub async fn template(config_file: Option<&Path>, cmd: TemplateCommand) -> anyhow::Result<u8> {
    let mut config = pangolin_shim::artifacts::load(config_file)?.config;
    let size = match &cmd {
        TemplateCommand::Build(size) | TemplateCommand::Rm(RmArgs { size, .. }) => Some(size),
        TemplateCommand::List => None,
    };
    if let Some(size) = size {
        if let Some(cpus) = size.cpus {
            config.hypervisor.vcpus = cpus;
        }
        if let Some(mem) = size.memory {
            config.hypervisor.memory_mib = mem;
        }
        config.validate().context("--cpus/--memory")?;
    }
    let store = template::store(&config);
    match cmd {
        TemplateCommand::Build(size) => {
            let t = template::get_or_build(&config, size.nic, true)
                .await
                .context("building the template")?;
            println!(
                "{}: built in {} ms at {}",
                t.class,
                t.meta.build_ms,
                t.files.state.parent().unwrap_or(store.dir()).display()
            );
        }
        TemplateCommand::List => {
            let listed = store
                .list()
                .with_context(|| format!("reading {}", store.dir().display()))?;
            println!(
                "{:<16} {:>10} {:>10} {:>9}  KERNEL",
                "CLASS", "AGE", "BUILD", "DISK"
            );
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            for l in listed {
                let disk = format!("{:.1}M", l.disk_bytes as f64 / 1_048_576.0);
                match l.meta {
                    Some(m) => println!(
                        "{:<16} {:>9}s {:>8}ms {:>9}  {}",
                        l.class,
                        now.saturating_sub(m.built_unix_s),
                        m.build_ms,
                        disk,
                        m.fingerprint.kernel_sha256.get(..12).unwrap_or("?")
                    ),
                    None => println!(
                        "{:<16} {:>10} {:>10} {:>9}  (incomplete)",
                        l.class, "-", "-", disk
                    ),
                }
            }
        }
        TemplateCommand::Rm(args) => {
            let classes: Vec<String> = if args.all {
                store
                    .list()
                    .with_context(|| format!("reading {}", store.dir().display()))?
                    .into_iter()
                    .map(|l| l.class)
                    .collect()
            } else {
                vec![template::class(
                    config.hypervisor.vcpus,
                    config.hypervisor.memory_mib,
                    args.size.nic,
                )]
            };
            for class in classes {
                let _lock = store.lock(&class).context("locking the template")?;
                if store
                    .remove(&class)
                    .with_context(|| format!("removing template {class}"))?
                {
                    println!("{class}: removed");
                } else {
                    println!("{class}: no template");
                }
            }
        }
    }
    Ok(0)
}
