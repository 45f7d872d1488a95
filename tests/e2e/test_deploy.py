"""The deploy kit (deploy/, docs/deploy.md) says what it promises, checked without docker, a
cluster or Envoy: every YAML file parses; the Kubernetes manifests, the Envoy bootstrap, the
Dockerfile and the systemd unit carry the fields docs/deploy.md relies on, and agree with each
other and with the binary's flags; the runtime package list is exactly what `ldd` says the
binary needs; and the parts that run in the container are run here for real: the HEALTHCHECK
probe against a live server (200 and 503), and the server as PID 1 of its own PID namespace
(the container's entrypoint), where it must take SIGTERM and reap orphans."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

import harness as h

DEPLOY = h.SRC / "deploy"
K8S = DEPLOY / "kubernetes"
PACKAGES = DEPLOY / "runtime-packages.txt"
HEALTHCHECK = DEPLOY / "healthcheck.sh"

# Defaults of the drain flags (docs/operations.md), used where a file leaves them out.
DRAIN_DEFAULTS = {"drain_grace_ms": 5000, "drain_timeout_ms": 20000}
# After the drain timeout the supervisor waits this long for a worker before killing it
# (docs/operations.md, Drain and shutdown): the outside deadline must cover it too.
WORKER_KILL_MS = 5000
SCRIPT_TIMEOUT_DEFAULT_MS = 200



# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def yaml_files():
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def k8s_objects():
    """kind -> the one object of that kind under deploy/kubernetes (kustomization aside)."""
    objs = {}
    for p in sorted(K8S.glob("*.yaml")):
        for d in yaml.safe_load_all(p.read_text()):
            if d and d.get("kind") != "Kustomization":
                assert d["kind"] not in objs, f"two {d['kind']} objects"
                objs[d["kind"]] = d
    return objs


def flags_in(args):
    """{name: value or True} of --name=value / --name value / --name tokens."""
    out, i = {}, 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            name, eq, val = a[2:].partition("=")
            name = name.replace("-", "_")
            if eq:
                out[name] = val
            elif i + 1 < len(args) and not args[i + 1].startswith("--") and \
                    not args[i + 1].endswith(".lua"):
                out[name] = args[i + 1]
                i += 1
            else:
                out[name] = True
        i += 1
    return out


def stop_ms(flags):
    """The longest a drain and stop can take with these flags."""
    return sum(int(flags.get(k, v)) for k, v in DRAIN_DEFAULTS.items()) + WORKER_KILL_MS


def deployment_container():
    dep = k8s_objects()["Deployment"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return dep, c


def container_port(c, port):
    """A probe's port (a number or a port name) as a number."""
    if isinstance(port, int):
        return port
    (p,) = [p for p in c["ports"] if p.get("name") == port]
    return p["containerPort"]


def duration_s(text):
    """Envoy's YAML durations: '0.5s', '1s', '200ms'."""
    m = re.fullmatch(r"([0-9.]+)(ms|s)", text)
    assert m, f"duration {text!r}"
    return float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)


def dockerfile_instructions():
    """[(stage index, INSTRUCTION, argument text)] with line continuations joined and comments
    dropped; stage 0 is the first FROM."""
    text = (DEPLOY / "Dockerfile").read_text()
    lines, cur = [], ""
    for raw in text.splitlines():
        s = raw.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if s.startswith("#"):          # a comment inside a continued instruction
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        lines.append(cur + s)
        cur = ""
    out, stage = [], -1
    for l in lines:
        ins, _, arg = l.partition(" ")
        ins = ins.upper()
        if ins == "FROM":
            stage += 1
        out.append((stage, ins, arg.strip()))
    return out


def runtime_packages():
    pkgs = []
    for l in PACKAGES.read_text().splitlines():
        l = l.split("#", 1)[0].strip()
        if l:
            assert " " not in l, f"one package per line: {l!r}"
            pkgs.append(l)
    return pkgs


