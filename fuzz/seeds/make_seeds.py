#!/usr/bin/env python3
"""Writes the seed corpora of the byte-level fuzz targets from the unit tests' test vectors.

Run from the repository root: `python3 fuzz/seeds/make_seeds.py`. It takes
- every JSON OCI spec (`{"ociVersion"...}`) and every JSON object literal of the shim's and
  agent's unit tests, for `shim_bundle` and as the spec/process/resources of `agent_requests`;
- the shipped `runtime-config/configuration.toml` and the TOML strings of runtime-config's tests,
  for `runtime_config`;
- the requests the agent's tests build (ids, specs, processes, signals, tty sizes, SetupNetwork
  interfaces and routes), protobuf-encoded by hand below (field numbers from agent.proto), one
  per method (`agent_requests` mode byte = method index) and wrapped in ttrpc frames.
The structured (arbitrary-decoded) virtio targets are seeded by `cargo xtask fuzz` runs, kept
minimised with `cargo fuzz cmin` (see fuzz/README.md).
"""
import hashlib, json, os, re, struct, sys

ROOT = os.getcwd()
OUT = os.path.join(ROOT, "fuzz", "corpus")

def rust_sources(*dirs):
    for d in dirs:
        for base, _, files in os.walk(os.path.join(ROOT, d)):
            for f in files:
                if f.endswith(".rs"):
                    yield open(os.path.join(base, f), encoding="utf-8").read()

def raw_strings(text):
    # r#"..."# literals
    return re.findall(r'r#"(.*?)"#', text, re.S)

def plain_strings(text):
    out = []
    for m in re.finditer(r'(?<![r#\w])"((?:[^"\\]|\\.)*)"', text):
        s = m.group(1)
        try:
            s = bytes(s, "utf-8").decode("unicode_escape")
        except Exception:
            continue
        out.append(s)
    return out

def write(target, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    name = hashlib.sha1(data).hexdigest()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

# --- protobuf encoding (proto3: varint, length-delimited) ---
def varint(n):
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)

def fld(num, value):
    if isinstance(value, bool):
        return varint(num << 3) + varint(int(value))
    if isinstance(value, int):
        return varint(num << 3) + varint(value)
    if isinstance(value, str):
        value = value.encode()
    return varint((num << 3) | 2) + varint(len(value)) + value

def msg(*fields):
    return b"".join(fld(n, v) for n, v in fields if v not in (None, "", 0, False, b""))

METHODS = ["GetGuestDetails", "Check", "CreateContainer", "StartContainer", "ExecProcess",
           "SignalProcess", "WaitProcess", "RemoveProcess", "WriteStdin", "CloseStdin",
           "ReadStdout", "ReadStderr", "ResizeTty", "PauseContainer", "ResumeContainer",
           "UpdateContainer", "StatsContainer", "ListProcesses", "RemoveContainer", "GetOomEvent",
           "DestroySandbox", "SetupNetwork"]

def ttrpc_frame(method, payload, stream_id=1):
    req = msg((1, "pangolin.agent.v1.AgentService"), (2, method), (3, payload), (4, 10_000_000_000))
    return struct.pack(">IIBB", len(req), stream_id, 1, 0) + req

