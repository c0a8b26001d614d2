//! `pangolin monitor` scraped by a real Prometheus (Debian's, started by the test with its own
//! configuration and storage): while two pods run through a private containerd, Prometheus's
//! HTTP API returns the series of both (the sandbox, its VMM's and shim's processes, its guest's
//! memory from the agent, its container's cgroup in the guest); once
//! one pod is removed, the next scrapes have only the other.

#![allow(clippy::tests_outside_test_module)] // integration tests live at the top of their file

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pangolin_e2e::ctr::{containerd, ctr, pangolin_run, remove_task};
use pangolin_e2e::{finish_containerd, patience, stderr, TestEnv};

const PROMETHEUS: &str = "/usr/bin/prometheus";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The body of `GET path` on `127.0.0.1:port` (HTTP/1.0), or None.
fn get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let ok = head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200");
    ok.then(|| body.to_string())
}

/// The `sandbox` labels of an instant query's result series.
fn sandboxes_in(prometheus: u16, query: &str) -> Vec<String> {
    let encoded: String = query
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'_' {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let path = format!("/api/v1/query?query={encoded}");
    let Some(body) = get(prometheus, &path) else {
        return Vec::new();
    };
    let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let mut found: Vec<String> = json["data"]["result"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["metric"]["sandbox"].as_str().map(str::to_string))
        .collect();
    found.sort();
    found
}

/// Polls `query` until its sandboxes are `want` (within 60 s); the last answer otherwise.
fn wait_for(prometheus: u16, query: &str, want: &[&str]) -> Result<(), Vec<String>> {
    let deadline = Instant::now() + patience(Duration::from_secs(60));
    loop {
        let got = sandboxes_in(prometheus, query);
        if got == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(got);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn prometheus_scrapes_both_pods_and_forgets_a_removed_one() {
    assert!(
        std::path::Path::new(PROMETHEUS).exists(),
        "{PROMETHEUS} missing: Debian's prometheus (cargo xtask test installs it)"
    );
    let env = TestEnv::new("monitor");
    let ctrd = containerd(&env);
    for id in ["mon1", "mon2"] {
        let out = ctr(&ctrd, &pangolin_run(&["-d"], id, &["sleep", "3600"]));
        assert!(out.status.success(), "ctr run {id}: {}", stderr(&out));
    }
    let (monitor_port, prometheus_port) = (free_port(), free_port());
    let monitor = env
        .pangolin()
        .args(["monitor", "--listen", &format!("127.0.0.1:{monitor_port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("pangolin monitor");
    let prom_dir = env.dir.join("prometheus");
    std::fs::create_dir_all(prom_dir.join("data")).expect("mkdir");
    std::fs::write(
        prom_dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: pangolin\n    static_configs:\n      - targets: ['127.0.0.1:{monitor_port}']\n"
        ),
    )
    .expect("prometheus.yml");
    let prometheus = Command::new(PROMETHEUS)
        .arg(format!(
            "--config.file={}",
            prom_dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            prom_dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prometheus_port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(prom_dir.join("log")).expect("log"))
        .spawn()
        .expect("prometheus");

    let both = wait_for(prometheus_port, "pangolin_sandbox_info", &["mon1", "mon2"]);
    let vmms = wait_for(
        prometheus_port,
        r#"pangolin_process_resident_memory_bytes{process="vmm"}"#,
        &["mon1", "mon2"],
    );
    let guests = wait_for(
        prometheus_port,
        "pangolin_guest_memory_total_bytes",
        &["mon1", "mon2"],
    );
    let containers = wait_for(
        prometheus_port,
        r#"pangolin_container_memory_usage_bytes{container="mon2"}"#,
        &["mon2"],
    );
    let shims = wait_for(
        prometheus_port,
        r#"pangolin_process_cpu_seconds_total{process="owner"}"#,
        &["mon1", "mon2"],
    );
    // virtiofsd's work is done by the child it forks into its sandbox: counted with it.
    let virtiofsd = wait_for(
        prometheus_port,
        r#"pangolin_process_threads{process="virtiofsd"} > 1"#,
        &["mon1", "mon2"],
    );
    // The shims' agent calls (each created and started a container).
    let rpcs = wait_for(
        prometheus_port,
        r#"pangolin_agent_rpc_duration_seconds_count{method="CreateContainer"} > 0"#,
        &["mon1", "mon2"],
    );
    let buckets = wait_for(
        prometheus_port,
        r#"pangolin_agent_rpc_duration_seconds_bucket{method="StartContainer",le="+Inf"} > 0"#,
        &["mon1", "mon2"],
    );
    remove_task(&ctrd, "mon1");
    let one = wait_for(prometheus_port, "pangolin_sandbox_info", &["mon2"]);
    let log = std::fs::read_to_string(prom_dir.join("log")).unwrap_or_default();
    stop(prometheus);
    stop(monitor);
    remove_task(&ctrd, "mon2");
    let tail: String = log.lines().rev().take(10).collect::<Vec<_>>().join("\n");
    both.unwrap_or_else(|got| panic!("both pods' series: got {got:?}; prometheus log:\n{tail}"));
    vmms.unwrap_or_else(|got| panic!("VMM memory series: got {got:?}"));
    shims.unwrap_or_else(|got| panic!("shim CPU series: got {got:?}"));
    guests.unwrap_or_else(|got| panic!("guest memory series (from the agents): got {got:?}"));
    containers.unwrap_or_else(|got| panic!("container cgroup series: got {got:?}"));
    virtiofsd.unwrap_or_else(|got| panic!("virtiofsd with its sandboxed child: got {got:?}"));
    rpcs.unwrap_or_else(|got| panic!("agent call histograms: got {got:?}"));
    buckets.unwrap_or_else(|got| panic!("agent call histogram buckets: got {got:?}"));
    one.unwrap_or_else(|got| panic!("after removing mon1: got {got:?}"));
    let _ = std::fs::remove_dir_all(&prom_dir);
    finish_containerd(ctrd, env);
}