def owner_packages(paths):
    """{path: the Debian package that installed it (dpkg -S)}, trying each path as ldd gave
    it, its real path and the /usr twin of merged /lib. One dpkg call: it is slow."""
    cands = {}
    for path in paths:
        cs = [path, os.path.realpath(path)]
        for c in list(cs):
            cs.append("/usr" + c if c.startswith("/lib") else c[4:] if c.startswith("/usr/lib") else c)
        cands[path] = cs
    every = sorted({c for cs in cands.values() for c in cs})
    p = subprocess.run(["dpkg", "-S", *every], capture_output=True, text=True, timeout=120)
    found = {}
    for l in p.stdout.splitlines():
        # "libssl3:amd64: /usr/lib/x86_64-linux-gnu/libssl.so.3"
        pkgs, _, f = l.rpartition(": ")
        found[f.strip()] = pkgs.split(",")[0].split(":")[0].strip()
    return {path: next((found[c] for c in cs if c in found), None) for path, cs in cands.items()}


def linked_libraries():
    """Every shared library the binary loads, as ldd resolves it: [(soname, path)]."""
    p = subprocess.run(["ldd", h.BIN], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    libs = []
    for l in p.stdout.splitlines():
        l = l.strip()
        if "=>" in l:
            name, _, rest = l.partition("=>")
            path = rest.strip().split(" ")[0]
            assert path.startswith("/"), f"ldd cannot find {name.strip()}: {l}"
            libs.append((name.strip(), path))
        elif l.startswith("/"):                       # the dynamic loader itself
            libs.append((l.split(" ")[0], l.split(" ")[0]))
    return libs


def help_flags():
    p = subprocess.run([h.BIN, "--help"], capture_output=True, text=True, timeout=10)
    text = p.stdout + p.stderr
    return {m.replace("-", "_") for m in re.findall(r"--([a-z][a-z0-9_-]*)", text)}


def probe(path, port, host="127.0.0.1"):
    p = subprocess.run(["bash", str(HEALTHCHECK), path, str(port), host],
                       capture_output=True, text=True, timeout=10)
    return p.returncode


# --------------------------------------------------------------------------------------------
# Every YAML file
# --------------------------------------------------------------------------------------------

def test_every_yaml_file_parses():
    files = yaml_files()
    assert {p.relative_to(DEPLOY).as_posix() for p in files} >= {
        "envoy/envoy.yaml", "kubernetes/deployment.yaml", "kubernetes/service.yaml",
        "kubernetes/pdb.yaml", "kubernetes/hpa.yaml", "kubernetes/configmap.yaml"}
    for p in files:
        docs = [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
        assert docs, f"{p}: no document"
        assert all(isinstance(d, dict) for d in docs), f"{p}: a document is not a mapping"


# --------------------------------------------------------------------------------------------
# Kubernetes
# --------------------------------------------------------------------------------------------

def test_deployment_probes_grace_resources_and_security():
    dep, c = deployment_container()
    assert dep["apiVersion"] == "apps/v1"
    pod = dep["spec"]["template"]["spec"]
    for probe_name, path in (("readinessProbe", "/ready"), ("livenessProbe", "/live")):
        get = c[probe_name]["httpGet"]
        assert get["path"] == path, probe_name
        assert container_port(c, get["port"]) == 8000, probe_name
    assert {p["containerPort"] for p in c["ports"]} == {8080, 8443, 8000}

    flags = flags_in(c["args"])
    assert pod["terminationGracePeriodSeconds"] * 1000 > stop_ms(flags), \
        "the kubelet would SIGKILL the pod before the drain ends"

    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind]), kind
    # one worker process per CPU of the limit
    assert int(flags["threads"]) == int(str(c["resources"]["limits"]["cpu"]))

    psc, csc = pod["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["runAsNonRoot"] is True
    assert csc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in csc["capabilities"]
    assert csc["seccompProfile"] == {"type": "RuntimeDefault"}
    # the image's USER is the UID the pod runs as
    user = [a for _, ins, a in dockerfile_instructions() if ins == "USER"][-1]
    assert int(user.split(":")[0]) == psc["runAsUser"]
    # the server drains by itself: no preStop sleep (docs/deploy.md says why)
    assert "lifecycle" not in c


def test_script_comes_from_the_configmap_folder_and_is_watched():
    objs = k8s_objects()
    dep, c = deployment_container()
    flags = flags_in(c["args"])
    assert flags.get("watch") is True
    (script,) = [a for a in c["args"] if a.endswith(".lua")]
    mounts = [m for m in c["volumeMounts"] if script.startswith(m["mountPath"].rstrip("/") + "/")]
    assert len(mounts) == 1, f"{script} is not under one volume mount"
    m = mounts[0]
    assert "subPath" not in m, "a subPath mount is never updated when the ConfigMap changes"
    (vol,) = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == m["name"]]
    cm = objs["ConfigMap"]
    assert vol["configMap"]["name"] == cm["metadata"]["name"]
    key = script[len(m["mountPath"].rstrip("/")) + 1:]
    assert key in cm["data"], f"the ConfigMap has no key {key}"