def main():
    shim_agent = "\n".join(rust_sources("shim/src", "agent/src"))
    json_objs = []
    for s in raw_strings(shim_agent) + plain_strings(shim_agent):
        s = s.strip()
        if s.startswith("{") and s.endswith("}"):
            try:
                json.loads(s)
            except Exception:
                continue
            json_objs.append(s)
    specs = [s for s in json_objs if '"ociVersion"' in s]
    for s in specs:
        write("shim_bundle", s)
    write("shim_bundle", json.dumps({
        "ociVersion": "1.0.2", "hostname": "c1",
        "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
        "root": {"path": "rootfs", "readonly": True},
        "mounts": [{"destination": "/data", "type": "bind", "source": "/var/data",
                    "options": ["rbind", "rro"]}],
        "hooks": {"prestart": [{"path": "/bin/true"}]},
        "annotations": {"io.pangolin.vcpus": "2", "io.pangolin.memory_mib": "512"},
        "linux": {"namespaces": [{"type": "network", "path": "/var/run/netns/cni-1"},
                                 {"type": "uts", "path": "/proc/1/ns/uts"}, {"type": "pid"}],
                  "resources": {"memory": {"limit": 1073741824},
                                "cpu": {"quota": 250000, "period": 100000}}}}))

    # runtime_config
    write("runtime_config", open(os.path.join(ROOT, "runtime-config/configuration.toml")).read())
    rc = "\n".join(rust_sources("runtime-config/src"))
    for s in raw_strings(rc) + plain_strings(rc):
        if "[" in s and "=" in s and len(s) < 4000:
            write("runtime_config", s)

    # agent_requests: one message per method (mode byte = index), plus ttrpc frames.
    spec = specs[0] if specs else '{"ociVersion":"1.0.2"}'
    processes = [s for s in json_objs if '"args"' in s and '"ociVersion"' not in s]
    process = processes[0] if processes else '{"args":["true"],"cwd":"/"}'
    resources = '{"memory":{"limit":268435456},"cpu":{"shares":512,"quota":50000,"period":100000}}'
    iface = msg((1, "02:50:47:00:00:01"), (2, 1500), (3, "10.88.0.5/16")) + fld(3, "fd00:88::5/64")
    routes = [msg((1, "0.0.0.0/0"), (2, "10.88.0.1")), msg((1, "::/0"), (2, "fd00:88::1")),
              msg((1, "10.96.0.0/12"))]
    network = fld(1, iface) + b"".join(fld(2, r) for r in routes)
    ids = msg((1, "c1"), (2, "exec-1"))
    bodies = {
        "GetGuestDetails": msg((1, 1_700_000_000_000_000_000)),
        "Check": b"",
        "CreateContainer": msg((1, "c1"), (2, spec), (3, "/run/pangolin/shared/c1/rootfs"), (4, True)),
        "StartContainer": msg((1, "c1")),
        "ExecProcess": msg((1, "c1"), (2, "exec-1"), (3, process), (4, True)),
        "SignalProcess": msg((1, "c1"), (2, "exec-1"), (3, 9), (4, True)),
        "WaitProcess": ids, "RemoveProcess": ids, "CloseStdin": ids,
        "WriteStdin": msg((1, "c1"), (2, "exec-1"), (3, b"hello\n")),
        "ReadStdout": msg((1, "c1"), (3, 65536)), "ReadStderr": msg((1, "c1"), (3, 4096)),
        "ResizeTty": msg((1, "c1"), (2, "exec-1"), (3, 24), (4, 80)),
        "PauseContainer": msg((1, "c1")), "ResumeContainer": msg((1, "c1")),
        "UpdateContainer": msg((1, "c1"), (2, resources)),
        "StatsContainer": msg((1, "c1")), "ListProcesses": msg((1, "c1")),
        "RemoveContainer": msg((1, "c1")), "GetOomEvent": b"", "DestroySandbox": b"",
        "SetupNetwork": network,
    }
    for i, m in enumerate(METHODS):
        write("agent_requests", bytes([i]) + bodies[m])
    # Replies the shim decodes (mode byte = len(METHODS)).
    write("agent_requests", bytes([len(METHODS)]) + msg((1, 0), (2, 9), (3, 1_700_000_000)))
    # ttrpc connections: a few requests back to back.
    wire = b"".join(ttrpc_frame(m, bodies[m], 2 * i + 1) for i, m in
                    enumerate(["Check", "CreateContainer", "StartContainer", "SetupNetwork"]))
    write("agent_requests", bytes([0xff]) + wire)
    for s in processes[:4]:
        write("agent_requests", bytes([METHODS.index("ExecProcess")]) + msg((1, "c1"), (2, "e"), (3, s)))
    for s in specs[:8]:
        write("agent_requests", bytes([METHODS.index("CreateContainer")]) +
              msg((1, "c1"), (2, s), (3, "/rootfs")))
    print("seeds:", {t: len(os.listdir(os.path.join(OUT, t))) for t in sorted(os.listdir(OUT))})

main()
