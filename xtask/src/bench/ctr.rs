//! `ctr run --rm busybox true` through private containerds, one run per kind per round,
//! alternating. `cargo xtask bench` runs it here (QEMU/TCG) and, through the hidden
//! `cargo xtask bench-ctr`, inside the nested test host, whose output it parses.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};

use crate::containerd::{Options, PrivateContainerd, BUSYBOX_IMAGE, PANGOLIN_RUNTIME};

/// What a run starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The pangolin runtime with the configuration it finds (templates on where they fit).
    Pangolin,
    /// The pangolin runtime with `template.enabled = false`: every pod boots its kernel.
    PangolinCold,
    /// io.containerd.runc.v2.
    Runc,
}

impl Kind {
    /// The label in the output and the report.
    pub fn label(self, templates: bool) -> &'static str {
        match (self, templates) {
            (Kind::Pangolin, true) => "pangolin-template",
            (Kind::Pangolin, false) => "pangolin",
            (Kind::PangolinCold, _) => "pangolin-cold",
            (Kind::Runc, _) => "runc",
        }
    }

    fn runtime(self) -> &'static str {
        match self {
            Kind::Pangolin | Kind::PangolinCold => PANGOLIN_RUNTIME,
            Kind::Runc => "io.containerd.runc.v2",
        }
    }
}

/// The samples of one kind and, for pangolin, how many of its pods started from a template
/// (counted in containerd's log, where the shim's "sandbox ready" lines land).
#[derive(Debug, Default)]
pub struct Samples {
    pub ms: Vec<f64>,
    pub from_template: usize,
}

/// A configuration file that turns templates off, with the artifacts of this checkout.
fn cold_config(dir: &Path, shim_dir: &Path) -> anyhow::Result<PathBuf> {
    let guest = crate::guest::root().join("target/guest");
    let file = dir.join("pangolin-cold.toml");
    std::fs::write(
        &file,
        format!(
            "[hypervisor]\nkernel = \"{}\"\ninitramfs = \"{}\"\nvmm_path = \"{}\"\n\n[template]\nenabled = false\n",
            guest.join("vmlinux").display(),
            guest.join("initramfs.cpio").display(),
            shim_dir.join("pangolin-vmm").display()
        ),
    )?;
    Ok(file)
}

