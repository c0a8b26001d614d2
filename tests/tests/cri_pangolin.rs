//! Kubernetes CRI pods on the pangolin runtime handler, through a real CRI client (`k8s-cri`)
//! against a real private containerd with a bridge CNI network: one microVM per pod shared by
//! its containers, ExecSync, CRI logs, stats, resource updates, status, stop and removal with
//! nothing left behind. Pods restored from a template: `cri_templates.rs`; the shared fixture:
//! `pangolin_e2e::cri_pods`.

#![allow(clippy::tests_outside_test_module)] // integration tests live at the top of their file

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_cri::v1::{
    ContainerState, ContainerStatsRequest, DnsConfig, LinuxContainerResources,
    ListContainersRequest, Mount, NamespaceMode, NamespaceOption, PodSandboxState,
    PodSandboxStatusRequest, RemoveContainerRequest, RemovePodSandboxRequest, StopContainerRequest,
    StopPodSandboxRequest, UpdateContainerResourcesRequest,
};
use pangolin_e2e::containerd::PANGOLIN_HANDLER;
use pangolin_e2e::cri::{self, BridgeNetwork, Cri};
use pangolin_e2e::cri_pods::{
    container_state, create_start, drive, exec, netns_of, refused, run_pod, wait_log, CriFixture,
};
use pangolin_e2e::vmm_pids_under;

