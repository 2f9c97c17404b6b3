"""Checks the gateway example's deploy files against what they deploy (run by .ci/deploy-check).

The Kubernetes schemas only say a manifest is well formed; this says it can work:
- every gateway container's arguments, with the files its volumes mount (the configuration
  embedded in a Secret or ConfigMap), go through the built gateway's `--check-config`, and
  the same arguments start a real gateway against a real redis-server: /healthz answers 200;
- every probe (startup, readiness, liveness) targets an address and a port its own container
  listens on: kubelet sends httpGet / tcpSocket / grpc probes to the pod IP, which a process
  bound to 127.0.0.1 never sees; an exec probe runs inside the pod and may use loopback;
- the gateway's store URL names a Service of the manifest and one of its ports, and a model
  upstream on loopback is a port another container of the pod listens on;
- every Service's targetPort and the prometheus.io/port annotation are ports a container
  exposes and listens on beyond loopback;
- a Redis container's arguments start the real redis-server;
- the Dockerfile compiles the features the embedded configuration needs, and runs as a
  numeric user when the pod says runAsNonRoot (kubelet can't check a user name);
- every metric name in the alerting rules is one examples/gateway/metrics.rs exports (and
  the names a running gateway's /metrics shows are among those read from metrics.rs).

Where a container listens is read from its arguments (and, for the gateway, its
configuration) by the rules of the images this manifest uses; a container of another image
is a problem to teach this script, not a pass.
"""

import argparse
import base64
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path

import yaml

PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job")
WAIT = 15.0  # seconds: the bound of every wait on a child process

problems = []


