//! The pod VM's shape: configuration defaults, then the allow-listed `io.pangolin.*` annotations,
//! then the container's own CPU/memory limits (a VM must fit what it runs). A limit raises the
//! VM at most to the host's size (its online CPUs, its memory): Kubernetes lets limits exceed
//! the node, and a VM larger than its host only costs the host (the guest's memory map alone is
//! ~1.5 % of guest RAM), so such a limit is bounded and logged rather than refused.
//!
//! Annotations: `io.pangolin.vcpus` (1-16), `io.pangolin.memory_mib`, `io.pangolin.hypervisor`
//! (`auto|qemu|builtin`). Other `io.pangolin.*` keys are ignored (logged); a malformed value of an
//! allowed key is an error naming it.

use std::collections::HashMap;

use oci_spec::runtime::Spec;
use pangolin_runtime_config::Config;

use super::PodError;

/// Annotation prefix the shim reads.
pub const ANNOTATION_PREFIX: &str = "io.pangolin.";
/// vCPUs of the pod VM.
pub const VCPUS: &str = "io.pangolin.vcpus";
/// Memory of the pod VM in MiB.
pub const MEMORY_MIB: &str = "io.pangolin.memory_mib";
/// Backend for the pod VM.
pub const HYPERVISOR: &str = "io.pangolin.hypervisor";
/// Guest memory kept for the kernel and agent on top of a container's memory limit.
pub const MEMORY_OVERHEAD_MIB: u64 = 64;

fn bad(key: &str, value: &str, why: impl std::fmt::Display) -> PodError {
    PodError::Invalid {
        what: "annotation",
        why: format!("{key}={value:?}: {why}"),
    }
}

/// How large a VM this host can give a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostSize {
    /// Online CPUs.
    pub cpus: u8,
    /// MemTotal, in MiB.
    pub memory_mib: u32,
}

impl HostSize {
    /// This host's (`available_parallelism`, `/proc/meminfo`); the VM maxima (16 vCPUs,
    /// 65536 MiB) where either cannot be read.
    pub fn probe() -> HostSize {
        let cpus = std::thread::available_parallelism()
            .map(|n| u8::try_from(n.get()).unwrap_or(u8::MAX))
            .unwrap_or(16);
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                let kib: u64 = m
                    .lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .ok()?;
                u32::try_from(kib >> 10).ok()
            })
            .unwrap_or(65_536);
        HostSize { cpus, memory_mib }
    }
}

/// The VM configuration for a pod whose first task has `spec`, on this host.
///
/// # Errors
/// [`PodError::Invalid`] naming the annotation whose value is malformed or out of range.
pub fn vm_config(base: &Config, spec: &Spec) -> Result<Config, PodError> {
    vm_config_on(base, spec, HostSize::probe())
}

