//! The guest agent's request path short of the host side effects: ttrpc frames (10-byte header,
//! then a `ttrpc::Request` naming the method, as the agent's ttrpc server reads them) or one
//! message directly, decoded as every request type the agent serves and every reply type the
//! shim decodes (`pangolin-protocols`, rust-protobuf), then the agent's own request checks:
//! container and exec ids (`check_id`), OCI spec JSON through `prepare_spec` and back to JSON,
//! OCI process JSON, resources JSON, signal numbers, terminal sizes, and SetupNetwork
//! (`net::plan`, with a fake NIC lookup in place of sysfs). Errors go through the agent's
//! mapping onto ttrpc statuses.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use oci_spec::runtime::{LinuxResources, Process, Spec};
use pangolin_agent::error::{check_id, AgentError};
use pangolin_agent::sandbox::prepare_spec;
use pangolin_agent::service::{signal_field, u16_field};
use pangolin_protocols::agent::*;
use protobuf::Message;
use ttrpc::proto::{GenMessage, MESSAGE_TYPE_REQUEST};

fn status(r: Result<(), AgentError>) {
    if let Err(e) = r {
        let _ = ttrpc::Error::from(e).to_string();
    }
}

fn decode<M: Message>(b: &[u8]) -> Option<M> {
    M::parse_from_bytes(b).ok()
}

fn create(req: &CreateContainerRequest) -> Result<(), AgentError> {
    check_id(&req.container_id)?;
    let mut spec: Spec = serde_json::from_str(&req.oci_spec_json).map_err(|e| AgentError::Invalid {
        field: "oci_spec_json",
        reason: e.to_string(),
    })?;
    let rootfs = Path::new(&req.rootfs);
    if !rootfs.is_absolute() {
        return Ok(());
    }
    let cgroups = prepare_spec(&mut spec, &req.container_id, rootfs)?;
    assert!(cgroups.is_absolute(), "cgroupsPath {}", cgroups.display());
    assert!(spec.hooks().is_none(), "hooks survive prepare_spec");
    let json = serde_json::to_vec(&spec).map_err(AgentError::Encode)?;
    let again: Spec = serde_json::from_slice(&json).map_err(AgentError::Encode)?;
    assert!(again.hooks().is_none());
    Ok(())
}

fn exec(req: &ExecProcessRequest) -> Result<(), AgentError> {
    check_id(&req.exec_id)?;
    let process: Process = serde_json::from_str(&req.process_json).map_err(|e| AgentError::Invalid {
        field: "process_json",
        reason: e.to_string(),
    })?;
    let _ = serde_json::to_vec(&process).map_err(AgentError::Encode)?;
    Ok(())
}

fn network(req: &SetupNetworkRequest) -> Result<(), AgentError> {
    // The guest NIC: any MAC of the usual 17 characters is "found".
    let nic = |mac: &str| (mac.len() == 17).then(|| ("eth0".to_string(), 2));
    let plan = pangolin_agent::net::plan(req, nic)?;
    // On-link routes are applied first.
    let first_gw = plan.routes.iter().position(|r| r.gateway.is_some());
    if let Some(i) = first_gw {
        assert!(plan.routes[i..].iter().all(|r| r.gateway.is_some()), "route order");
    }
    Ok(())
}

/// Decodes `payload` as request type `method` and runs the agent's checks on it.
fn request(method: &str, payload: &[u8]) {
    match method {
        "GetGuestDetails" => drop(decode::<GuestDetailsRequest>(payload)),
        "Check" => drop(decode::<CheckRequest>(payload)),
        "CreateContainer" => {
            if let Some(r) = decode::<CreateContainerRequest>(payload) {
                status(create(&r));
            }
        }
        "StartContainer" | "PauseContainer" | "ResumeContainer" | "StatsContainer"
        | "ListProcesses" | "RemoveContainer" => {
            if let Some(r) = decode::<ContainerRequest>(payload) {
                status(check_id(&r.container_id));
            }
        }
        "ExecProcess" => {
            if let Some(r) = decode::<ExecProcessRequest>(payload) {
                status(exec(&r));
            }
        }
        "SignalProcess" => {
            if let Some(r) = decode::<SignalProcessRequest>(payload) {
                status(signal_field(r.signal).map(drop));
            }
        }
        "WaitProcess" | "RemoveProcess" | "CloseStdin" => drop(decode::<ProcessRequest>(payload)),
        "WriteStdin" => drop(decode::<WriteStreamRequest>(payload)),
        "ReadStdout" | "ReadStderr" => drop(decode::<ReadStreamRequest>(payload)),
        "ResizeTty" => {
            if let Some(r) = decode::<ResizeTtyRequest>(payload) {
                status(u16_field(r.rows, "rows").and(u16_field(r.cols, "cols")).map(drop));
            }
        }
        "UpdateContainer" => {
            if let Some(r) = decode::<UpdateContainerRequest>(payload) {
                let _ = serde_json::from_str::<LinuxResources>(&r.resources_json);
            }
        }
        "GetOomEvent" => drop(decode::<GetOomEventRequest>(payload)),
        "DestroySandbox" => drop(decode::<DestroySandboxRequest>(payload)),
        "SetupNetwork" => {
            if let Some(r) = decode::<SetupNetworkRequest>(payload) {
                status(network(&r));
            }
        }
        _ => {}
    }
}

/// Decodes `payload` as every reply the shim reads from the agent.
fn replies(payload: &[u8]) {
    drop(decode::<Empty>(payload));
    drop(decode::<GuestDetails>(payload));
    drop(decode::<CheckResponse>(payload));
    drop(decode::<StartResponse>(payload));
    drop(decode::<WaitProcessResponse>(payload));
    drop(decode::<WriteStreamResponse>(payload));
    drop(decode::<ReadStreamResponse>(payload));
    drop(decode::<ContainerStats>(payload));
    drop(decode::<ListProcessesResponse>(payload));
    drop(decode::<OomEvent>(payload));
}

const METHODS: [&str; 22] = [
    "GetGuestDetails", "Check", "CreateContainer", "StartContainer", "ExecProcess",
    "SignalProcess", "WaitProcess", "RemoveProcess", "WriteStdin", "CloseStdin", "ReadStdout",
    "ReadStderr", "ResizeTty", "PauseContainer", "ResumeContainer", "UpdateContainer",
    "StatsContainer", "ListProcesses", "RemoveContainer", "GetOomEvent", "DestroySandbox",
    "SetupNetwork",
];

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("tokio runtime")
    })
}

/// A ttrpc connection's bytes: frames until one does not parse.
fn frames(mut wire: &[u8]) {
    for _ in 0..16 {
        let Ok(msg) = runtime().block_on(GenMessage::read_from(&mut wire)) else { return };
        if msg.header.type_ != MESSAGE_TYPE_REQUEST {
            replies(&msg.payload);
            continue;
        }
        let Some(req) = decode::<ttrpc::Request>(&msg.payload) else { continue };
        request(&req.method, &req.payload);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match usize::from(mode) {
        // One message of method METHODS[mode].
        m if m < METHODS.len() => request(METHODS[m], rest),
        m if m == METHODS.len() => replies(rest),
        _ => frames(rest),
    }
});