def problem(where, what):
    problems.append(f"{where}: {what}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def flags(args):
    """`--name value` and `--name=value` into a dict (a flag without a value maps to True)."""
    out, i = {}, 0
    while i < len(args):
        a = str(args[i])
        if a.startswith("--"):
            if "=" in a:
                name, value = a[2:].split("=", 1)
            elif i + 1 < len(args) and not str(args[i + 1]).startswith("--"):
                name, value = a[2:], str(args[i + 1])
                i += 1
            else:
                name, value = a[2:], True
            out[name] = value
        i += 1
    return out


class Listen:
    """Where a container accepts connections: its addresses (all interfaces: 0.0.0.0, ::, *)
    and its port."""

    def __init__(self, hosts, port):
        self.hosts = [h.strip("[]") for h in hosts]
        self.port = int(port)

    def loopback_only(self):
        return all(is_loopback(h) for h in self.hosts)

    def __str__(self):
        return " ".join(f"{h}:{self.port}" for h in self.hosts)


def split_hostport(addr):
    host, _, port = addr.rpartition(":")
    return host, int(port)


def pod_templates(doc):
    kind = doc.get("kind")
    if kind == "Pod":
        return [(doc["metadata"], doc["spec"])]
    if kind in WORKLOADS:
        t = doc["spec"]["template"]
        return [(t.get("metadata", {}), t["spec"])]
    if kind == "CronJob":
        t = doc["spec"]["jobTemplate"]["spec"]["template"]
        return [(t.get("metadata", {}), t["spec"])]
    return []


class Manifest:
    def __init__(self, path):
        self.docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
        self.secrets = {}
        self.config_maps = {}
        self.services = {}
        for d in self.docs:
            name = d.get("metadata", {}).get("name")
            if d.get("kind") == "Secret":
                files = {k: base64.b64decode(v) for k, v in (d.get("data") or {}).items()}
                files.update({k: v.encode() for k, v in (d.get("stringData") or {}).items()})
                self.secrets[name] = files
            elif d.get("kind") == "ConfigMap":
                files = {k: v.encode() for k, v in (d.get("data") or {}).items()}
                files.update(
                    {k: base64.b64decode(v) for k, v in (d.get("binaryData") or {}).items()}
                )
                self.config_maps[name] = files
            elif d.get("kind") == "Service":
                self.services[name] = d

    def volume_files(self, volume):
        """The files a Secret or ConfigMap volume shows, by their path in the mount."""
        if "secret" in volume:
            src = self.secrets.get(volume["secret"]["secretName"])
            items = volume["secret"].get("items")
        elif "configMap" in volume:
            src = self.config_maps.get(volume["configMap"]["name"])
            items = volume["configMap"].get("items")
        else:
            return None
        if src is None:
            return None
        if items:
            return {i["path"]: src[i["key"]] for i in items if i["key"] in src}
        return dict(src)

    def env_value(self, var):
        if "value" in var:
            return str(var["value"])
        ref = var.get("valueFrom", {})
        if "secretKeyRef" in ref:
            r = ref["secretKeyRef"]
            v = self.secrets.get(r["name"], {}).get(r["key"])
        elif "configMapKeyRef" in ref:
            r = ref["configMapKeyRef"]
            v = self.config_maps.get(r["name"], {}).get(r["key"])
        else:
            return None
        return None if v is None else v.decode()


class Gateway:
    """A gateway container's command line, run here with its mounted files written out."""

    def __init__(self, binary, manifest, spec, container, workdir):
        self.binary = binary
        self.mounts = []  # (mountPath, local path)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for m in container.get("volumeMounts", []):
            files = manifest.volume_files(volumes.get(m["name"], {}))
            if files is None:
                continue
            local = Path(workdir) / m["name"]
            for rel, content in files.items():
                (local / rel).parent.mkdir(parents=True, exist_ok=True)
                (local / rel).write_bytes(content)
            if "subPath" in m:
                self.mounts.append((m["mountPath"], str(local / m["subPath"])))
            else:
                self.mounts.append((m["mountPath"].rstrip("/"), str(local)))
        self.env = {}
        self.unresolved_env = []
        for var in container.get("env", []):
            value = manifest.env_value(var)
            if value is None:
                self.unresolved_env.append(var["name"])
            else:
                self.env[var["name"]] = self.local(value)
        self.args = [self.local(str(a)) for a in container.get("args", [])]

    def local(self, value):
        for mount, local in self.mounts:
            if value == mount or value.startswith(mount + "/"):
                return local + value[len(mount):]
        return value

    def run_env(self):
        base = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
        return {**base, **self.env}

    def check_config(self):
        return subprocess.run(
            [self.binary, *self.args, "--check-config"],
            env=self.run_env(),
            capture_output=True,
            text=True,
            timeout=WAIT,
        )

    def config(self):
        f = flags(self.args)
        path = f.get("config") or self.env.get("GATEWAY_CONFIG")
        if not isinstance(path, str):
            return None
        try:
            return tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError):
            return None  # --check-config has said why

    def listen(self, cfg):
        f = flags(self.args)
        addr = f.get("listen") or self.env.get("GATEWAY_LISTEN")
        if not isinstance(addr, str):
            addr = (cfg or {}).get("listen", "127.0.0.1:8080")
        host, port = split_hostport(addr)
        return Listen([host], port)


def listen_of(kind, container, gateway, cfg):
    f = flags(container.get("args", []))
    if kind == "gateway":
        return gateway.listen(cfg)
    if kind == "vllm":
        # `vllm serve`: --host (default: every interface), --port (default 8000).
        return Listen([f.get("host", "0.0.0.0")], f.get("port", 8000))
    if kind == "redis":
        # The official image turns protected mode off: no bind means every interface.
        bind = f.get("bind", "*")
        return Listen(bind.split() if isinstance(bind, str) else ["*"], f.get("port", 6379))
    raise AssertionError(kind)


def kind_of(image):
    name = image.split("@")[0].rsplit("/", 1)[-1].split(":")[0]
    return {"llm-gateway": "gateway", "vllm-openai": "vllm", "redis": "redis"}.get(name)


def port_number(port, container):
    if isinstance(port, int):
        return port
    if str(port).isdigit():
        return int(port)
    for p in container.get("ports", []):
        if p.get("name") == port:
            return p["containerPort"]
    return None


def exec_targets(command):
    """The (host, port) pairs an exec probe's command connects to, as far as can be read."""
    text = " ".join(map(str, command))
    targets = [
        (m.group(1), int(m.group(2)))
        for m in re.finditer(r"\b(?:https?|redis)://\[?([^/:\s'\"\]]+)\]?:(\d+)", text)
    ]
    if command and Path(str(command[0])).name == "redis-cli":
        args = list(map(str, command[1:]))
        opt = lambda o, d: args[args.index(o) + 1] if o in args[:-1] else d  # noqa: E731
        targets.append((opt("-h", "127.0.0.1"), int(opt("-p", "6379"))))
    return targets


