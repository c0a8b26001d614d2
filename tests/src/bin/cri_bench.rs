//! `cri_bench`: CRI figures, pangolin handler vs runc, alternating in one private containerd:
//! RunPodSandbox + CreateContainer + StartContainer, a host -> pod TCP stream, ExecSync `echo`
//! latency (P6), N pods started at once (P4: time until all are ready) and their host memory
//! per pod (P3: PSS of the shim and of every process in the pod's cgroups, guest RAM left out).
//! Run by `cargo xtask bench` (which cannot link the CRI client itself: its code is generated
//! with protoc, installed later), which reads the samples from `--out FILE` (JSON) and prints
//! them with their ratios.
//!
//! usage: cri_bench --runs N --parallel N --shim-dir DIR --busybox DIR --out FILE [--config FILE]

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_cri::v1::{CreateContainerRequest, ExecSyncRequest, StartContainerRequest};
use pangolin_e2e::containerd::{Options, PrivateContainerd, PANGOLIN_HANDLER};
use pangolin_e2e::cri::{self, BridgeNetwork, Cri};
use pangolin_e2e::stress;

struct Args {
    runs: usize,
    parallel: usize,
    shim_dir: PathBuf,
    busybox: PathBuf,
    out: PathBuf,
    config: Option<PathBuf>,
}

const USAGE: &str =
    "usage: cri_bench --runs N --parallel N --shim-dir DIR --busybox DIR --out FILE [--config FILE]";

