//! `stress`: pods under load through CRI with the leak audit after every step (see
//! `pangolin_e2e::stress`); run by `cargo xtask stress`, which builds it.
//!
//! usage: stress [--cycles N] [--parallel N] [--soak MINUTES] [--workers N]
//!               [--handlers pangolin,runc] [--tag 1-255]

use std::time::Duration;

use anyhow::{bail, Context, Result};
use pangolin_e2e::stress::{handler_names, Sizes, Stress};

const USAGE: &str = "usage: stress [--cycles N] [--parallel N] [--soak MINUTES] [--workers N] [--handlers pangolin,runc] [--tag 1-255]";

fn parse() -> Result<(Sizes, u8)> {
    let mut sizes = Sizes {
        cycles: 0,
        parallel: 0,
        soak: Duration::ZERO,
        soak_workers: 2,
        handlers: handler_names("pangolin,runc")?,
        whole_host: true,
    };
    let mut tag = 90;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .with_context(|| format!("{a} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--cycles" => sizes.cycles = value()?.parse().context("--cycles N")?,
            "--parallel" => sizes.parallel = value()?.parse().context("--parallel N")?,
            "--soak" => {
                let minutes: f64 = value()?.parse().context("--soak MINUTES")?;
                if !(minutes >= 0.0 && minutes.is_finite()) {
                    bail!("--soak MINUTES: {minutes} is not a duration");
                }
                sizes.soak = Duration::from_secs_f64(minutes * 60.0);
            }
            "--workers" => sizes.soak_workers = value()?.parse().context("--workers N")?,
            "--handlers" => sizes.handlers = handler_names(&value()?)?,
            "--tag" => tag = value()?.parse().context("--tag 1-255")?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if sizes.cycles == 0 && sizes.parallel == 0 && sizes.soak.is_zero() {
        bail!("nothing to do: give --cycles, --parallel or --soak\n{USAGE}");
    }
    if tag == 0 {
        bail!("--tag 1-255");
    }
    Ok((sizes, tag))
}

fn main() -> Result<()> {
    let (sizes, tag) = parse()?;
    eprintln!(
        "stress: {} cycles, {} parallel, {:?} soak with {} workers, handlers {:?}",
        sizes.cycles, sizes.parallel, sizes.soak, sizes.soak_workers, sizes.handlers
    );
    let stress = Stress::new("stress", tag, sizes.whole_host);
    let report = stress.run(&sizes);
    // The pods go and the end-of-run checks run whatever happened.
    stress.finish();
    print!("{}", report?.render());
    Ok(())
}
