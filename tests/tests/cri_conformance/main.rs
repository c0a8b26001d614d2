//! Pangolin's CRI conformance suite: what a CRI runtime promises, group by group, each
//! behaviour run against both runtime handlers (`runc`, the reference, and `pangolin`) of one
//! real private containerd with CRI and a bridge CNI network, through the `k8s-cri` client.
//!
//! Written for this project from the CRI API's documented behaviour (one case per behaviour,
//! named for it). Where Pangolin differs from runc by design, the case asserts the documented
//! difference for each handler (README, "CRI conformance").
//!
//! A custom harness (libtest-mimic, same command line and output as libtest) so the suite
//! shares one containerd: `cargo test --test cri_conformance -- security::` runs one group.
//! Trials are named `<group>::<behaviour>::<handler>`. After the run, every pod is removed
//! through CRI and the leak checks of [`pangolin_e2e::finish_containerd`] run; a leak fails the
//! run. Every case also checks that CRI lists none of its pods or containers afterwards.

mod containers;
mod context;
mod images;
mod lifecycle;
mod mounts;
mod namespaces;
mod networking;
mod pods;
mod runtime;
mod security;
mod streaming;
mod support;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};
use pangolin_e2e::containerd::Options;
use pangolin_e2e::cri::{self, BridgeNetwork};
use pangolin_e2e::{busybox, finish_containerd, pangolin_containerd, TestEnv};

use support::{Body, Case, Fixture, Handler};

/// A case that runs longer than this fails (a hung VM must not stall the suite).
const CASE_TIMEOUT: Duration = Duration::from_secs(300);

/// The suite's bridge network tag (subnet 10.231.40.0/24, bridge pgn-cri40).
const NET_TAG: u8 = 40;

/// Every case: (group, behaviour, body).
macro_rules! cases {
    ($($group:ident :: $name:ident),* $(,)?) => {
        vec![$((stringify!($group), stringify!($name), {
            fn body(c: &mut Case) -> std::pin::Pin<Box<
                dyn std::future::Future<Output = anyhow::Result<()>> + Send + '_>> {
                Box::pin($group::$name(c))
            }
            body as Body
        })),*]
    };
}

fn cases() -> Vec<(&'static str, &'static str, Body)> {
    cases![
        runtime::version_names_the_runtime_and_the_cri_api,
        runtime::status_reports_the_runtime_and_its_network_ready,
        pods::a_pods_status_keeps_its_metadata_labels_annotations_and_ip,
        pods::list_pod_sandbox_filters_by_id_state_and_labels,
        pods::a_pods_hostname_and_dns_config_are_what_its_containers_see,
        pods::stop_and_remove_of_a_pod_are_idempotent,
        pods::a_host_port_mapping_reaches_the_container_until_the_pod_is_removed,
        containers::a_containers_status_keeps_what_it_was_created_with_through_its_states,
        containers::list_containers_filters_by_id_state_pod_and_labels,
        containers::a_container_is_removed_created_running_or_exited,
        containers::exec_sync_past_its_timeout_ends_with_an_error,
        containers::container_stats_report_memory_and_cpu_and_list_by_pod,
        containers::update_container_resources_changes_the_limit_the_container_sees,
        context::a_read_only_rootfs_refuses_writes_but_its_tmpfs_takes_them,
        context::the_kubelets_masked_and_read_only_proc_paths_are_in_effect,
        context::a_privileged_container_has_every_capability_and_a_writable_proc_sys,
        images::an_image_pulled_by_tag_and_by_digest_runs_and_is_removed_by_every_name,
        images::a_pull_of_an_image_the_registry_lacks_fails_naming_it,
        images::image_fs_info_reports_the_image_filesystem_and_its_use,
        networking::a_containers_eth0_has_the_pod_ip,
        networking::a_server_in_one_pod_answers_a_client_in_another_at_its_pod_ip,
        networking::a_container_granted_net_admin_makes_a_bridge_and_veths_in_its_pod,
        lifecycle::a_pod_is_ready_until_it_is_stopped,
        lifecycle::a_containers_exit_code_and_times_are_reported,
        lifecycle::a_containers_output_reaches_its_log_by_stream,
        lifecycle::stop_sends_sigterm_then_sigkill_after_the_grace_period,
        lifecycle::a_flood_of_output_reaches_its_log_whole_and_in_order,
        lifecycle::reopen_container_log_starts_a_fresh_file_at_the_log_path,
        lifecycle::a_container_over_its_memory_limit_is_oom_killed,
        security::exec_gets_the_containers_seccomp_filter_capabilities_and_limits,
        security::exec_as_a_user_keeps_the_containers_identity_and_filter,
        security::exec_keeps_no_new_privs,
        security::a_localhost_seccomp_profile_confines_init_and_exec,
        security::an_unconfined_container_and_its_execs_have_no_filter,
        security::a_container_run_as_a_user_name_gets_the_images_ids_for_it,
        namespaces::containers_of_a_pod_share_its_pid_namespace,
        namespaces::a_container_in_container_pid_mode_has_a_namespace_of_its_own,
        namespaces::containers_of_a_pod_share_its_ipc_namespace_and_its_sysctls,
        namespaces::a_host_pid_pod_shares_the_hosts_pid_namespace_or_is_refused,
        namespaces::a_host_ipc_pod_shares_the_hosts_ipc_namespace_or_is_refused,
        mounts::volumes_share_files_with_the_host_and_a_read_only_one_refuses_writes,
        mounts::a_host_to_container_volume_sees_host_mounts_made_after_the_start,
        mounts::a_bidirectional_volume_is_mounted_or_refused_saying_why,
        streaming::exec_streams_stdout_stderr_and_the_exit_code,
        streaming::exec_with_a_tty_and_stdin_runs_an_interactive_shell,
        streaming::exec_with_stdin_and_no_tty_reads_what_is_sent,
        streaming::attach_reaches_the_containers_stdin_and_stdout,
        streaming::attach_with_a_tty_reaches_the_containers_shell,
        streaming::port_forward_reaches_a_server_on_the_pods_loopback,
        streaming::port_forward_reaches_a_server_on_every_address,
        streaming::port_forward_to_a_closed_port_reports_an_error,
    ]
}

