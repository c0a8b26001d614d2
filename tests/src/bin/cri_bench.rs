//! `cri_bench`: RunPodSandbox + CreateContainer + StartContainer through CRI, pangolin
//! handler vs runc, alternating in one private containerd; run by `cargo xtask bench` (which
//! cannot link the CRI client itself: its code is generated with protoc, installed later).
//!
//! usage: cri_bench --runs N --shim-dir DIR --busybox DIR [--config FILE]

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_cri::v1::{
    CreateContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest,
    StopPodSandboxRequest,
};
use pangolin_e2e::containerd::{Options, PrivateContainerd, PANGOLIN_HANDLER};
use pangolin_e2e::cri::{self, BridgeNetwork, Cri};

struct Args {
    runs: usize,
    shim_dir: PathBuf,
    busybox: PathBuf,
    config: Option<PathBuf>,
}

fn parse() -> Result<Args> {
    let mut args = Args {
        runs: 5,
        shim_dir: PathBuf::new(),
        busybox: PathBuf::new(),
        config: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--runs" => args.runs = value()?.parse().context("--runs N")?,
            "--shim-dir" => args.shim_dir = value()?.into(),
            "--busybox" => args.busybox = value()?.into(),
            "--config" => args.config = Some(value()?.into()),
            other => bail!("unknown argument {other:?}"),
        }
    }
    if args.runs == 0 || args.shim_dir.as_os_str().is_empty() || args.busybox.as_os_str().is_empty()
    {
        bail!("usage: cri_bench --runs N --shim-dir DIR --busybox DIR [--config FILE]");
    }
    Ok(args)
}

/// Milliseconds of one pod start: (RunPodSandbox, CreateContainer, StartContainer).
async fn pod_start(
    cri: &mut Cri,
    handler: &str,
    name: &str,
    logs: &std::path::Path,
) -> Result<[f64; 3]> {
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1000.0;
    let pod_config = cri::pod_config(name, logs, HashMap::new());
    let t = Instant::now();
    let pod = cri
        .runtime
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod_config.clone()),
            runtime_handler: handler.into(),
        })
        .await
        .with_context(|| format!("RunPodSandbox ({handler})"))?
        .into_inner()
        .pod_sandbox_id;
    let run = ms(t);
    let t = Instant::now();
    let id = cri
        .runtime
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(cri::container_config("c", &["sleep", "3600"])),
            sandbox_config: Some(pod_config),
        })
        .await
        .with_context(|| format!("CreateContainer ({handler})"))?
        .into_inner()
        .container_id;
    let create = ms(t);
    let t = Instant::now();
    cri.runtime
        .start_container(StartContainerRequest { container_id: id })
        .await
        .with_context(|| format!("StartContainer ({handler})"))?;
    let start = ms(t);
    cri.runtime
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .context("StopPodSandbox")?;
    cri.runtime
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await
        .context("RemovePodSandbox")?;
    Ok([run, create, start])
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn report(name: &str, samples: &[[f64; 3]]) -> f64 {
    let col = |i: usize| samples.iter().map(|s| s[i]).collect::<Vec<f64>>();
    let mut total: Vec<f64> = samples.iter().map(|s| s.iter().sum()).collect();
    let (min, max) = total
        .iter()
        .fold((f64::MAX, 0.0_f64), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
    let med = median(&mut total);
    println!(
        "{name:<28} median {med:>8.1} ms   min {min:>8.1} ms   max {max:>8.1} ms   (RunPodSandbox {:.1}, CreateContainer {:.1}, StartContainer {:.1})",
        median(&mut col(0)),
        median(&mut col(1)),
        median(&mut col(2)),
    );
    med
}

fn main() -> Result<()> {
    let args = parse()?;
    let dir = std::env::temp_dir().join(format!("pangolin-cri-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let net = BridgeNetwork::create(&dir, "pangolin-cri-bench", 200)?;
    let mut options = Options {
        cri: true,
        ..Options::default()
    };
    if let Some(config) = &args.config {
        options
            .env
            .push(("PANGOLIN_CONFIG".into(), config.display().to_string()));
    }
    let ctrd = PrivateContainerd::start_with(&dir, &args.shim_dir, &options)?;
    cri::import_images(&ctrd, &args.busybox)?;
    let logs = dir.join("pod-logs");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let mut cri = Cri::connect(&ctrd.socket).await?;
        let (mut pg, mut rc) = (Vec::new(), Vec::new());
        for i in 0..args.runs {
            pg.push(pod_start(&mut cri, PANGOLIN_HANDLER, &format!("pg-{i}"), &logs).await?);
            rc.push(pod_start(&mut cri, "runc", &format!("rc-{i}"), &logs).await?);
        }
        anyhow::Ok((pg, rc))
    });
    let leftovers = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), cri::remove_all_pods(&ctrd.socket)).await
    });
    let log_tail = ctrd.log_tail(20);
    ctrd.stop()?;
    drop(net);
    cri::remove_cgroup_parent();
    let _ = std::fs::remove_dir_all(&dir);
    let (pg, rc) = result.with_context(|| format!("containerd log:\n{log_tail}"))?;
    if let Ok(left) = leftovers {
        if !left.is_empty() {
            bail!("pods left after the runs: {left:?}");
        }
    }
    println!(
        "CRI RunPodSandbox + CreateContainer + StartContainer (busybox sleep, bridge CNI), {} runs each, alternating",
        args.runs
    );
    let p = report("pangolin (handler pangolin)", &pg);
    let r = report("runc (handler runc)", &rc);
    println!("{:<28} {:.1}x", "ratio pangolin/runc", p / r);
    Ok(())
}