#[test]
fn cri_pods_reach_each_other_and_get_the_dns_config_they_asked_for() {
    let CriFixture { env, net, ctrd } = CriFixture::new("cri-net", 2);
    let logs = env.dir.join("pod-logs");
    let socket = ctrd.socket.clone();
    let leases = Arc::clone(&net);
    let body = async move {
        let mut cri = Cri::connect(&socket).await.expect("CRI connect");
        let server_config = cri::pod_config("server", &logs, HashMap::new());
        let (server, server_ip) = run_pod(&mut cri, &server_config).await;
        create_start(
            &mut cri,
            &server,
            &server_config,
            cri::web_container("web", "served-across-pods", 8080),
        )
        .await;

        let mut client_config = cri::pod_config("client", &logs, HashMap::new());
        client_config.dns_config = Some(DnsConfig {
            servers: vec!["10.231.2.53".into()],
            searches: vec!["pangolin.test".into()],
            options: vec!["ndots:2".into()],
        });
        let (client, client_ip) = run_pod(&mut cri, &client_config).await;
        assert_ne!(server_ip, client_ip);
        assert!(
            leases.leases().len() >= 2,
            "two leases: {:?}",
            leases.leases()
        );
        let c = create_start(
            &mut cri,
            &client,
            &client_config,
            cri::container_config("c", &["sleep", "3600"]),
        )
        .await;

        // Pod to pod over the bridge: the client VM fetches from the server VM.
        let url = format!("http://{server_ip}:8080/");
        let mut page = String::new();
        let mut last_err = String::new();
        for _ in 0..20 {
            let (out, err, code) = exec(&mut cri, &c, &["wget", "-qO-", &url]).await;
            if code == 0 {
                page = out;
                break;
            }
            last_err = err;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if page.is_empty() {
            let (diag, _, _) = exec(
                &mut cri,
                &c,
                &[
                    "sh",
                    "-c",
                    "ip addr; ip route; ip neigh; ping -c 2 -W 2 \"$0\" 2>&1; wget -O- http://$0:8080/ 2>&1; echo wget=$?",
                    &server_ip,
                ],
            )
            .await;
            panic!("GET {url} from the client pod failed: {last_err}\nclient network:\n{diag}");
        }
        assert_eq!(
            page, "served-across-pods\n",
            "GET {url} from the client pod"
        );

        let (resolv, _, _) = exec(&mut cri, &c, &["cat", "/etc/resolv.conf"]).await;
        for want in [
            "search pangolin.test",
            "nameserver 10.231.2.53",
            "options ndots:2",
        ] {
            assert!(
                resolv.contains(want),
                "resolv.conf lacks {want:?}:\n{resolv}"
            );
        }
        let (hostname, _, _) = exec(&mut cri, &c, &["hostname"]).await;
        assert_eq!(hostname.trim(), "client");

        for pod in [client, server] {
            cri.remove_pod(&pod).await.expect("Stop/RemovePodSandbox");
        }
        // Host networking is refused at RunPodSandbox, saying why, and leaves nothing behind.
        let mut host_net = cri::pod_config("hostnet", &logs, HashMap::new());
        host_net.hostname = String::new();
        if let Some(ns) = host_net
            .linux
            .as_mut()
            .and_then(|l| l.security_context.as_mut())
            .and_then(|c| c.namespace_options.as_mut())
        {
            ns.network = NamespaceMode::Node as i32;
        }
        let err = refused(&mut cri, &host_net, "host networking").await;
        assert!(
            err.message().contains("host networking"),
            "RunPodSandbox error: {err}"
        );
        // So are the host's PID and IPC namespaces, which a microVM cannot share either (they
        // used to be replaced by private ones in the guest without a word).
        type Pick = fn(&mut NamespaceOption) -> &mut i32;
        let modes: [(&str, &str, Pick); 2] = [
            ("hostpid", "hostPID: true", |ns| &mut ns.pid),
            ("hostipc", "hostIPC: true", |ns| &mut ns.ipc),
        ];
        for (name, field, pick) in modes {
            let mut config = cri::pod_config(name, &logs, HashMap::new());
            if let Some(ns) = config
                .linux
                .as_mut()
                .and_then(|l| l.security_context.as_mut())
                .and_then(|c| c.namespace_options.as_mut())
            {
                *pick(ns) = NamespaceMode::Node as i32;
            }
            let err = refused(&mut cri, &config, field).await;
            assert!(err.message().contains(field), "RunPodSandbox error: {err}");
        }
        assert!(
            leases.leases().is_empty(),
            "IP leases left: {:?}",
            leases.leases()
        );
    };
    drive(ctrd, env, net, body);
}

#[test]
fn cri_pod_containers_share_one_vm_with_exec_logs_stats_update_and_cleanup() {
    let CriFixture { env, net, ctrd } = CriFixture::new("cri-pod", 1);
    let logs = env.dir.join("pod-logs");
    let volume = env.dir.join("host-volume");
    std::fs::create_dir_all(&volume).expect("mkdir volume");
    let volume_check = volume.clone();
    let config_dir = env.dir.join("config-volume");
    std::fs::create_dir_all(&config_dir).expect("mkdir config volume");
    std::fs::write(config_dir.join("key"), "configured\n").expect("config key");
    std::fs::write(config_dir.join("app.conf"), "key=value\n").expect("config file");
    let host_boot_id =
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id").expect("host boot id");
    let (socket, state, containerd_log) =
        (ctrd.socket.clone(), env.state.clone(), ctrd.log.clone());
    let net2 = Arc::clone(&net);
    let log_tail = move || {
        let text = std::fs::read_to_string(&containerd_log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    };

    let body = async move {
        let net = net2;
        let mut cri = Cri::connect(&socket).await.expect("CRI connect");
        // io.pangolin.* pod annotations pass through (pod_annotations) and shape the VM.
        let annotations = HashMap::from([("io.pangolin.vcpus".to_string(), "2".to_string())]);
        let pod_config = cri::pod_config("pod1", &logs, annotations);
        let t = Instant::now();
        let pod = cri
            .run_pod(PANGOLIN_HANDLER, &pod_config)
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", log_tail()));
        eprintln!("RunPodSandbox {:?}", t.elapsed());

        let st = cri
            .runtime
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: pod.clone(),
                verbose: true,
            })
            .await
            .expect("PodSandboxStatus")
            .into_inner();
        let status = st.status.clone().expect("status");
        assert_eq!(status.state, PodSandboxState::SandboxReady as i32);
        let ip = status.network.map(|n| n.ip).unwrap_or_default();
        let prefix = net.subnet.trim_end_matches("0/24");
        assert!(
            ip.starts_with(prefix),
            "pod IP {ip:?} not in {}",
            net.subnet
        );
        let netns = netns_of(&st.info);
        assert!(Path::new(&netns).exists(), "netns {netns} missing");
        assert_eq!(vmm_pids_under(&state).len(), 1, "one VM for the sandbox");

        let mut c1_config = cri::container_config(
            "c1",
            &[
                "sh",
                "-c",
                "echo hello-cri; echo oops-cri >&2; exec sleep 3600",
            ],
        );
        // Volume kinds as the kubelet passes them: a read-write hostPath/emptyDir directory, a
        // read-only configMap/secret directory, a read-only subPath file.
        for (container_path, host_path, readonly) in [
            ("/vol", volume.clone(), false),
            ("/etc/config", config_dir.clone(), true),
            ("/etc/app.conf", config_dir.join("app.conf"), true),
        ] {
            c1_config.mounts.push(Mount {
                container_path: container_path.into(),
                host_path: host_path.display().to_string(),
                readonly,
                ..Default::default()
            });
        }
        let c1 = create_start(&mut cri, &pod, &pod_config, c1_config).await;
        let c2 = create_start(
            &mut cri,
            &pod,
            &pod_config,
            cri::container_config("c2", &["sleep", "3600"]),
        )
        .await;

        // Both containers run in the pod's one VM: same guest boot id, not the host's.
        let (boot1, _, code) =
            exec(&mut cri, &c1, &["cat", "/proc/sys/kernel/random/boot_id"]).await;
        assert_eq!(code, 0);
        let (boot2, _, _) = exec(&mut cri, &c2, &["cat", "/proc/sys/kernel/random/boot_id"]).await;
        assert_eq!(boot1, boot2, "containers of one pod share the VM");
        assert_ne!(boot1, host_boot_id, "container runs in a VM");
        let vms = vmm_pids_under(&state);
        assert_eq!(vms.len(), 1, "one VM per pod: {vms:?}");
        let (kernel, _, _) = exec(&mut cri, &c2, &["uname", "-r"]).await;
        assert!(kernel.contains("-pangolin"), "guest kernel: {kernel}");

        // The pod's network is the guest's: the CNI address on the guest NIC, and a server in
        // the pod answers the host on the pod IP (through veth, tc, tap, virtio-net).
        let (addrs, _, _) = exec(&mut cri, &c1, &["ip", "-4", "-o", "addr", "show"]).await;
        assert!(
            addrs.contains(&format!("inet {ip}/24")),
            "guest addresses: {addrs}"
        );
        let (routes, _, _) = exec(&mut cri, &c1, &["ip", "route"]).await;
        assert!(routes.contains("default via"), "guest routes: {routes}");
        let c3 = create_start(
            &mut cri,
            &pod,
            &pod_config,
            cri::web_container("web", "pod-web-ok", 8080),
        )
        .await;
        let t = Instant::now();
        let page = cri::http_get(&ip, 8080, Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        eprintln!("host -> pod HTTP after {:?}", t.elapsed());
        assert!(page.contains("pod-web-ok"), "{page}");
        let (nproc, _, _) = exec(&mut cri, &c1, &["nproc"]).await;
        assert_eq!(nproc.trim(), "2", "io.pangolin.vcpus reached the shim");

        // CRI's own bind mounts (hostname, hosts, resolv.conf) and a hostPath volume written
        // from the pod.
        let (out, err, code) = exec(
            &mut cri,
            &c1,
            &["sh", "-c", "cat /etc/hostname; test -s /etc/resolv.conf && test -s /etc/hosts && echo etc-ok; echo from-pod > /vol/pod.txt"],
        )
        .await;
        assert_eq!((out.as_str(), code), ("pod1\netc-ok\n", 0), "stderr: {err}");
        assert_eq!(
            std::fs::read_to_string(volume_check.join("pod.txt")).expect("volume file"),
            "from-pod\n"
        );
        let (out, err, _) = exec(
            &mut cri,
            &c1,
            &[
                "sh",
                "-c",
                "cat /etc/config/key /etc/app.conf; touch /etc/config/x 2>/dev/null || echo ro-dir; \
                 echo x >> /etc/app.conf 2>/dev/null || echo ro-file",
            ],
        )
        .await;
        assert_eq!(
            out, "configured\nkey=value\nro-dir\nro-file\n",
            "stderr: {err}"
        );

        // ExecSync: separate streams and the exit code.
        let (out, err, code) = exec(
            &mut cri,
            &c1,
            &["sh", "-c", "echo to-out; echo to-err >&2; exit 7"],
        )
        .await;
        assert_eq!(
            (out.as_str(), err.as_str(), code),
            ("to-out\n", "to-err\n", 7)
        );
        let (_, _, code) = exec(&mut cri, &c1, &["sh", "-c", "kill -SEGV $$"]).await;
        assert_eq!(code, 139, "a process killed by SIGSEGV exits 128+11");

        // Container output lands in the CRI log file containerd writes.
        let log = logs.join("c1.log");
        let lines = wait_log(&log, &[("stdout", "hello-cri"), ("stderr", "oops-cri")]).await;
        assert!(
            lines.contains(&("stdout".into(), "hello-cri".into()))
                && lines.contains(&("stderr".into(), "oops-cri".into())),
            "CRI log {}: {lines:?}",
            log.display()
        );

        // ContainerStats from the guest's cgroup.
        let stats = cri
            .runtime
            .container_stats(ContainerStatsRequest {
                container_id: c1.clone(),
            })
            .await
            .expect("ContainerStats")
            .into_inner()
            .stats
            .expect("stats");
        let mem = stats
            .memory
            .and_then(|m| m.working_set_bytes)
            .map_or(0, |v| v.value);
        let cpu = stats
            .cpu
            .and_then(|c| c.usage_core_nano_seconds)
            .map_or(0, |v| v.value);
        eprintln!("ContainerStats c1: working set {mem} B, cpu {cpu} ns");
        assert!(mem > 0, "memory working set: {mem}");
        assert!(cpu > 0, "cpu usage: {cpu}");

        // UpdateContainerResources reaches the container's cgroup in the guest.
        cri.runtime
            .update_container_resources(UpdateContainerResourcesRequest {
                container_id: c1.clone(),
                linux: Some(LinuxContainerResources {
                    memory_limit_in_bytes: 96 << 20,
                    cpu_period: 100_000,
                    cpu_quota: 50_000,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .expect("UpdateContainerResources");
        let (limits, err, _) = exec(
            &mut cri,
            &c1,
            &[
                "sh",
                "-c",
                "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max",
            ],
        )
        .await;
        assert_eq!(
            limits,
            format!("{}\n50000 100000\n", 96 << 20),
            "guest cgroup limits (stderr {err})"
        );

        // Stop and remove one container. It shares the pod's PID namespace (POD mode), so its
        // `sleep` is not PID 1 there and SIGTERM ends it (143), as on runc; in a namespace of
        // its own it would ignore SIGTERM and die of the SIGKILL after the grace period (137).
        assert_eq!(
            container_state(&mut cri, &c2).await.0,
            ContainerState::ContainerRunning as i32
        );
        cri.runtime
            .stop_container(StopContainerRequest {
                container_id: c2.clone(),
                timeout: 1,
            })
            .await
            .expect("StopContainer");
        assert_eq!(
            container_state(&mut cri, &c2).await,
            (ContainerState::ContainerExited as i32, 143)
        );
        cri.runtime
            .remove_container(RemoveContainerRequest {
                container_id: c2.clone(),
            })
            .await
            .expect("RemoveContainer");
        let left = cri
            .runtime
            .list_containers(ListContainersRequest::default())
            .await
            .expect("ListContainers")
            .into_inner()
            .containers;
        let mut left: Vec<&str> = left.iter().map(|c| c.id.as_str()).collect();
        left.sort_unstable();
        let mut want = vec![c1.as_str(), c3.as_str()];
        want.sort_unstable();
        assert_eq!(left, want);

        // Stopping the pod stops its containers and its VM; removal frees everything.
        let t = Instant::now();
        cri.runtime
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await
            .expect("StopPodSandbox");
        eprintln!("StopPodSandbox {:?}", t.elapsed());
        assert_eq!(
            container_state(&mut cri, &c1).await.0,
            ContainerState::ContainerExited as i32
        );
        let st = cri
            .runtime
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: pod.clone(),
                verbose: false,
            })
            .await
            .expect("PodSandboxStatus")
            .into_inner()
            .status
            .expect("status");
        assert_eq!(st.state, PodSandboxState::SandboxNotready as i32);
        assert!(vmm_pids_under(&state).is_empty(), "VM stopped with the pod");
        cri.runtime
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await
            .expect("RemovePodSandbox");
        let pods = cri.pods().await.expect("ListPodSandbox");
        assert!(pods.is_empty(), "pods left: {pods:?}");
        assert!(!Path::new(&netns).exists(), "netns {netns} left");
        assert!(
            volume_check.join("pod.txt").exists(),
            "the hostPath volume's files survive the pod"
        );
        assert!(
            net.leases().is_empty(),
            "IP leases left: {:?}",
            net.leases()
        );

        // A malformed allow-listed annotation fails RunPodSandbox, naming it.
        let bad = cri::pod_config(
            "pod-bad",
            &logs,
            HashMap::from([("io.pangolin.memory_mib".to_string(), "lots".to_string())]),
        );
        let err = refused(&mut cri, &bad, "malformed annotation").await;
        assert!(
            err.message().contains("io.pangolin.memory_mib"),
            "error names the annotation: {err}"
        );
    };
    drive(ctrd, env, net, body);
}

/// The line of `ip -6 addr` output holding `ip`, which must be usable (not tentative or failed
/// duplicate address detection).
fn usable_v6_line<'a>(addrs: &'a str, ip: &str, prefix_len: u8) -> Option<&'a str> {
    let want = format!("inet6 {ip}/{prefix_len} ");
    addrs
        .lines()
        .find(|l| l.contains(&want))
        .filter(|l| !l.contains("tentative") && !l.contains("dadfailed"))
}

#[test]
fn cri_dual_stack_pods_answer_the_host_on_ipv6_and_ipv4_with_runc_and_pangolin() {
    // runc first: the same checks on the reference runtime prove the network itself.
    let CriFixture { env, net, ctrd } =
        CriFixture::with_network("cri-dual", 3, BridgeNetwork::create_dual_stack);
    let logs = env.dir.join("pod-logs");
    let socket = ctrd.socket.clone();
    let state = env.state.clone();
    let leases = Arc::clone(&net);
    let body = async move {
        let subnet6 = leases.subnet6.clone().expect("a dual-stack network");
        let prefix6 = subnet6.trim_end_matches(":/64");
        let prefix4 = leases.subnet.trim_end_matches("0/24");
        let mut cri = Cri::connect(&socket).await.expect("CRI connect");
        for handler in ["runc", PANGOLIN_HANDLER] {
            let config = cri::pod_config(&format!("dual-{handler}"), &logs, HashMap::new());
            let t = Instant::now();
            let pod = cri
                .run_pod(handler, &config)
                .await
                .unwrap_or_else(|e| panic!("RunPodSandbox on {handler}: {e}"));
            eprintln!("{handler}: RunPodSandbox {:?}", t.elapsed());
            // PodSandboxStatus: the IPv4 address first, the IPv6 one as the additional IP.
            let ips = cri.pod_ips(&pod).await.expect("PodSandboxStatus");
            let [ip4, ip6] = ips.as_slice() else {
                panic!("{handler}: two pod IPs expected, got {ips:?}");
            };
            assert!(
                ip4.starts_with(prefix4),
                "{handler}: IPv4 {ip4} not in {}",
                leases.subnet
            );
            assert!(
                ip6.starts_with(prefix6),
                "{handler}: IPv6 {ip6} not in {subnet6}"
            );
            assert_eq!(leases.leases().len(), 2, "{handler}: one lease per family");
            if handler == PANGOLIN_HANDLER {
                assert_eq!(vmm_pids_under(&state).len(), 1, "one VM for the pod");
            }

            let text = format!("dual-stack-{handler}");
            let web = create_start(
                &mut cri,
                &pod,
                &config,
                cri::web_container("web", &text, 8080),
            )
            .await;
            // The pod's view (the guest's, on pangolin): both addresses usable on its NIC, a
            // default route of each family.
            let (addrs, err, code) = exec(&mut cri, &web, &["ip", "-6", "addr", "show"]).await;
            assert_eq!(code, 0, "{handler}: ip -6 addr: {err}");
            assert!(
                usable_v6_line(&addrs, ip6, 64).is_some(),
                "{handler}: {ip6}/64 not usable in the pod:\n{addrs}"
            );
            let (routes6, _, _) = exec(&mut cri, &web, &["ip", "-6", "route", "show"]).await;
            assert!(
                routes6.contains(&format!("default via {prefix6}:1 ")),
                "{handler}: IPv6 routes:\n{routes6}"
            );
            let (addrs4, _, _) = exec(&mut cri, &web, &["ip", "-4", "-o", "addr", "show"]).await;
            assert!(
                addrs4.contains(&format!("inet {ip4}/24")),
                "{handler}: IPv4 addresses:\n{addrs4}"
            );
            let (routes4, _, _) = exec(&mut cri, &web, &["ip", "-4", "route", "show"]).await;
            assert!(
                routes4.contains(&format!("default via {prefix4}1 ")),
                "{handler}: IPv4 routes:\n{routes4}"
            );

            // The host reaches the pod's server on each address.
            for ip in [ip6, ip4] {
                let t = Instant::now();
                let page = cri::http_get(ip, 8080, Duration::from_secs(60))
                    .await
                    .unwrap_or_else(|e| panic!("{handler}: host -> [{ip}]:8080: {e:#}"));
                eprintln!("{handler}: host -> [{ip}]:8080 after {:?}", t.elapsed());
                assert!(page.contains(&text), "{handler} via {ip}: {page}");
            }

            // The pod's own loopback, the server being up by now (the agent brings the guest's
            // loopback up over netlink at boot).
            let (page, err, code) =
                exec(&mut cri, &web, &["wget", "-qO-", "http://[::1]:8080/"]).await;
            assert_eq!(
                (code, page.trim()),
                (0, text.as_str()),
                "{handler}: [::1]: {err}"
            );

            let netns = cri
                .runtime
                .pod_sandbox_status(PodSandboxStatusRequest {
                    pod_sandbox_id: pod.clone(),
                    verbose: true,
                })
                .await
                .map(|st| netns_of(&st.into_inner().info))
                .expect("verbose PodSandboxStatus");
            cri.remove_pod(&pod).await.expect("Stop/RemovePodSandbox");
            assert!(!Path::new(&netns).exists(), "{handler}: netns {netns} left");
            assert!(
                leases.leases().is_empty(),
                "{handler}: leases left: {:?}",
                leases.leases()
            );
            assert!(vmm_pids_under(&state).is_empty(), "{handler}: VM left");
        }
    };
    drive(ctrd, env, net, body);
}