def check_probes(where, container, listen):
    for name in PROBES:
        probe = container.get(name)
        if not probe:
            continue
        at = f"{where} {name}"
        network = probe.get("httpGet") or probe.get("tcpSocket") or probe.get("grpc")
        if network is not None:
            port = port_number(network.get("port"), container)
            if port is None:
                problem(at, f"port {network.get('port')!r} is not a port of this container")
                continue
            host = network.get("host")
            if host and is_loopback(host):
                problem(at, f"host {host}: kubelet sends probes from the node, not the pod")
            elif not host and listen.loopback_only():
                problem(
                    at,
                    f"kubelet sends it to the pod IP, port {port}, but the container listens "
                    f"only on {listen}: it can never pass",
                )
            if port != listen.port:
                problem(at, f"port {port}, but the container listens on {listen}")
        elif "exec" in probe:
            targets = exec_targets(probe["exec"].get("command", []))
            if not targets:
                problem(at, "can't tell what this exec probe connects to")
            for host, port in targets:
                if port != listen.port:
                    problem(at, f"connects to {host}:{port}, but the container listens on {listen}")
                elif not is_loopback(host):
                    problem(at, f"connects to {host}: inside the pod, use 127.0.0.1")
        else:
            problem(at, "no httpGet, tcpSocket, grpc or exec")


def check_redis_args(where, container):
    """Starts the real redis-server with the container's arguments (on a free loopback port)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        args = [str(a) for a in container.get("args", [])]
        cmd = ["redis-server", *args, "--port", str(port), "--bind", "127.0.0.1", "--dir", d]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline and proc.poll() is None:
                ping = subprocess.run(
                    ["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True,
                    timeout=WAIT,
                )
                if ping.stdout.strip() == "PONG":
                    return
                time.sleep(0.1)
            out = proc.communicate(timeout=1)[0] if proc.poll() is not None else ""
            problem(where, f"redis-server {' '.join(args)} does not start:\n{out.strip()}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=WAIT)


def live_gateway(gateway):
    """Starts the gateway with the container's arguments in front of a real redis-server (the
    store URL replaced by it, the listen address by a free loopback port): the /metrics
    exposition, or None after recording why it did not start."""
    rport, gport = free_port(), free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", ""],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    gw = None
    try:
        gw = subprocess.Popen(
            [
                gateway.binary, *gateway.args,
                "--listen", f"127.0.0.1:{gport}",
                "--redis", f"redis://127.0.0.1:{rport}",
            ],
            env=gateway.run_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and gw.poll() is None:
            try:
                base = f"http://127.0.0.1:{gport}"
                with urllib.request.urlopen(f"{base}/healthz", timeout=2) as r:
                    if r.status != 200:
                        problem("gateway", f"/healthz answered {r.status}")
                with urllib.request.urlopen(f"{base}/metrics", timeout=2) as r:
                    return r.read().decode()
            except OSError:
                time.sleep(0.1)
        err = gw.communicate(timeout=1)[1] if gw.poll() is not None else "(no answer)"
        problem("gateway", f"did not start with the container's arguments:\n{err.strip()}")
        return None
    finally:
        for p in (gw, redis):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=WAIT)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=WAIT)


def exported_metrics(metrics_rs):
    """The series names metrics.rs exports: registered families and the Redis collector's."""
    src = Path(metrics_rs).read_text()
    prefix = re.search(r'Registry::with_prefix\("(\w+)"\)', src).group(1)
    types = {}
    for field, ty in re.findall(
        r"^\s+(\w+): (Family<\w+, \w+>|HistogramFamily<\w+>|Counter|Gauge|Histogram),$", src, re.M
    ):
        if ty.startswith("Family<"):
            ty = ty.split()[-1][:-1]  # Family<Labels, Counter> -> Counter
        types[field] = "histogram" if "Histogram" in ty else ty
    names = {}
    # re.S: a help string may continue on the next line after a backslash.
    for name, field in re.findall(
        r'register\(\s*"(\w+)",\s*"(?:[^"\\]|\\.)*",\s*m\.(\w+)\.clone\(\)', src, re.S
    ):
        names[name] = types.get(field, "").lower()
    for name in re.findall(r'\(\s*"(\w+)",\s*"(?:[^"\\]|\\.)*",\s*s\.\w+,\s*\)', src):
        names[name] = "counter"
    for name in re.findall(r'encode_descriptor\(\s*"(\w+)"', src):
        names[name] = "gauge"
    series = set()
    for name, ty in names.items():
        full = f"{prefix}_{name}"
        if ty == "counter":
            series.add(f"{full}_total")
        elif ty == "histogram":
            series |= {f"{full}_bucket", f"{full}_sum", f"{full}_count"}
        elif ty == "gauge":
            series.add(full)
        else:
            problem(metrics_rs, f"can't tell the type of metric `{name}`")
    if len(names) < 5:
        problem(metrics_rs, f"read only {len(names)} metric names: has the file changed shape?")
    return series


