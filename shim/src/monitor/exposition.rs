//! The Prometheus text exposition format (version 0.0.4) of a scrape.

use std::fmt::Write as _;

use super::collect::SandboxFigures;

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A label value, escaped as the format requires (backslash, double quote, newline).
pub fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// One metric family: its help, type and samples (`labels` without braces, value).
struct Family<'a> {
    name: &'a str,
    help: &'a str,
    kind: &'a str,
    samples: Vec<(String, f64)>,
}

fn write_family(out: &mut String, f: &Family<'_>) {
    let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
    let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
    for (labels, value) in &f.samples {
        let _ = writeln!(out, "{}{{{labels}}} {value}", f.name);
    }
}

/// The text of one scrape; `now_ms` is the wall clock (for uptimes).
pub fn render(sandboxes: &[SandboxFigures], now_ms: u64) -> String {
    let base = |s: &SandboxFigures| {
        let mut l = format!("sandbox=\"{}\"", escape(&s.info.id));
        if let Some(pod) = &s.pod.pod {
            let (namespace, name) = pod.split_once('/').unwrap_or(("", pod));
            let _ = write!(
                l,
                ",namespace=\"{}\",pod=\"{}\"",
                escape(namespace),
                escape(name)
            );
        }
        l
    };
    let per_sandbox = |f: &dyn Fn(&SandboxFigures) -> f64| -> Vec<(String, f64)> {
        sandboxes.iter().map(|s| (base(s), f(s))).collect()
    };
    let per_process = |f: &dyn Fn(&super::collect::ProcessFigures) -> f64| -> Vec<(String, f64)> {
        sandboxes
            .iter()
            .flat_map(|s| {
                s.processes
                    .iter()
                    .map(move |p| (format!("{},process=\"{}\"", base(s), p.role), f(p)))
            })
            .collect()
    };
    let per_guest = |f: &dyn Fn(&super::collect::GuestFigures) -> f64| -> Vec<(String, f64)> {
        sandboxes
            .iter()
            .filter_map(|s| s.guest.as_ref().map(|g| (base(s), f(g))))
            .collect()
    };
    let per_container =
        |f: &dyn Fn(&super::collect::ContainerFigures) -> f64| -> Vec<(String, f64)> {
            sandboxes
                .iter()
                .flat_map(|s| {
                    s.guest.iter().flat_map(move |g| {
                        g.containers.iter().map(move |c| {
                            (format!("{},container=\"{}\"", base(s), escape(&c.id)), f(c))
                        })
                    })
                })
                .collect()
        };
    let per_key = |of: &dyn Fn(&SandboxFigures) -> Vec<(String, u64)>, key: &str| {
        sandboxes
            .iter()
            .flat_map(|s| {
                of(s)
                    .into_iter()
                    .map(move |(k, v)| (format!("{},{key}=\"{}\"", base(s), escape(&k)), v as f64))
            })
            .collect::<Vec<_>>()
    };
    let families = [
        Family {
            name: "pangolin_vmm_exits_total",
            help: "vCPU exits to the built-in VMM, by kind.",
            kind: "counter",
            samples: per_key(
                &|s| s.vmm.iter().flat_map(|m| m.exits.clone()).collect(),
                "kind",
            ),
        },
        Family {
            name: "pangolin_vmm_unmapped_accesses_total",
            help: "Guest port I/O and MMIO accesses of addresses no device of the built-in VMM serves.",
            kind: "counter",
            samples: sandboxes
                .iter()
                .filter_map(|s| s.vmm.as_ref().map(|m| (base(s), m.unmapped_accesses as f64)))
                .collect(),
        },
        Family {
            name: "pangolin_vmm_guest_errors_total",
            help: "Guest-triggered device errors in the built-in VMM (malformed descriptor chains, refused requests), by device.",
            kind: "counter",
            samples: per_key(
                &|s| s.vmm.iter().flat_map(|m| m.guest_errors.clone()).collect(),
                "device",
            ),
        },
        Family {
            name: "pangolin_sandbox_info",
            help: "A sandbox on this node (always 1), with its backend and how it started.",
            kind: "gauge",
            samples: sandboxes
                .iter()
                .map(|s| {
                    (
                        format!(
                            "{},hypervisor=\"{}\",started_from=\"{}\"",
                            base(s),
                            escape(&s.info.hypervisor),
                            escape(&s.info.started_from)
                        ),
                        1.0,
                    )
                })
                .collect(),
        },
        Family {
            name: "pangolin_sandbox_vcpus",
            help: "The sandbox VM's vCPUs.",
            kind: "gauge",
            samples: per_sandbox(&|s| f64::from(s.info.vcpus)),
        },
        Family {
            name: "pangolin_sandbox_memory_bytes",
            help: "The sandbox VM's guest memory.",
            kind: "gauge",
            samples: per_sandbox(&|s| f64::from(s.info.memory_mib) * 1_048_576.0),
        },
        Family {
            name: "pangolin_sandbox_boot_seconds",
            help: "Sandbox start to guest agent ready.",
            kind: "gauge",
            samples: per_sandbox(&|s| s.info.boot_ms as f64 / 1000.0),
        },
        Family {
            name: "pangolin_sandbox_uptime_seconds",
            help: "Time since the sandbox became ready.",
            kind: "gauge",
            samples: per_sandbox(&|s| now_ms.saturating_sub(s.info.ready_unix_ms) as f64 / 1000.0),
        },
        Family {
            name: "pangolin_sandbox_containers",
            help: "Containers in the sandbox (as its containerd shim last recorded them).",
            kind: "gauge",
            samples: per_sandbox(&|s| s.pod.containers.len() as f64),
        },
        Family {
            name: "pangolin_process_cpu_seconds_total",
            help: "User and system CPU time of a sandbox's host process.",
            kind: "counter",
            samples: per_process(&|p| p.cpu_seconds),
        },
        Family {
            name: "pangolin_process_resident_memory_bytes",
            help: "Resident set size of a sandbox's host process (guest RAM it touched included, for the VMM).",
            kind: "gauge",
            samples: per_process(&|p| p.rss_bytes as f64),
        },
        Family {
            name: "pangolin_process_proportional_memory_bytes",
            help: "Proportional set size of a sandbox's host process.",
            kind: "gauge",
            samples: per_process(&|p| p.pss_bytes as f64),
        },
        Family {
            name: "pangolin_process_open_fds",
            help: "Open file descriptors of a sandbox's host process.",
            kind: "gauge",
            samples: per_process(&|p| p.fds as f64),
        },
        Family {
            name: "pangolin_process_threads",
            help: "Threads of a sandbox's host process.",
            kind: "gauge",
            samples: per_process(&|p| p.threads as f64),
        },
        Family {
            name: "pangolin_guest_memory_total_bytes",
            help: "The guest's MemTotal.",
            kind: "gauge",
            samples: per_guest(&|g| g.mem_total_bytes as f64),
        },
        Family {
            name: "pangolin_guest_memory_available_bytes",
            help: "The guest's MemAvailable.",
            kind: "gauge",
            samples: per_guest(&|g| g.mem_available_bytes as f64),
        },
        Family {
            name: "pangolin_guest_load1",
            help: "The guest's load average over a minute.",
            kind: "gauge",
            samples: per_guest(&|g| g.load[0]),
        },
        Family {
            name: "pangolin_guest_load5",
            help: "The guest's load average over five minutes.",
            kind: "gauge",
            samples: per_guest(&|g| g.load[1]),
        },
        Family {
            name: "pangolin_guest_load15",
            help: "The guest's load average over fifteen minutes.",
            kind: "gauge",
            samples: per_guest(&|g| g.load[2]),
        },
        Family {
            name: "pangolin_guest_tasks",
            help: "Tasks in the guest.",
            kind: "gauge",
            samples: per_guest(&|g| g.tasks as f64),
        },
        Family {
            name: "pangolin_container_cpu_seconds_total",
            help: "CPU time of a container's cgroup in the guest.",
            kind: "counter",
            samples: per_container(&|c| c.cpu_seconds),
        },
        Family {
            name: "pangolin_container_memory_usage_bytes",
            help: "Memory of a container's cgroup in the guest.",
            kind: "gauge",
            samples: per_container(&|c| c.memory_bytes as f64),
        },
        Family {
            name: "pangolin_container_memory_limit_bytes",
            help: "Memory limit of a container's cgroup in the guest (0: none).",
            kind: "gauge",
            samples: per_container(&|c| c.memory_limit_bytes as f64),
        },
        Family {
            name: "pangolin_container_pids",
            help: "Processes in a container's cgroup in the guest.",
            kind: "gauge",
            samples: per_container(&|c| c.pids as f64),
        },
    ];
    let mut out = String::new();
    for family in &families {
        write_family(&mut out, family);
    }
    write_rpc_histograms(&mut out, sandboxes, &base);
    out
}

