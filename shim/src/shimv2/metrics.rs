//! Guest cgroup statistics as containerd's cgroup v2 `Metrics` (what `ctr task metrics` and the
//! CRI plugin decode): the guest is cgroup v2 whatever the host runs.

use containerd_shim::protos::cgroups_v2::metrics::{CPUStat, MemoryStat, Metrics, PidsStat};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message;
use pangolin_protocols::agent::ContainerStats;

use super::PodError;

/// The type URL containerd registers for cgroup v2 metrics.
pub const METRICS_V2_TYPE: &str = "io.containerd.cgroups.v2.Metrics";

/// `stats` packed as an `Any` of [`METRICS_V2_TYPE`].
pub fn to_any(stats: &ContainerStats) -> Result<Any, PodError> {
    let mut m = Metrics::new();
    if let Some(c) = stats.cpu.as_ref() {
        let mut cpu = CPUStat::new();
        cpu.usage_usec = c.usage_usec;
        cpu.user_usec = c.user_usec;
        cpu.system_usec = c.system_usec;
        cpu.nr_periods = c.nr_periods;
        cpu.nr_throttled = c.nr_throttled;
        cpu.throttled_usec = c.throttled_usec;
        m.cpu = protobuf::MessageField::some(cpu);
    }
    if let Some(mem) = stats.memory.as_ref() {
        let mut s = MemoryStat::new();
        s.usage = mem.usage_bytes;
        s.usage_limit = mem.limit_bytes;
        s.max_usage = mem.peak_bytes;
        s.anon = mem.anon_bytes;
        s.file = mem.file_bytes;
        s.kernel_stack = mem.kernel_bytes;
        m.memory = protobuf::MessageField::some(s);
    }
    if let Some(p) = stats.pids.as_ref() {
        let mut s = PidsStat::new();
        s.current = p.current;
        s.limit = p.limit;
        m.pids = protobuf::MessageField::some(s);
    }
    let value = m.write_to_bytes().map_err(|e| PodError::Invalid {
        what: "metrics",
        why: e.to_string(),
    })?;
    let mut any = Any::new();
    any.type_url = METRICS_V2_TYPE.into();
    any.value = value;
    Ok(any)
}