def scraped_series(text):
    series = set()
    for name, ty in re.findall(r"^# TYPE (\w+) (\w+)$", text, re.M):
        if ty == "counter":
            series.add(name if name.endswith("_total") else f"{name}_total")
        elif ty == "histogram":
            series |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            series.add(name)
    return series


def check_alerts(path, series):
    doc = yaml.safe_load(Path(path).read_text())
    count = 0
    for group in doc.get("groups", []):
        for rule in group.get("rules", []):
            where = f"{path}: alert {rule.get('alert') or rule.get('record')}"
            if "expr" not in rule:
                problem(where, "no expr")
            text = yaml.safe_dump(rule)
            for name in sorted(set(re.findall(r"\b(gateway_[a-z0-9_]+)", text))):
                if name not in series:
                    problem(where, f"`{name}` is not a metric the gateway exports")
            count += 1
    if count == 0:
        problem(path, "no alerting rules found")
    return count


def check_dockerfile(path, needs_redis, run_as_non_root):
    text = Path(path).read_text()
    build = re.search(r"^RUN .*cargo build .*$", text, re.M)
    if not build or "--example gateway" not in build.group(0):
        problem(path, "no `cargo build ... --example gateway` step")
        return
    features = set()
    for m in re.finditer(r"--features[ =]([\w,-]+)", build.group(0)):
        features |= set(m.group(1).split(","))
    if needs_redis and "redis" not in features and "--all-features" not in build.group(0):
        problem(path, "the configuration uses the Redis store, but the build lacks `--features redis`")
    users = re.findall(r"^USER (\S+)", text, re.M)
    if run_as_non_root and (not users or not users[-1].split(":")[0].isdigit()):
        problem(path, "runAsNonRoot needs a numeric USER (kubelet can't resolve a name)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gateway", required=True)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--dockerfile", required=True)
    ap.add_argument("--alerts", required=True)
    ap.add_argument("--metrics-source", required=True)
    a = ap.parse_args()
    for tool in ("redis-server", "redis-cli"):
        if not shutil.which(tool):
            sys.exit(f"deploy-check: `{tool}` is needed")

    manifest = Manifest(a.manifest)
    work = tempfile.TemporaryDirectory()
    needs_redis = False
    non_root = False
    pods = []  # (where, labels, annotations, [(container, kind, listen)])
    first_gateway = None
    for doc in manifest.docs:
        for meta, spec in pod_templates(doc):
            where = f"{doc['kind']}/{doc['metadata']['name']}"
            containers, gateways = [], []
            for c in spec.get("containers", []):
                at = f"{where} container {c['name']}"
                kind = kind_of(c.get("image", ""))
                if kind is None:
                    problem(at, f"image {c.get('image')!r}: this script doesn't know where it listens")
                    continue
                gateway = cfg = None
                if kind == "gateway":
                    gateway = Gateway(a.gateway, manifest, spec, c, tempfile.mkdtemp(dir=work.name))
                    for var in gateway.unresolved_env:
                        problem(at, f"env {var}: its value is not in the manifest")
                    run = gateway.check_config()
                    print(f"  {at}: gateway {' '.join(map(str, c.get('args', [])))} --check-config: "
                          f"exit {run.returncode}")
                    if run.returncode != 0:
                        problem(at, f"--check-config exits {run.returncode}:\n{run.stderr.strip()}")
                    cfg = gateway.config()
                    gateways.append((gateway, cfg))
                    first_gateway = first_gateway or gateway
                    store = (cfg or {}).get("store", {})
                    if store.get("kind") == "redis" or "redis" in flags(gateway.args):
                        needs_redis = True
                    sc = {**spec.get("securityContext", {}), **c.get("securityContext", {})}
                    non_root |= bool(sc.get("runAsNonRoot")) and "runAsUser" not in sc
                elif kind == "redis":
                    check_redis_args(at, c)
                listen = listen_of(kind, c, gateway, cfg)
                print(f"  {at}: listens on {listen}")
                check_probes(at, c, listen)
                declared = {p["containerPort"] for p in c.get("ports", [])}
                if not listen.loopback_only() and listen.port not in declared:
                    problem(at, f"listens on {listen} but doesn't declare containerPort {listen.port}")
                for p in declared - {listen.port}:
                    problem(at, f"declares containerPort {p}, but listens on {listen}")
                containers.append((c, kind, listen))
            pods.append((where, meta.get("labels", {}), meta.get("annotations", {}), containers))
            for gateway, cfg in gateways:
                check_gateway_targets(where, cfg or {}, containers, manifest)

    check_services(manifest, pods)
    check_dockerfile(a.dockerfile, needs_redis, non_root)

    series = exported_metrics(a.metrics_source)
    if first_gateway is not None:
        text = live_gateway(first_gateway)
        if text is not None:
            print("  gateway: started with the container's arguments, /healthz 200")
            for name in sorted(scraped_series(text) - series):
                problem(a.metrics_source, f"/metrics shows `{name}`, not read from this file")
    n = check_alerts(a.alerts, series)
    print(f"  {a.alerts}: {n} rules, metric names checked against {len(series)} series")

    if problems:
        print(f"deploy-check: {len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"- {p}", file=sys.stderr)
        sys.exit(1)
    print("deploy-check: ok")


def check_gateway_targets(where, cfg, containers, manifest):
    url = cfg.get("store", {}).get("url")
    if cfg.get("store", {}).get("kind") == "redis" and url:
        m = re.match(r"rediss?://(?:[^@/]*@)?([^:/]+)(?::(\d+))?", url)
        host, port = (m.group(1), int(m.group(2) or 6379)) if m else (None, None)
        svc = manifest.services.get((host or "").split(".")[0])
        if svc is None:
            problem(where, f"store.url {url}: {host} is not a Service of this manifest")
        elif port not in [p["port"] for p in svc["spec"].get("ports", [])]:
            problem(where, f"store.url {url}: Service {host} has no port {port}")
    for name, model in cfg.get("models", {}).items():
        m = re.match(r"https?://\[?([^/\]]+?)\]?:(\d+)", model.get("upstream", ""))
        if m and is_loopback(m.group(1)):
            port = int(m.group(2))
            if not any(listen.port == port for _, _, listen in containers):
                problem(where, f"model {name}: upstream {model['upstream']}: no container of "
                        f"the pod listens on port {port}")


def check_services(manifest, pods):
    for name, svc in manifest.services.items():
        selector = svc["spec"].get("selector", {})
        chosen = [p for p in pods if selector and selector.items() <= p[1].items()]
        if not chosen:
            problem(f"Service/{name}", f"selector {selector} matches no pod template")
        for port in svc["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            for where, _, _, containers in chosen:
                ok = any(
                    port_number(target, c) == listen.port and not listen.loopback_only()
                    and port_number(target, c) in {p["containerPort"] for p in c.get("ports", [])}
                    for c, _, listen in containers
                )
                if not ok:
                    problem(f"Service/{name}", f"targetPort {target}: no container of {where} "
                            "exposes it and listens on it beyond loopback")
    for where, _, annotations, containers in pods:
        port = annotations.get("prometheus.io/port")
        if port and not any(
            listen.port == int(port) and not listen.loopback_only() for _, _, listen in containers
        ):
            problem(where, f"prometheus.io/port {port}: no container listens on it beyond loopback")


if __name__ == "__main__":
    main()