def test_configmap_is_examples_basic_lua():
    cm = k8s_objects()["ConfigMap"]
    assert cm["data"]["callout.lua"] == (h.SRC / "examples" / "basic.lua").read_text(), \
        ("deploy/kubernetes/configmap.yaml differs from examples/basic.lua: replace its "
         "callout.lua block with `sed 's/^/    /; s/^    $//' examples/basic.lua`")


def test_service_pdb_hpa():
    objs = k8s_objects()
    dep, c = deployment_container()
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()

    svc = objs["Service"]
    assert svc["spec"]["selector"].items() <= labels.items()
    # headless: Envoy's STRICT_DNS cluster gets one address per ready pod
    assert svc["spec"].get("clusterIP") == "None"
    by_target = {container_port(c, p["targetPort"]): p for p in svc["spec"]["ports"]}
    assert by_target[8080]["appProtocol"] == "kubernetes.io/h2c"
    assert 8000 in by_target and 8443 in by_target

    pdb = objs["PodDisruptionBudget"]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"]

    hpa = objs["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    cpu = [m for m in hpa["spec"]["metrics"]
           if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
    assert cpu and cpu[0]["resource"]["target"]["type"] == "Utilization"


def test_kustomization_lists_every_manifest():
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(k["resources"]) == files
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl is not installed: the kustomization is not built")
    p = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    kinds = {d["kind"] for d in yaml.safe_load_all(p.stdout) if d}
    assert kinds == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget",
                     "HorizontalPodAutoscaler"}


# --------------------------------------------------------------------------------------------
# Envoy
# --------------------------------------------------------------------------------------------