/// [`vm_config`] on a host of `host`'s size.
///
/// # Errors
/// As [`vm_config`].
pub fn vm_config_on(base: &Config, spec: &Spec, host: HostSize) -> Result<Config, PodError> {
    let mut config = base.clone();
    let empty = HashMap::new();
    let annotations = spec.annotations().as_ref().unwrap_or(&empty);
    for (key, value) in annotations {
        if !key.starts_with(ANNOTATION_PREFIX) {
            continue;
        }
        match key.as_str() {
            VCPUS => config.hypervisor.vcpus = value.parse().map_err(|e| bad(key, value, e))?,
            MEMORY_MIB => {
                config.hypervisor.memory_mib = value.parse().map_err(|e| bad(key, value, e))?
            }
            HYPERVISOR => config.hypervisor.kind = value.parse().map_err(|e| bad(key, value, e))?,
            _ => tracing::info!(%key, "ignoring an unknown io.pangolin annotation"),
        }
        if let Err(e) = config.validate() {
            return Err(bad(key, value, e));
        }
    }
    let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
    if let Some(limit) = resources
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.limit())
        .and_then(|l| u64::try_from(l).ok())
    {
        let need = (limit >> 20).saturating_add(MEMORY_OVERHEAD_MIB);
        let need = u32::try_from(need).unwrap_or(u32::MAX);
        let bound = host.memory_mib.clamp(64, 65_536);
        if need > bound {
            tracing::info!(
                limit,
                vm_memory_mib = bound,
                "linux.resources.memory.limit is beyond this host's memory: the VM gets the host's size"
            );
        }
        config.hypervisor.memory_mib = config.hypervisor.memory_mib.max(need.min(bound));
    }
    if let Some(cpu) = resources.and_then(|r| r.cpu().as_ref()) {
        if let (Some(quota), Some(period)) = (cpu.quota(), cpu.period()) {
            if quota > 0 && period > 0 {
                let quota = u64::try_from(quota).unwrap_or(0);
                let need = quota.div_ceil(period);
                let bound = host.cpus.clamp(1, 16);
                if need > u64::from(bound) {
                    tracing::info!(
                        quota,
                        period,
                        vcpus = bound,
                        "linux.resources.cpu quota is beyond this host's CPUs: the VM gets the host's"
                    );
                }
                let cpus = u8::try_from(need.min(u64::from(bound))).unwrap_or(bound);
                config.hypervisor.vcpus = config.hypervisor.vcpus.max(cpus);
            }
        }
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pangolin_runtime_config::HypervisorKind;

    fn spec(json: &str) -> Spec {
        serde_json::from_str(json).expect("spec")
    }

    #[test]
    fn annotations_override_and_bad_ones_are_named() {
        let base = Config::default();
        let s = spec(
            r#"{"ociVersion":"1.0.2","annotations":{"io.pangolin.vcpus":"2","io.pangolin.memory_mib":"512","io.pangolin.hypervisor":"qemu","io.pangolin.unknown":"x","other":"y"}}"#,
        );
        let c = vm_config(&base, &s).expect("config");
        assert_eq!((c.hypervisor.vcpus, c.hypervisor.memory_mib), (2, 512));
        assert_eq!(c.hypervisor.kind, HypervisorKind::Qemu);
        for bad in [
            r#"{"io.pangolin.vcpus":"many"}"#,
            r#"{"io.pangolin.vcpus":"99"}"#,
            r#"{"io.pangolin.memory_mib":"-1"}"#,
            r#"{"io.pangolin.hypervisor":"xen"}"#,
        ] {
            let s = spec(&format!(r#"{{"ociVersion":"1.0.2","annotations":{bad}}}"#));
            let err = vm_config(&base, &s).expect_err(bad).to_string();
            assert!(err.contains("io.pangolin."), "{err}");
        }
    }

    const BIG_HOST: HostSize = HostSize {
        cpus: 64,
        memory_mib: 1 << 20,
    };

    #[test]
    fn absurd_limits_give_a_vm_of_the_hosts_size() {
        let base = Config::default();
        let host = HostSize {
            cpus: 2,
            memory_mib: 23_000,
        };
        // 10^12 bytes and 10^12 CPUs' worth of quota.
        let s = spec(
            r#"{"ociVersion":"1.0.2","linux":{"resources":{"memory":{"limit":1000000000000},"cpu":{"quota":100000000000000000,"period":100000}}}}"#,
        );
        let c = vm_config_on(&base, &s, host).expect("config");
        assert_eq!((c.hypervisor.vcpus, c.hypervisor.memory_mib), (2, 23_000));
        // A huge host still stops at the VM maxima; a limit of 0 changes nothing.
        let c = vm_config_on(&base, &s, BIG_HOST).expect("config");
        assert_eq!((c.hypervisor.vcpus, c.hypervisor.memory_mib), (16, 65_536));
        let zero = spec(
            r#"{"ociVersion":"1.0.2","linux":{"resources":{"memory":{"limit":0},"cpu":{"quota":0,"period":100000}}}}"#,
        );
        let c = vm_config_on(&base, &zero, host).expect("config");
        assert_eq!(
            (c.hypervisor.vcpus, c.hypervisor.memory_mib),
            (base.hypervisor.vcpus, base.hypervisor.memory_mib)
        );
        assert!(HostSize::probe().cpus >= 1 && HostSize::probe().memory_mib >= 64);
    }

    #[test]
    fn container_limits_size_the_vm() {
        let base = Config::default();
        let s = spec(
            r#"{"ociVersion":"1.0.2","linux":{"resources":{"memory":{"limit":1073741824},"cpu":{"quota":250000,"period":100000}}}}"#,
        );
        let c = vm_config_on(&base, &s, BIG_HOST).expect("config");
        assert_eq!(c.hypervisor.memory_mib, 1024 + 64);
        assert_eq!(c.hypervisor.vcpus, 3);
        let small =
            spec(r#"{"ociVersion":"1.0.2","linux":{"resources":{"memory":{"limit":1048576}}}}"#);
        assert_eq!(
            vm_config(&base, &small)
                .expect("config")
                .hypervisor
                .memory_mib,
            base.hypervisor.memory_mib
        );
    }
}