/// `pangolin_agent_rpc_duration_seconds`: one histogram per sandbox and agent method.
fn write_rpc_histograms(
    out: &mut String,
    sandboxes: &[SandboxFigures],
    base: &dyn Fn(&SandboxFigures) -> String,
) {
    const NAME: &str = "pangolin_agent_rpc_duration_seconds";
    let _ = writeln!(
        out,
        "# HELP {NAME} Latency of the agent calls the sandbox's owner made, by method (not the calls that wait for the workload: WaitProcess, the stream reads, GetOomEvent)."
    );
    let _ = writeln!(out, "# TYPE {NAME} histogram");
    for s in sandboxes {
        for (method, h) in &s.rpc {
            let labels = format!("{},method=\"{}\"", base(s), escape(method));
            let bounds = crate::rpc_stats::BUCKETS
                .iter()
                .map(ToString::to_string)
                .chain(std::iter::once("+Inf".to_string()));
            for (le, n) in bounds.zip(h.cumulative()) {
                let _ = writeln!(out, "{NAME}_bucket{{{labels},le=\"{le}\"}} {n}");
            }
            let _ = writeln!(out, "{NAME}_sum{{{labels}}} {}", h.sum_seconds);
            let _ = writeln!(out, "{NAME}_count{{{labels}}} {}", h.count);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::collect::{ContainerFigures, GuestFigures, ProcessFigures};
    use crate::sandbox::info::{PodInfo, SandboxInfo};

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape("x\ny"), "x\\ny");
    }

    #[test]
    fn a_sandbox_renders_its_families_with_its_pod_labels() {
        let s = SandboxFigures {
            info: SandboxInfo {
                id: "abc".into(),
                hypervisor: "qemu".into(),
                vcpus: 2,
                memory_mib: 256,
                ready_unix_ms: 1_000,
                started_from: "boot".into(),
                vmm_pid: Some(1),
                virtiofsd_pid: None,
                owner_pid: 2,
                boot_ms: 750,
                debug_console: false,
            },
            pod: PodInfo {
                pod: Some("team-a/web\"1".into()),
                containers: vec!["abc".into(), "c2".into()],
            },
            processes: vec![ProcessFigures {
                role: "vmm",
                cpu_seconds: 1.5,
                rss_bytes: 4096,
                pss_bytes: 2048,
                fds: 12,
                threads: 3,
            }],
            guest: Some(GuestFigures {
                mem_total_bytes: 100,
                mem_available_bytes: 50,
                load: [0.5, 0.25, 0.0],
                tasks: 40,
                containers: vec![ContainerFigures {
                    id: "c2".into(),
                    cpu_seconds: 0.25,
                    memory_bytes: 4096,
                    memory_limit_bytes: 0,
                    pids: 2,
                }],
            }),
            rpc: [(
                "CreateContainer".to_string(),
                crate::rpc_stats::Histogram {
                    buckets: vec![0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                    count: 2,
                    sum_seconds: 3.004,
                },
            )]
            .into(),
            vmm: Some(pangolin_vmm_config::api::Metrics {
                exits: [("mmio_write".to_string(), 7)].into(),
                unmapped_accesses: 3,
                guest_errors: [("vsock".to_string(), 1)].into(),
            }),
        };
        let text = render(&[s], 11_000);
        let labels = r#"sandbox="abc",namespace="team-a",pod="web\"1""#;
        for line in [
            format!(r#"pangolin_sandbox_info{{{labels},hypervisor="qemu",started_from="boot"}} 1"#),
            format!("pangolin_sandbox_memory_bytes{{{labels}}} 268435456"),
            format!("pangolin_sandbox_boot_seconds{{{labels}}} 0.75"),
            format!("pangolin_sandbox_uptime_seconds{{{labels}}} 10"),
            format!("pangolin_sandbox_containers{{{labels}}} 2"),
            format!(r#"pangolin_process_cpu_seconds_total{{{labels},process="vmm"}} 1.5"#),
            format!(r#"pangolin_process_threads{{{labels},process="vmm"}} 3"#),
            format!("pangolin_guest_memory_available_bytes{{{labels}}} 50"),
            format!("pangolin_guest_load1{{{labels}}} 0.5"),
            format!(r#"pangolin_container_memory_usage_bytes{{{labels},container="c2"}} 4096"#),
            format!(r#"pangolin_container_pids{{{labels},container="c2"}} 2"#),
            format!(r#"pangolin_vmm_exits_total{{{labels},kind="mmio_write"}} 7"#),
            format!("pangolin_vmm_unmapped_accesses_total{{{labels}}} 3"),
            format!(r#"pangolin_vmm_guest_errors_total{{{labels},device="vsock"}} 1"#),
            format!(
                r#"pangolin_agent_rpc_duration_seconds_bucket{{{labels},method="CreateContainer",le="0.001"}} 0"#
            ),
            format!(
                r#"pangolin_agent_rpc_duration_seconds_bucket{{{labels},method="CreateContainer",le="0.005"}} 1"#
            ),
            format!(
                r#"pangolin_agent_rpc_duration_seconds_bucket{{{labels},method="CreateContainer",le="+Inf"}} 2"#
            ),
            format!(
                r#"pangolin_agent_rpc_duration_seconds_count{{{labels},method="CreateContainer"}} 2"#
            ),
            format!(
                r#"pangolin_agent_rpc_duration_seconds_sum{{{labels},method="CreateContainer"}} 3.004"#
            ),
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(text.contains("# TYPE pangolin_process_cpu_seconds_total counter"));
        assert_eq!(
            render(&[], 0)
                .lines()
                .filter(|l| !l.starts_with('#'))
                .count(),
            0
        );
    }
}