fn parse() -> Result<Args> {
    let mut args = Args {
        runs: 5,
        parallel: 8,
        shim_dir: PathBuf::new(),
        busybox: PathBuf::new(),
        out: PathBuf::new(),
        config: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--runs" => args.runs = value()?.parse().context("--runs N")?,
            "--parallel" => args.parallel = value()?.parse().context("--parallel N")?,
            "--out" => args.out = value()?.into(),
            "--shim-dir" => args.shim_dir = value()?.into(),
            "--busybox" => args.busybox = value()?.into(),
            "--config" => args.config = Some(value()?.into()),
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if args.runs == 0
        || args.parallel == 0
        || args.shim_dir.as_os_str().is_empty()
        || args.busybox.as_os_str().is_empty()
        || args.out.as_os_str().is_empty()
    {
        bail!("{USAGE}");
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

/// P6: milliseconds of each of `runs` ExecSync `echo hi` calls into a running container.
async fn exec_latency(
    cri: &mut Cri,
    handler: &str,
    name: &str,
    logs: &std::path::Path,
    runs: usize,
) -> Result<Vec<f64>> {
    let pod_config = cri::pod_config(name, logs, HashMap::new());
    let pod = cri
        .run_pod(handler, &pod_config)
        .await
        .with_context(|| format!("RunPodSandbox ({handler})"))?;
    let result = async {
        let id = cri
            .create_start(
                &pod,
                &pod_config,
                cri::container_config("e", &["sleep", "3600"]),
            )
            .await?;
        let mut samples = Vec::with_capacity(runs);
        for _ in 0..runs {
            let t = Instant::now();
            let out = cri
                .runtime
                .exec_sync(ExecSyncRequest {
                    container_id: id.clone(),
                    cmd: vec!["echo".into(), "hi".into()],
                    timeout: 30,
                })
                .await?
                .into_inner();
            samples.push(t.elapsed().as_secs_f64() * 1000.0);
            if out.exit_code != 0 || out.stdout != b"hi\n" {
                bail!(
                    "ExecSync echo: exit {}, stdout {:?}",
                    out.exit_code,
                    String::from_utf8_lossy(&out.stdout)
                );
            }
        }
        anyhow::Ok(samples)
    }
    .await;
    let _ = cri.remove_pod(&pod).await;
    result.with_context(|| format!("ExecSync latency ({handler})"))
}

/// P4 and P3: `n` pods (each with a container) started at once; milliseconds until all are
/// ready and the host memory per pod in MiB (PSS without guest RAM), then all removed.
async fn parallel(
    cri: &Cri,
    handler: &str,
    round: usize,
    n: usize,
    logs: &std::path::Path,
    ctrd_dir: &std::path::Path,
) -> Result<(f64, f64)> {
    let names = (0..n)
        .map(|i| format!("par-{handler}-{round}-{i}"))
        .collect();
    let started = stress::start_at_once(cri, handler, names, logs).await;
    let pss = stress::pods_pss_kib(ctrd_dir);
    let removed = stress::remove_at_once(cri, started.pods).await;
    if let Some(e) = started.failure.or(removed) {
        return Err(e.context(format!("{n} pods at once ({handler})")));
    }
    let pss_kib: u64 = pss?.values().sum();
    #[allow(clippy::cast_precision_loss)] // KiB of a few pods and a pod count: exact in f64
    let per_pod_mib = pss_kib as f64 / 1024.0 / n as f64;
    Ok((started.ready_ms, per_pod_mib))
}

/// Everything one run measured, per handler (pangolin first, then runc).
#[derive(Default)]
struct Samples {
    start: [Vec<[f64; 3]>; 2],
    stream: [Vec<f64>; 2],
    exec: [Vec<f64>; 2],
    ready: [Vec<f64>; 2],
    pss: [Vec<f64>; 2],
}

impl Samples {
    /// Every quantity as `cargo xtask bench` reads it: `[{"name", "unit", "values"}]`.
    fn series(&self, parallel: usize) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        for (h, handler) in ["pangolin", "runc"].into_iter().enumerate() {
            let col = |i: usize| self.start[h].iter().map(|s| s[i]).collect::<Vec<f64>>();
            let mut push = |what: String, unit: &str, values: Vec<f64>| {
                out.push(serde_json::json!({
                    "name": format!("{handler} {what}"),
                    "unit": unit,
                    "values": values,
                }));
            };
            push(
                "pod start".into(),
                "ms",
                self.start[h].iter().map(|s| s.iter().sum()).collect(),
            );
            push("RunPodSandbox".into(), "ms", col(0));
            push("CreateContainer".into(), "ms", col(1));
            push("StartContainer".into(), "ms", col(2));
            push("TCP stream".into(), "MiB/s", self.stream[h].clone());
            push("ExecSync echo".into(), "ms", self.exec[h].clone());
            push(
                format!("{parallel} pods at once, all ready"),
                "ms",
                self.ready[h].clone(),
            );
            push(
                format!("host memory per pod, {parallel} at once"),
                "MiB",
                self.pss[h].clone(),
            );
        }
        out
    }
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
    let handlers = [PANGOLIN_HANDLER, "runc"];
    let result = rt.block_on(async {
        let mut cri = Cri::connect(&ctrd.socket).await?;
        let mut s = Samples::default();
        for i in 0..args.runs {
            eprintln!("cri_bench: pod start {}/{}", i + 1, args.runs);
            for (h, handler) in handlers.into_iter().enumerate() {
                s.start[h].push(pod_start(&mut cri, handler, &format!("st-{h}-{i}"), &logs).await?);
            }
        }
        for i in 0..args.runs.min(3) {
            eprintln!("cri_bench: TCP stream {}/{}", i + 1, args.runs.min(3));
            for (h, handler) in handlers.into_iter().enumerate() {
                s.stream[h]
                    .push(throughput(&mut cri, handler, &format!("tp-{h}-{i}"), &logs).await?);
            }
        }
        eprintln!("cri_bench: ExecSync echo, {} calls each", args.runs * 4);
        for (h, handler) in handlers.into_iter().enumerate() {
            s.exec[h] =
                exec_latency(&mut cri, handler, &format!("ex-{h}"), &logs, args.runs * 4).await?;
        }
        for i in 0..args.runs.min(3) {
            eprintln!(
                "cri_bench: {} pods at once {}/{}",
                args.parallel,
                i + 1,
                args.runs.min(3)
            );
            for (h, handler) in handlers.into_iter().enumerate() {
                let (ready, pss) =
                    parallel(&cri, handler, i, args.parallel, &logs, &ctrd.dir).await?;
                s.ready[h].push(ready);
                s.pss[h].push(pss);
            }
        }
        anyhow::Ok(s)
    });
    let leftovers = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), cri::remove_all_pods(&ctrd.socket)).await
    });
    let log_tail = ctrd.log_tail(20);
    ctrd.stop()?;
    drop(net);
    cri::remove_cgroup_parent();
    let _ = std::fs::remove_dir_all(&dir);
    let samples = result.with_context(|| format!("containerd log:\n{log_tail}"))?;
    if let Ok(left) = leftovers {
        if !left.is_empty() {
            bail!("pods left after the runs: {left:?}");
        }
    }
    let json = serde_json::to_string_pretty(&samples.series(args.parallel))?;
    std::fs::write(&args.out, json).with_context(|| format!("writing {}", args.out.display()))?;
    Ok(())
}
