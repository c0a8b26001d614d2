//! CRI pods restored from VM templates, through a real CRI client against a real private
//! containerd with a bridge CNI network. Needs hardware virtualisation (a template boots a real
//! guest on the built-in VMM): `tests/testhost.rs` runs it in the nested test host.

#![allow(clippy::tests_outside_test_module)] // integration tests live at the top of their file

use std::collections::HashMap;
use std::time::Duration;

use pangolin_e2e::cri::{self, BridgeNetwork, Cri};
use pangolin_e2e::cri_pods::{create_start, drive, exec, run_pod, CriFixture};
use pangolin_e2e::TestEnv;

/// CRI pods restored from a VM template with a NIC: the first pod builds it (a guest booted with
/// a tap of its own and the template MAC), each pod's NIC then carries its veth's MAC (the agent
/// sets it), and the pods reach each other across the bridge. Needs hardware virtualisation
/// (the template boots a real guest on the built-in VMM): `tests/testhost.rs` runs it in the
/// nested test host.
#[test]
#[ignore = "needs hardware-virtualisation KVM: tests/testhost.rs runs it in the nested test host"]
fn cri_pods_restored_from_a_template_get_their_own_mac_and_reach_each_other() {
    let name = "cri-tpl";
    let templates = std::env::temp_dir().join(format!(
        "pangolin-e2e-{name}-templates-{}",
        std::process::id()
    ));
    let dir = templates.clone();
    let env = TestEnv::with(name, |c| {
        c.hypervisor.kind = pangolin_runtime_config::HypervisorKind::Builtin;
        c.template.enabled = true;
        c.template.dir = dir;
    });
    let CriFixture { env, net, ctrd } = CriFixture::with_env(env, name, 5, BridgeNetwork::create);
    let logs = env.dir.join("pod-logs");
    let (socket, containerd_log) = (ctrd.socket.clone(), ctrd.log.clone());
    let kept = templates.clone();
    let body = async move {
        let mut cri = Cri::connect(&socket).await.expect("CRI connect");
        let server_config = cri::pod_config("server", &logs, HashMap::new());
        let (server, server_ip) = run_pod(&mut cri, &server_config).await;
        let web = create_start(
            &mut cri,
            &server,
            &server_config,
            cri::web_container("web", "served-by-a-clone", 8080),
        )
        .await;
        let client_config = cri::pod_config("client", &logs, HashMap::new());
        let (client, _) = run_pod(&mut cri, &client_config).await;
        let c = create_start(
            &mut cri,
            &client,
            &client_config,
            cri::container_config("c", &["sleep", "3600"]),
        )
        .await;
        let mut macs = Vec::new();
        for id in [&web, &c] {
            let (mac, _, _) = exec(&mut cri, id, &["cat", "/sys/class/net/eth0/address"]).await;
            assert_ne!(
                mac.trim(),
                pangolin_shim::template::TEMPLATE_MAC,
                "a clone's NIC has its pod's MAC"
            );
            macs.push(mac);
        }
        assert_ne!(macs[0], macs[1], "each pod its own MAC");
        let url = format!("http://{server_ip}:8080/");
        let mut page = String::new();
        for _ in 0..20 {
            let (out, _, code) = exec(&mut cri, &c, &["wget", "-qO-", &url]).await;
            if code == 0 {
                page = out;
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert_eq!(
            page, "served-by-a-clone\n",
            "GET {url} from the client clone"
        );
        let classes: Vec<String> = std::fs::read_dir(&kept)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            classes.iter().any(|c| c.ends_with("-nic")),
            "a template with a NIC was built: {classes:?}"
        );
        // Both pods' shims say so (their logs are in containerd's).
        let log = std::fs::read_to_string(&containerd_log).unwrap_or_default();
        let restored = log.matches("started_from=template").count();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        assert_eq!(
            restored, 2,
            "two pods restored from the template; containerd log ends:\n{tail:?}"
        );
        for pod in [client, server] {
            cri.remove_pod(&pod).await.expect("Stop/RemovePodSandbox");
        }
    };
    drive(ctrd, env, net, body);
    let _ = std::fs::remove_dir_all(&templates);
}