/// The shared fixture, made by the first case that runs (listing makes none).
static FIXTURE: Mutex<Option<Result<Arc<Fixture>, String>>> = Mutex::new(None);

fn fixture() -> Result<Arc<Fixture>, String> {
    let mut slot = FIXTURE.lock().unwrap_or_else(|p| p.into_inner());
    slot.get_or_insert_with(|| make_fixture().map(Arc::new).map_err(|e| format!("{e:#}")))
        .clone()
}

fn make_fixture() -> anyhow::Result<Fixture> {
    let env = TestEnv::new("cri-conformance");
    let net = BridgeNetwork::create_with_port_mappings(
        &env.dir.join("containerd"),
        "pangolin-conformance",
        NET_TAG,
    )?;
    let ctrd = pangolin_containerd(
        &env,
        Options {
            cri: true,
            ..Options::default()
        },
    );
    cri::import_images(&ctrd, &busybox())?;
    let cases_dir = env.dir.join("cases");
    std::fs::create_dir_all(&cases_dir)?;
    Ok(Fixture {
        env,
        net,
        ctrd,
        cases_dir,
        registry: OnceLock::new(),
    })
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("tokio runtime: {e}"))
    })
}

/// Cases run and time spent, per group.
static GROUPS: Mutex<BTreeMap<&'static str, (usize, Duration)>> = Mutex::new(BTreeMap::new());

fn run_case(group: &'static str, handler: Handler, body: Body) -> Result<(), Failed> {
    let fixture = fixture()?;
    let t = Instant::now();
    let result = runtime().block_on(async {
        let mut case = Case::new(Arc::clone(&fixture), handler).await?;
        let outcome = tokio::time::timeout(CASE_TIMEOUT, body(&mut case)).await;
        let finished = case.finish().await;
        match outcome {
            Err(_) => anyhow::bail!("did not finish within {CASE_TIMEOUT:?}"),
            Ok(result) => result?,
        }
        finished
    });
    let mut groups = GROUPS.lock().unwrap_or_else(|p| p.into_inner());
    let entry = groups.entry(group).or_default();
    entry.0 += 1;
    entry.1 += t.elapsed();
    drop(groups);
    result.map_err(|e| {
        Failed::from(format!(
            "{e:#}\n--- containerd log (last 20 lines) ---\n{}",
            fixture.ctrd.log_tail(20)
        ))
    })
}

/// Removes every pod left, stops containerd and runs the leak checks.
fn teardown() -> Result<(), String> {
    let taken = FIXTURE.lock().unwrap_or_else(|p| p.into_inner()).take();
    let Some(Ok(fixture)) = taken else {
        return Ok(());
    };
    let fixture = Arc::try_unwrap(fixture).map_err(|_| "fixture still in use".to_string())?;
    let left = runtime().block_on(cri::remove_all_pods(&fixture.ctrd.socket));
    let Fixture {
        env,
        net,
        ctrd,
        registry,
        ..
    } = fixture;
    // The registry goes first: nothing of the suite's may outlive the leak checks.
    drop(registry);
    let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        finish_containerd(ctrd, env);
    }));
    drop(net);
    if !left.is_empty() {
        return Err(format!("pods left after the suite: {left:?}"));
    }
    checked.map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_string()))
            .unwrap_or_else(|| "leak check failed".into())
    })
}

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let trials = cases()
        .into_iter()
        .flat_map(|(group, name, body)| {
            Handler::ALL.map(|handler| {
                Trial::test(format!("{group}::{name}::{}", handler.name()), move || {
                    run_case(group, handler, body)
                })
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    let groups = GROUPS.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for (group, (count, time)) in &groups {
        eprintln!("cri_conformance: group {group}: {count} cases, {time:.1?} case time");
    }
    if let Err(e) = teardown() {
        eprintln!("cri_conformance: teardown: {e}");
        return ExitCode::FAILURE;
    }
    conclusion.exit_code()
}
