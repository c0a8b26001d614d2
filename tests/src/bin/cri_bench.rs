//! `cri_bench`: RunPodSandbox + CreateContainer + StartContainer through CRI, pangolin
//! handler vs runc, alternating in one private containerd; run by `cargo xtask bench` (which
//! cannot link the CRI client itself: its code is generated with protoc, installed later).
//!
//! usage: cri_bench --runs N --shim-dir DIR --busybox DIR [--config FILE]

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_cri::v1::{CreateContainerRequest, StartContainerRequest};
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
        .run_pod(handler, &pod_config)
        .await
        .with_context(|| format!("RunPodSandbox ({handler})"))?;
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
    cri.remove_pod(&pod)
        .await
        .context("Stop/RemovePodSandbox")?;
    Ok([run, create, start])
}

/// How much the throughput figure streams.
const STREAM_MIB: usize = 64;

/// MiB/s of one TCP stream from the host to a pod: a pod whose container discards what
/// `nc -l` receives; the clock runs from connect to the receiver closing the connection.
async fn throughput(
    cri: &mut Cri,
    handler: &str,
    name: &str,
    logs: &std::path::Path,
) -> Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pod_config = cri::pod_config(name, logs, HashMap::new());
    let pod = cri
        .run_pod(handler, &pod_config)
        .await
        .with_context(|| format!("RunPodSandbox ({handler})"))?;
    let result = async {
        let ip = cri.pod_ip(&pod).await?;
        if ip.is_empty() {
            bail!("pod {pod} has no IP");
        }
        let id = cri
            .runtime
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(cri::container_config(
                    "sink",
                    &["sh", "-c", "nc -l -p 5001 > /dev/null"],
                )),
                sandbox_config: Some(pod_config),
            })
            .await?
            .into_inner()
            .container_id;
        cri.runtime
            .start_container(StartContainerRequest { container_id: id })
            .await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut stream = loop {
            match tokio::net::TcpStream::connect((ip.as_str(), 5001)).await {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(anyhow::Error::from(e).context(format!("connecting to {ip}:5001")))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let chunk = vec![0x5a_u8; 1 << 20];
        let t = Instant::now();
        for _ in 0..STREAM_MIB {
            stream.write_all(&chunk).await?;
        }
        stream.shutdown().await?;
        // The receiver closes once it has read everything.
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(120), stream.read_to_end(&mut rest)).await??;
        #[allow(clippy::cast_precision_loss)] // a few MiB: exact in f64
        let mib = STREAM_MIB as f64;
        anyhow::Ok(mib / t.elapsed().as_secs_f64())
    }
    .await;
    let _ = cri.remove_pod(&pod).await;
    result.with_context(|| format!("throughput ({handler})"))
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
        let (mut pg_tp, mut rc_tp) = (Vec::new(), Vec::new());
        for i in 0..args.runs.min(3) {
            pg_tp.push(throughput(&mut cri, PANGOLIN_HANDLER, &format!("tp-pg-{i}"), &logs).await?);
            rc_tp.push(throughput(&mut cri, "runc", &format!("tp-rc-{i}"), &logs).await?);
        }
        anyhow::Ok((pg, rc, pg_tp, rc_tp))
    });
    let leftovers = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), cri::remove_all_pods(&ctrd.socket)).await
    });
    let log_tail = ctrd.log_tail(20);
    ctrd.stop()?;
    drop(net);
    cri::remove_cgroup_parent();
    let _ = std::fs::remove_dir_all(&dir);
    let (pg, rc, mut pg_tp, mut rc_tp) =
        result.with_context(|| format!("containerd log:\n{log_tail}"))?;
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
    println!(
        "host -> pod TCP stream ({STREAM_MIB} MiB to busybox nc in the pod over the bridge CNI network), {} runs each, alternating",
        pg_tp.len()
    );
    let (p, r) = (median(&mut pg_tp), median(&mut rc_tp));
    println!("{:<28} median {p:>8.1} MiB/s", "pangolin (virtio-net, tc)");
    println!("{:<28} median {r:>8.1} MiB/s", "runc (veth)");
    println!("{:<28} {:.2}x", "ratio pangolin/runc", p / r);
    Ok(())
}