/// `runs` rounds of one `ctr run --rm` per kind. The pangolin kinds' first pod may build a
/// template: `pangolin template build` runs first where templates are on.
pub fn rounds(
    runs: usize,
    shim_dir: &Path,
    rootfs: &Path,
    kinds: &[Kind],
    templates: bool,
) -> anyhow::Result<Vec<(Kind, Samples)>> {
    let base = std::env::temp_dir().join(format!("pangolin-bench-ctr-{}", std::process::id()));
    let main = PrivateContainerd::start(&base.join("main"), shim_dir)?;
    main.import_busybox(rootfs, BUSYBOX_IMAGE)?;
    let cold = if kinds.contains(&Kind::PangolinCold) {
        let config = cold_config(&base, shim_dir)?;
        let options = Options {
            env: vec![("PANGOLIN_CONFIG".into(), config.display().to_string())],
            ..Options::default()
        };
        let c = PrivateContainerd::start_with(&base.join("cold"), shim_dir, &options)?;
        c.import_busybox(rootfs, BUSYBOX_IMAGE)?;
        Some(c)
    } else {
        None
    };
    if templates && kinds.contains(&Kind::Pangolin) {
        let status = std::process::Command::new(shim_dir.join("pangolin"))
            .args(["template", "build"])
            .status()
            .context("pangolin template build")?;
        if !status.success() {
            bail!("pangolin template build failed ({status})");
        }
    }
    let mut out: Vec<(Kind, Samples)> = kinds.iter().map(|k| (*k, Samples::default())).collect();
    for round in 0..runs {
        for (kind, samples) in &mut out {
            let ctrd = match kind {
                Kind::PangolinCold => cold.as_ref().context("cold containerd")?,
                _ => &main,
            };
            let id = format!("bench-{round}-{}", kind.label(templates));
            let t = Instant::now();
            let status = ctrd
                .ctr([
                    "run",
                    "--rm",
                    "--runtime",
                    kind.runtime(),
                    BUSYBOX_IMAGE,
                    &id,
                    "true",
                ])
                .status()
                .context("ctr run")?;
            if !status.success() {
                bail!(
                    "ctr run --runtime {} failed ({status}); log: {}",
                    kind.runtime(),
                    ctrd.log_tail(20)
                );
            }
            samples.ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let from_template = |c: &PrivateContainerd| {
        std::fs::read_to_string(&c.log)
            .unwrap_or_default()
            .matches("started_from=template")
            .count()
    };
    for (kind, samples) in &mut out {
        samples.from_template = match kind {
            Kind::Pangolin => from_template(&main),
            Kind::PangolinCold => cold.as_ref().map_or(0, from_template),
            Kind::Runc => 0,
        };
    }
    main.stop()?;
    if let Some(c) = cold {
        c.stop()?;
    }
    let _ = std::fs::remove_dir_all(&base);
    Ok(out)
}

/// The line [`command`] prints per sample, parsed back by [`parse`].
const SAMPLE: &str = "bench-ctr";

/// `cargo xtask bench-ctr --runs N --shim-dir DIR --rootfs DIR [--cold]`: [`rounds`] of
/// pangolin (templates on), runc and with `--cold` pangolin without templates, each sample
/// printed as `bench-ctr <label> <ms>` and each pangolin kind's template count as
/// `bench-ctr <label> from-template <n>`.
pub fn command(args: &[String]) -> anyhow::Result<()> {
    let value = |flag: &str| -> anyhow::Result<&String> {
        let i = args
            .iter()
            .position(|a| a == flag)
            .with_context(|| format!("{flag} is required"))?;
        args.get(i + 1)
            .with_context(|| format!("{flag} needs a value"))
    };
    let runs: usize = value("--runs")?.parse().context("--runs N")?;
    let shim_dir = PathBuf::from(value("--shim-dir")?);
    let rootfs = PathBuf::from(value("--rootfs")?);
    let mut kinds = vec![Kind::Pangolin, Kind::Runc];
    if args.iter().any(|a| a == "--cold") {
        kinds.insert(1, Kind::PangolinCold);
    }
    for (kind, samples) in rounds(runs, &shim_dir, &rootfs, &kinds, true)? {
        for ms in &samples.ms {
            println!("{SAMPLE} {} {ms:.1}", kind.label(true));
        }
        if kind != Kind::Runc {
            println!(
                "{SAMPLE} {} from-template {}",
                kind.label(true),
                samples.from_template
            );
        }
    }
    Ok(())
}

/// The samples and template counts in [`command`]'s output, by label.
pub fn parse(text: &str) -> Vec<(String, Samples)> {
    let mut out: Vec<(String, Samples)> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix(SAMPLE) else {
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        let (label, value) = match words.as_slice() {
            [label, value] => (*label, *value),
            [label, "from-template", n] => {
                if let (Some(entry), Ok(n)) = (out.iter_mut().find(|(l, _)| l == label), n.parse())
                {
                    entry.1.from_template = n;
                }
                continue;
            }
            _ => continue,
        };
        let Ok(ms) = value.parse::<f64>() else {
            continue;
        };
        match out.iter_mut().find(|(l, _)| l == label) {
            Some(entry) => entry.1.ms.push(ms),
            None => out.push((
                label.to_string(),
                Samples {
                    ms: vec![ms],
                    from_template: 0,
                },
            )),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_test_hosts_samples_parse_by_label_among_other_output() {
        let text = "[ 3.1] kernel line\nbench-ctr pangolin-template 2100.5\nbench-ctr runc 300.0\n\
                    bench-ctr pangolin-template 1900.0\nbench-ctr pangolin-template from-template 2\n\
                    bench-ctr runc oops\n";
        let parsed = super::parse(text);
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].0, "pangolin-template");
        assert_eq!(parsed[0].1.ms, vec![2100.5, 1900.0]);
        assert_eq!(parsed[0].1.from_template, 2);
        assert_eq!(parsed[1].1.ms, vec![300.0]);
    }
}