def test_envoy_bootstrap():
    cfg = yaml.safe_load((DEPLOY / "envoy" / "envoy.yaml").read_text())
    res = cfg["static_resources"]
    clusters = {c["name"]: c for c in res["clusters"]}
    (listener,) = res["listeners"]
    (chain,) = listener["filter_chains"]
    (hcm,) = [f for f in chain["filters"]
              if f["name"] == "envoy.filters.network.http_connection_manager"]
    hcm = hcm["typed_config"]
    filters = [f["name"] for f in hcm["http_filters"]]
    assert filters.index("envoy.filters.http.ext_proc") < filters.index("envoy.filters.http.router")
    assert filters[-1] == "envoy.filters.http.router"

    (ep,) = [f["typed_config"] for f in hcm["http_filters"]
             if f["name"] == "envoy.filters.http.ext_proc"]
    assert ep["@type"] == \
        "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
    assert ep["processing_mode"] == {
        "request_header_mode": "SEND", "response_header_mode": "SEND",
        "request_body_mode": "BUFFERED", "response_body_mode": "BUFFERED",
        "request_trailer_mode": "SEND", "response_trailer_mode": "SEND"}
    assert isinstance(ep["failure_mode_allow"], bool)
    # Envoy's per-message timer must outlast the script budget (the deployment's, or the
    # default), or Envoy answers 504 before luacallout can say why.
    _, c = deployment_container()
    budget_ms = int(flags_in(c["args"]).get("script_timeout_ms", SCRIPT_TIMEOUT_DEFAULT_MS))
    assert duration_s(ep["message_timeout"]) * 1000 > budget_ms

    lc = clusters[ep["grpc_service"]["envoy_grpc"]["cluster_name"]]
    opts = lc["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert opts["@type"] == "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    assert "http2_protocol_options" in opts["explicit_http_config"]
    ka = (opts["explicit_http_config"]["http2_protocol_options"] or {}).get("connection_keepalive")
    assert ka is None or duration_s(ka["interval"]) >= 10, \
        "keepalive pings more often than every 10 s make luacallout close the connection"
    (hc,) = lc["health_checks"]
    assert hc["grpc_health_check"].get("service_name", "") == ""
    for k in ("timeout", "interval", "unhealthy_threshold", "healthy_threshold"):
        assert k in hc, f"health check without {k} (Envoy requires it)"
    # it is checked often enough to notice a drain inside the grace period
    assert duration_s(hc["interval"]) * hc["unhealthy_threshold"] * 1000 < \
        DRAIN_DEFAULTS["drain_grace_ms"]
    (lb,) = [e for g in lc["load_assignment"]["endpoints"] for e in g["lb_endpoints"]]
    sa = lb["endpoint"]["address"]["socket_address"]
    svc = k8s_objects()["Service"]
    assert sa["address"] == svc["metadata"]["name"]
    h2c = [p for p in svc["spec"]["ports"] if p.get("appProtocol") == "kubernetes.io/h2c"]
    assert sa["port_value"] == h2c[0]["port"]

    # an upstream for the requests themselves, the one the route sends them to
    (vh,) = hcm["route_config"]["virtual_hosts"]
    upstreams = {r["route"]["cluster"] for r in vh["routes"]}
    assert upstreams and upstreams <= set(clusters) and lc["name"] not in upstreams


# --------------------------------------------------------------------------------------------
# Dockerfile and the runtime package list
# --------------------------------------------------------------------------------------------

def test_dockerfile_stages_user_healthcheck_entrypoint():
    ins = dockerfile_instructions()
    froms = [a for _, i, a in ins if i == "FROM"]
    assert len(froms) == 2
    assert froms[0].split()[0] == "debian:bookworm" and froms[0].split()[-1] == "build"
    assert froms[1] == "debian:bookworm-slim"
    final = [(i, a) for s, i, a in ins if s == 1]

    # the runtime stage installs exactly the package list, nothing named inline
    runs = [a for i, a in final if i == "RUN"]
    installs = [r for r in runs if "apt-get install" in r]
    assert len(installs) == 1
    assert "runtime-packages.txt" in installs[0] and "--no-install-recommends" in installs[0]
    assert ("COPY", "deploy/runtime-packages.txt /tmp/runtime-packages.txt") in final
    # the build stage installs through scripts/deps, which reads the same list
    assert any(i == "RUN" and "scripts/deps build" in a for s, i, a in ins if s == 0)

    users = [a for i, a in final if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert int(users[-1].split(":")[0]) > 0

    (hc,) = [a for i, a in final if i == "HEALTHCHECK"]
    opts, _, cmd = hc.partition("CMD")
    argv = json.loads(cmd)
    assert argv[0] == "/usr/local/bin/luacallout-healthcheck" and argv[1] == "/live"
    assert ("COPY", "--chmod=0755 deploy/healthcheck.sh /usr/local/bin/luacallout-healthcheck") \
        in final
    assert "--timeout=" in opts and "--interval=" in opts

    for kw in ("ENTRYPOINT", "CMD"):
        (a,) = [a for i, a in final if i == kw]
        argv = json.loads(a)        # exec form: no shell between the signal and the server
        assert isinstance(argv, list) and argv
    (ep,) = [json.loads(a) for i, a in final if i == "ENTRYPOINT"]
    assert ep == ["/usr/local/bin/luacallout"]
    (expose,) = [a for i, a in final if i == "EXPOSE"]
    assert set(expose.split()) == {"8080", "8443", "8000"}
    assert ("STOPSIGNAL", "SIGTERM") in final


def test_runtime_packages_provide_every_linked_library():
    """Every library `ldd` resolves for the binary belongs to a package of the list, so the
    slim image (which has only the list) can run it."""
    if not shutil.which("dpkg"):
        pytest.skip("no dpkg: not a Debian system")
    pkgs = set(runtime_packages())
    # A sanitized test build (scripts/test's first pass) adds the sanitizer runtimes, and
    # its link keeps libatomic, which grpc's pkg-config names but --as-needed drops from a
    # release link; the normal build's pass checks the list exactly.
    libs = [(n, p) for n, p in linked_libraries()
            if not (h.SANITIZED and re.match(r"lib(asan|ubsan|lsan|atomic)\.so", n))]
    owners = owner_packages([p for _, p in libs])
    missing = []
    for name, path in libs:
        owner = owners[path]
        assert owner, f"{path} ({name}) belongs to no Debian package"
        if owner not in pkgs:
            missing.append(f"{name} ({owner})")
    assert not missing, f"deploy/runtime-packages.txt lacks: {', '.join(missing)}"


def test_every_runtime_package_is_needed():
    """The converse: a package of the list provides a linked library, or a Lua 5.4 C module
    the sandbox lets scripts require (src/vm.c's allow-list)."""
    if not shutil.which("dpkg"):
        pytest.skip("no dpkg: not a Debian system")
    linked = {os.path.realpath(p) for _, p in linked_libraries()}
    vm = (h.SRC / "src" / "vm.c").read_text()
    m = re.search(r"c_modules_allowed\[\]\s*=\s*\{([^}]*)\}", vm)
    assert m, "src/vm.c: no c_modules_allowed list"
    modules = re.findall(r'"([^"]+)"', m.group(1))
    for pkg in runtime_packages():
        p = subprocess.run(["dpkg", "-L", pkg], capture_output=True, text=True)
        assert p.returncode == 0, f"{pkg} is not installed here (scripts/deps runtime)"
        files = p.stdout.split()
        provides_lib = any(os.path.realpath(f) in linked for f in files)
        provides_mod = any(f.endswith(f"/lua/5.4/{mod}.so") for f in files for mod in modules)
        assert provides_lib or provides_mod, f"{pkg} provides nothing the server loads"


def test_scripts_deps_installs_the_same_list():
    deps = (h.SRC / "scripts" / "deps").read_text()
    assert "deploy/runtime-packages.txt" in deps
    p = subprocess.run(["bash", "-c", 'sed "s/#.*//" deploy/runtime-packages.txt | xargs -n1'],
                       cwd=h.SRC, capture_output=True, text=True)
    assert p.stdout.split() == runtime_packages()


# --------------------------------------------------------------------------------------------
# systemd
# --------------------------------------------------------------------------------------------

def unit_settings():
    out = {}
    for l in (DEPLOY / "systemd" / "luacallout.service").read_text().splitlines():
        l = l.strip()
        if l and not l.startswith(("#", "[")):
            k, _, v = l.partition("=")
            out.setdefault(k, []).append(v)
    return out


def test_systemd_unit():
    u = unit_settings()
    assert u["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    (start,) = u["ExecStart"]
    argv = shlex.split(start)
    assert argv[0] == "/usr/local/bin/luacallout" and argv[-1].endswith(".lua")
    assert int(u["TimeoutStopSec"][0]) * 1000 > stop_ms(flags_in(argv))
    assert u["KillMode"] == ["mixed"], "only the supervisor gets SIGTERM; it stops the workers"
    assert u["Restart"] == ["on-failure"]
    for k, v in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                 ("DynamicUser", "yes"), ("PrivateTmp", "yes"), ("CapabilityBoundingSet", "")):
        assert u.get(k) == [v], k


def test_systemd_unit_verifies(tmp_path):
    tool = shutil.which("systemd-analyze")
    if not tool:
        pytest.skip("systemd-analyze is not installed")
    text = (DEPLOY / "systemd" / "luacallout.service").read_text()
    unit = tmp_path / "luacallout.service"
    unit.write_text(text.replace("/usr/local/bin/luacallout", str(Path(h.BIN).resolve())))
    p = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # what it says about our file is prefixed with its path (unknown keys, bad values)
    about_ours = [l for l in p.stderr.splitlines() if unit.name in l]
    assert p.returncode == 0 and not about_ours, p.stderr


# --------------------------------------------------------------------------------------------
# The flags every deploy file passes exist
# --------------------------------------------------------------------------------------------

def test_deploy_files_use_real_flags():
    _, c = deployment_container()
    used = set(flags_in(c["args"]))
    used |= set(flags_in(shlex.split(unit_settings()["ExecStart"][0])))
    known = help_flags()
    unknown = used - known
    assert not unknown, f"flags the binary does not have: {sorted(unknown)}"


def test_deployment_and_unit_arguments_are_accepted(tmp_path):
    """The binary takes the Deployment's and the unit's command lines as they are (values
    included), with --check: a typo or a bad value fails here, not in a pod."""
    known = help_flags()
    script = h.SRC / "examples" / "basic.lua"

    def runnable(argv):
        out = []
        for a in argv:
            if a.endswith(".lua") or a.startswith("$"):
                continue
            out.append(a)
        return out

    _, c = deployment_container()
    unit = shlex.split(unit_settings()["ExecStart"][0])[1:]
    for argv in (c["args"], unit):
        args = runnable(argv)
        assert all("=" in a or flags_in([a])[a[2:].replace("-", "_")] is True for a in args), \
            f"write flags with values as --name=value: {args}"
        code, out, err = h.ServerFactory(tmp_path).run_to_exit(["--check", *args, script])
        assert code == 0, f"{args}: {err or out}"


# --------------------------------------------------------------------------------------------
# The HEALTHCHECK probe against a real server
# --------------------------------------------------------------------------------------------

# A handler that blocks in C past its budget: the watchdog turns /live to 503 while it lasts.
WEDGE = """
function on_request_headers(h, ctx)
  if h:get("x-wedge") then os.execute("sleep 2.5") end
  return nil
end
"""


def test_healthcheck_probe_follows_live(servers):
    srv = servers.start(WEDGE, "--unsafe_stdlib", "--threads", "1", "--script_timeout_ms", "100")
    port = srv.port("health")
    assert h.wait_for(lambda: probe("/ready", port) == 0, 10, "/ready 200")
    assert probe("/live", port) == 0
    assert probe("/live", h.free_port()) == 1, "a closed port must fail the probe"

    stub = srv.stub()
    done = threading.Event()

    def wedge():
        h.process(stub, [h.headers_req("request_headers", [(":path", "/"), ("x-wedge", "1")])])
        done.set()

    t = threading.Thread(target=wedge, daemon=True)
    t.start()
    h.wait_for(lambda: probe("/live", port) == 1, 5, "the probe to fail on /live 503")
    assert not done.is_set()
    t.join(15)
    assert done.is_set()
    h.wait_for(lambda: probe("/live", port) == 0, 5, "the probe to pass again")


# --------------------------------------------------------------------------------------------
# The entrypoint: the server as PID 1 of a PID namespace, as in a container without tini
# --------------------------------------------------------------------------------------------

# Each request starts a program that outlives its parent shell: an orphan that the kernel
# hands to PID 1 of the namespace, the supervisor, which must reap it when it ends.
ORPHAN = """
function on_request_headers(h, ctx)
  os.execute("sleep 1 &")
  return nil
end
"""


def _unshare_works():
    u = shutil.which("unshare")
    if not u:
        return None
    p = subprocess.run([u, "--user", "--map-root-user", "--pid", "--fork", "--mount-proc",
                        "true"], capture_output=True, timeout=10)
    return u if p.returncode == 0 else None


def _children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[1]) == pid:
                out.append((int(d), comm, fields[0]))
    return out


def test_supervisor_as_pid1_reaps_orphans_and_stops_on_sigterm(servers):
    unshare = _unshare_works()
    if not unshare:
        pytest.skip("no unprivileged user and PID namespaces here (unshare -r -p)")
    script = servers.script(ORPHAN)
    argv, addrs, enabled = servers.argv(script, "--unsafe_stdlib", "--threads", "1")
    log = servers.tmpdir / "pid1.log"
    wrapped = [unshare, "--user", "--map-root-user", "--pid", "--fork", "--mount-proc",
               "--kill-child", *argv]
    srv = h.Server(wrapped, log, addrs, enabled, cwd=servers.tmpdir)
    try:
        srv.wait_ready()
        (sup, comm, _), = _children(srv.proc.pid)
        nspid = [l for l in Path(f"/proc/{sup}/status").read_text().splitlines()
                 if l.startswith("NSpid:")][0].split()
        assert nspid[-1] == "1", f"the supervisor is not PID 1 of its namespace: {nspid}"

        with h.grpc.insecure_channel(srv.target("plaintext")) as ch:
            h.process(h.pb_grpc.ExternalProcessorStub(ch),
                      [h.headers_req("request_headers", [(":path", "/")])])
        # the orphan is re-parented to the supervisor while it sleeps ...
        orphan = h.wait_for(lambda: [p for p, c, _ in _children(sup) if c == "sleep"], 5,
                            "the orphaned sleep to be re-parented to PID 1")[0]
        # ... and once it ends, reaped: gone from /proc, not left a zombie
        h.wait_for(lambda: not os.path.exists(f"/proc/{orphan}"), 5,
                   f"PID 1 to reap the orphan {orphan}")
        assert not [p for p, _, state in _children(sup) if state == "Z"], "zombies left"

        os.kill(sup, signal.SIGTERM)        # from outside, as the container runtime sends it
        rc = srv.proc.wait(h.STOP_TIMEOUT)
        assert rc == 0, f"exit status {rc} after SIGTERM\n{srv.log()}"
        assert re.search(r"SIGTERM|signal 15", srv.log()) and "stopped" in srv.log(), srv.log()
        san = h.sanitizer_report(srv.log())
        assert not san, san
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()
        srv.signal_and_wait(send=False)


# --------------------------------------------------------------------------------------------
# The guide
# --------------------------------------------------------------------------------------------

def test_guide_is_linked_and_covers_every_file():
    assert "(docs/deploy.md)" in (h.SRC / "README.md").read_text()
    guide = (h.SRC / "docs" / "deploy.md").read_text()
    for p in sorted(DEPLOY.rglob("*")):
        if p.is_file() and p.name != "Dockerfile.dockerignore" and p.parent != K8S:
            assert p.relative_to(h.SRC).as_posix() in guide, f"docs/deploy.md does not mention {p}"
    assert "deploy/kubernetes/" in guide
    for topic in ("Service Extensions", "route extension", "traffic extension", "/ready",
                  "HTTP2", "H2C", "message_timeout", "failure_mode_allow"):
        assert topic in guide, topic
