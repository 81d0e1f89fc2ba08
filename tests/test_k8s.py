"""deploy/k8s/: there is no cluster here, so check what can be checked. Every manifest passes
kubernetes-validate (Kubernetes 1.30, strict); each kustomization lists every file of its folder; every
fedblock command in a pod (the coordinator's args with its ConfigMap, the workers' shell line, the probes)
parses and validates with the project's own CLI; the files those commands name are the ones the volumes
provide; worker pod names are valid worker names; ports agree across containers, Services and scrape
annotations; the site of several nodes (overlays/multinode-site/, an indexed Job under torchrun): its
shell line run as each pod would run it, the torchrun line parsed by torchrun's own parser and the worker
options by fedblock's, the rendezvous, the GPUs, the restart policy and the rank-0-only probe; and, where
kubectl and openssl exist, make-secrets.sh + `kubectl kustomize` render both deployments, whose every
object validates.

`probe_commands()` gives the coordinator's readiness and liveness exec commands, for a test that runs them
against a live coordinator."""
from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedblock.common.cli import _fields, make_parser, parse_configs
from fedblock.common.config import flag_name, valid_worker_name

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAY = K8S / "overlays" / "example"
MULTINODE = K8S / "overlays" / "multinode-site"
K8S_VERSION = "1.30.0"
UID = 10001  # the Dockerfile's user


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests() -> list[dict]:
    return [d for p in sorted(BASE.glob("*.yaml")) if p.name != "kustomization.yaml" for d in load_all(p)]


def site_manifests() -> list[dict]:
    """The objects overlays/multinode-site/ adds to overlays/example/."""
    k = yaml.safe_load((MULTINODE / "kustomization.yaml").read_text())
    return [d for r in k["resources"] if not r.startswith("..") for d in load_all(MULTINODE / r)]


def find(kind: str, name: str) -> dict:
    (obj,) = [d for d in manifests() + site_manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    return obj


def site_job() -> dict:
    (job,) = [d for d in site_manifests() if d["kind"] == "Job"]
    return job


def site_names() -> set[str]:
    """The names of the sites of several pods: each Job is one worker."""
    return {d["metadata"]["name"] for d in site_manifests() if d["kind"] == "Job"}


def coordinator_sts() -> dict:
    return find("StatefulSet", "fedblock-coordinator")


def worker_sts() -> dict:
    return find("StatefulSet", "worker")


def container(sts: dict) -> dict:
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    return c


def port(c: dict, name: str) -> int:
    (p,) = [p["containerPort"] for p in c["ports"] if p["name"] == name]
    return p


def probe_commands(coordinator: str | None = None, tls_ca: str | None = None,
                   tls_server_name: str | None = None) -> tuple[list[str], list[str]]:
    """The coordinator's (readiness, liveness) exec probe commands, as in coordinator-statefulset.yaml.
    The optional arguments replace the values of --coordinator, --tls-ca and --tls-server-name, to run
    them outside the pod against a live coordinator."""
    c = container(coordinator_sts())
    out = []
    for probe in (c["readinessProbe"], c["livenessProbe"]):
        cmd = list(probe["exec"]["command"])
        for flag, value in (("--coordinator", coordinator), ("--tls-ca", tls_ca), ("--tls-server-name", tls_server_name)):
            if value is not None and flag in cmd:
                cmd[cmd.index(flag) + 1] = value
        out.append(cmd)
    return out[0], out[1]


# ---- the kustomizations ---------------------------------------------------------------------------


def kustomization(folder: Path) -> dict:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


@pytest.mark.parametrize("folder", [BASE, OVERLAY, MULTINODE], ids=["base", "overlay", "multinode"])
def test_kustomization_lists_every_file(folder):
    k = kustomization(folder)
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    assert k["namespace"] == "fedblock"
    assert any("app.kubernetes.io/part-of" in entry["pairs"] for entry in k["labels"])
    local = {r for r in k.get("resources", []) if not r.startswith("..")}
    files = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
    assert local == files
    for r in k.get("resources", []):
        assert (folder / r).is_file() or (folder / r / "kustomization.yaml").is_file(), r
    for p in folder.glob("*.y*ml"):
        assert load_all(p), p  # parses, not empty


def test_base_namespace_and_labels():
    (ns,) = [d for d in manifests() if d["kind"] == "Namespace"]
    assert ns["metadata"]["name"] == kustomization(BASE)["namespace"]
    for d in manifests():
        assert "namespace" not in d["metadata"], d["metadata"]["name"]  # the kustomization sets it
        if d["kind"] != "Namespace":
            assert d["metadata"]["labels"]["app.kubernetes.io/name"] == "fedblock"


def generated_secrets() -> dict[str, set[str]]:
    """Secret name -> its keys, from the overlay's secretGenerator (env files: keys are worker names, and
    the sites' names, which make-secrets.sh writes when it is given them)."""
    out = {}
    for gen in kustomization(OVERLAY)["secretGenerator"]:
        keys = {f.split("=", 1)[0] for f in gen.get("files", [])}
        if gen.get("envs"):
            keys |= {f"worker-{i}" for i in range(worker_sts()["spec"]["replicas"])} | site_names()
        out[gen["name"]] = keys
    return out


def test_overlay_generates_the_referenced_secrets():
    gens = generated_secrets()
    for f in [f.split("=", 1)[-1] for g in kustomization(OVERLAY)["secretGenerator"] for f in g.get("files", []) + g.get("envs", [])]:
        assert f.startswith("secrets/"), f
    ignore = (OVERLAY / "secrets" / ".gitignore").read_text().split()
    assert "*" in ignore  # keys and tokens never get committed
    for sts in (coordinator_sts(), worker_sts(), site_job()):
        for vol in sts["spec"]["template"]["spec"]["volumes"]:
            sources = vol.get("projected", {}).get("sources", []) + ([{"secret": {"name": vol["secret"]["secretName"],
                                                                                   **vol["secret"]}}] if "secret" in vol else [])
            for src in sources:
                if "secret" in src:
                    name = src["secret"]["name"]
                    assert name in gens, name
                    for item in src["secret"].get("items", []):
                        assert item["key"] in gens[name], (name, item["key"])
                if "configMap" in src:
                    cm = find("ConfigMap", src["configMap"]["name"])
                    for item in src["configMap"]["items"]:
                        assert item["key"] in cm["data"]


# ---- schema validation ----------------------------------------------------------------------------


def validate(doc: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path", sorted(str(p.relative_to(K8S)) for folder in (BASE, MULTINODE)
                                         for p in folder.glob("*.yaml") if p.name != "kustomization.yaml"))
def test_manifest_validates(path):
    for doc in load_all(K8S / path):
        validate(doc)


def test_strict_validation_catches_mistakes():
    import kubernetes_validate

    bad = copy.deepcopy(coordinator_sts())
    bad["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}  # a typo: unknown field
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(bad)


# ---- the commands in the pods ---------------------------------------------------------------------


def volume_files(sts: dict, root: Path) -> dict[str, Path]:
    """Lay out, under `root`, the files that the pod's ConfigMap and Secret volumes provide; return
    {mount path: its folder under root} for those mounts."""
    spec = sts["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    claims = {t["metadata"]["name"] for t in sts["spec"].get("volumeClaimTemplates", [])}
    gens = generated_secrets()
    mounts = {}
    for m in container(sts)["volumeMounts"]:
        assert m["name"] in volumes or m["name"] in claims, m["name"]
        v = volumes.get(m["name"], {})
        if not ({"projected", "secret", "configMap"} & set(v)):
            continue  # a claim or an emptyDir: nothing to lay out
        where = root / m["mountPath"].lstrip("/")
        where.mkdir(parents=True, exist_ok=True)
        mounts[m["mountPath"]] = where
        if "projected" in v:
            for src in v["projected"]["sources"]:
                kind = "configMap" if "configMap" in src else "secret"
                for item in src[kind]["items"]:
                    (where / item["path"]).parent.mkdir(parents=True, exist_ok=True)
                    if kind == "configMap":
                        data = find("ConfigMap", src[kind]["name"])["data"][item["key"]]
                    else:
                        data = "placeholder\n"
                    (where / item["path"]).write_text(data)
        elif "secret" in v:
            items = v["secret"].get("items")
            keys = [i["path"] for i in items] if items else sorted(gens[v["secret"]["secretName"]])
            for key in keys:
                (where / key).write_text("placeholder\n")
    return mounts


def relocate(value: str, mounts: dict[str, Path]) -> str:
    """A path inside a ConfigMap or Secret mount -> the same file under the test's root, which must exist
    (the volume provides it); any other value unchanged."""
    for mount, where in mounts.items():
        if value.startswith(mount + "/"):
            target = where / value[len(mount) + 1:]
            assert target.is_file(), f"{value}: not provided by the volume mounted at {mount}"
            return str(target)
    return value


def container_env(c: dict, **extra: str) -> dict[str, str]:
    env = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
    return {k: v for k, v in {**env, **extra}.items() if k.startswith("FEDBLOCK_") and k != "FEDBLOCK_LOG_LEVEL"}


def assert_exact_flags(command: str, argv: list[str]) -> None:
    """argparse would accept abbreviations; require the exact flag names."""
    known = {flag_name(f) for f in _fields(command)} | {"--config"}
    for a in argv:
        if a.startswith("--"):
            assert a.split("=", 1)[0] in known, a


def parse(argv: list[str], env: dict[str, str]):
    args = make_parser().parse_args(argv)   # unknown flag or bad choice -> SystemExit(2)
    (config,) = parse_configs(args.command, args, env=env)  # values pass the config's check()
    assert_exact_flags(args.command, argv[1:])
    return config


def coordinator_config(tmp_path: Path):
    sts = coordinator_sts()
    c = container(sts)
    mounts = volume_files(sts, tmp_path)
    args = list(c.get("command", [])) + list(c["args"])
    assert args[0] == "coordinator"  # the image's entrypoint is `fedblock`
    (config_arg,) = [a for a in args if a.startswith("--config")]
    config_path = config_arg.split("=", 1)[1]
    # the YAML file as the container sees it, with its paths moved under tmp_path
    values = yaml.safe_load(Path(relocate(config_path, mounts)).read_text())
    values = {k: relocate(v, mounts) if isinstance(v, str) else v for k, v in values.items()}
    cfg_file = tmp_path / "coordinator.yaml"
    cfg_file.write_text(yaml.safe_dump(values))
    argv = [a if not a.startswith("--config") else f"--config={cfg_file}" for a in args]
    return parse(argv, container_env(c)), values


def test_coordinator_config_loads(tmp_path):
    from fedblock.common.config import CoordinatorConfig, build, load_yaml

    config, values = coordinator_config(tmp_path)
    # the same through load_yaml/build directly, every key a known option
    direct = build(CoordinatorConfig, {}, env={}, file_values=load_yaml(tmp_path / "coordinator.yaml"))
    assert direct == config
    c = container(coordinator_sts())
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    claims = {t["metadata"]["name"] for t in coordinator_sts()["spec"]["volumeClaimTemplates"]}
    assert str(config.state_dir) == "/state" and mounts["/state"] in claims  # persistent
    assert config.listen.rsplit(":", 1)[1] == str(port(c, "grpc"))
    assert config.metrics_port == port(c, "metrics")
    assert config.tls_cert and config.tls_key and not config.insecure
    assert config.auth_tokens and config.admin_tokens
    assert config.linger > 0  # the pod stays Running after the run (a StatefulSet restarts what exits)


def worker_commands(tmp_path: Path) -> list[tuple[str, list[str], dict[str, str]]]:
    """(pod name, fedblock argv, FEDBLOCK_* env) of every worker pod, paths moved under tmp_path."""
    sts = worker_sts()
    c = container(sts)
    mounts = volume_files(sts, tmp_path)
    assert c["command"][:2] == ["/bin/sh", "-c"]
    script = c["command"][2]
    env_from_api = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"] if "valueFrom" in e}
    assert env_from_api["POD_NAME"] == "metadata.name"
    assert "set -eu" in script
    token_file = re.search(r'FEDBLOCK_TOKEN="\$\(cat "([^"]+)"\)"', script).group(1)
    (exec_line,) = [line for line in script.replace("\\\n", " ").splitlines() if line.strip().startswith("exec fedblock ")]
    out = []
    for i in range(sts["spec"]["replicas"]):
        pod = f"{sts['metadata']['name']}-{i}"
        assert Path(relocate(token_file.replace("${POD_NAME}", pod), mounts)).exists()
        argv = [a.replace("${POD_NAME}", pod) for a in shlex.split(exec_line)][2:]
        argv = [a.split("=", 1)[0] + "=" + relocate(a.split("=", 1)[1], mounts) if "=" in a else a for a in argv]
        out.append((pod, argv, container_env(c, FEDBLOCK_TOKEN="placeholder")))
    return out


def test_worker_command_parses(tmp_path):
    svc = find("Service", "fedblock-coordinator")
    grpc_port = {p["name"]: p["port"] for p in svc["spec"]["ports"]}["grpc"]
    c = container(worker_sts())
    for pod, argv, env in worker_commands(tmp_path):
        assert argv[0] == "worker"
        config = parse(argv, env)
        assert config.name == pod
        assert config.coordinator == f"{svc['metadata']['name']}:{grpc_port}"
        assert config.metrics_port == port(c, "metrics")
        assert config.tls_ca and not config.insecure
        assert config.token == "placeholder"  # from FEDBLOCK_TOKEN, never a flag
        assert not any(a.startswith("--token") for a in argv)
        assert config.data == "/data/train.jsonl"
        data_mount = {m["mountPath"]: m for m in c["volumeMounts"]}["/data"]
        assert data_mount["readOnly"] is True
        assert data_mount["name"] in {t["metadata"]["name"] for t in worker_sts()["spec"]["volumeClaimTemplates"]}


def test_worker_pod_names_are_worker_names():
    sts = worker_sts()
    names = [f"{sts['metadata']['name']}-{i}" for i in range(sts["spec"]["replicas"])]
    assert all(valid_worker_name(n) for n in names)
    assert len(set(names)) >= 2
    # the coordinator waits for that many
    cm = yaml.safe_load(find("ConfigMap", "fedblock-coordinator")["data"]["coordinator.yaml"])
    assert cm["min-workers"] <= len(names)


def test_probe_commands_parse(tmp_path):
    sts = coordinator_sts()
    c = container(sts)
    mounts = volume_files(sts, tmp_path)
    config, _ = coordinator_config(tmp_path / "config")
    ready, live = probe_commands()
    startup = c["startupProbe"]["exec"]["command"]
    for cmd in (ready, live, startup):
        assert cmd[:2] == ["fedblock", "health"]
        argv = [relocate(a, mounts) for a in cmd[1:]]
        health = parse(argv, env={})
        assert health.coordinator == f"127.0.0.1:{config.listen.rsplit(':', 1)[1]}"
        assert health.tls_ca and not health.insecure
        assert health.tls_server_name == find("Service", "fedblock-coordinator")["metadata"]["name"]
    # the startup probe waits for SERVING (the --live form passes at once: NOT_SERVING is an answer)
    assert "--live" not in ready and "--live" in live and "--live" not in startup
    assert startup == ready
    # a probe's own timeout fits in the probe's
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        cmd = c[probe]["exec"]["command"]
        assert float(cmd[cmd.index("--timeout") + 1]) < c[probe]["timeoutSeconds"]
    # model loading: the startup probe allows minutes
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] == 600  # the README's 10 minutes
    # the helper substitutes
    r2, l2 = probe_commands("127.0.0.1:5", "/x/ca.pem", "localhost")
    assert r2[r2.index("--coordinator") + 1] == "127.0.0.1:5" and l2[l2.index("--tls-ca") + 1] == "/x/ca.pem"


# ---- ports, annotations, security -----------------------------------------------------------------


def test_ports_match_services_and_annotations():
    for sts, metrics in ((coordinator_sts(), "metrics"), (worker_sts(), "metrics")):
        c = container(sts)
        ann = sts["spec"]["template"]["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true"
        assert ann["prometheus.io/port"] == str(port(c, metrics))
        assert ann["prometheus.io/path"] == "/metrics"
        selector = sts["spec"]["selector"]["matchLabels"]
        assert selector.items() <= sts["spec"]["template"]["metadata"]["labels"].items()
        services = [s for s in manifests() if s["kind"] == "Service" and s["spec"]["selector"] == selector]
        assert sts["spec"]["serviceName"] in {s["metadata"]["name"] for s in services}
        governing = find("Service", sts["spec"]["serviceName"])
        assert governing["spec"]["clusterIP"] == "None"
        for s in services:
            for p in s["spec"]["ports"]:
                assert p["targetPort"] in {cp["name"] for cp in c["ports"]}
                assert p["port"] == port(c, p["targetPort"])
    coord = find("Service", "fedblock-coordinator")
    assert coord["spec"]["type"] == "ClusterIP"
    assert {p["port"] for p in coord["spec"]["ports"]} == {50051, 9100}
    assert {p["port"] for p in find("Service", "fedblock-worker")["spec"]["ports"]} == {9101}
    live = container(worker_sts())["livenessProbe"]["httpGet"]
    assert live["path"] == "/metrics" and live["port"] == "metrics"


@pytest.mark.parametrize("which", ["coordinator", "worker", "site"])
def test_security_context(which):
    sts = {"coordinator": coordinator_sts, "worker": worker_sts, "site": site_job}[which]()
    pod = sts["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == UID and pod["securityContext"]["runAsGroup"] == UID
    assert pod["securityContext"]["fsGroup"] == UID
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    c = container(sts)
    assert c["image"] == ("fedblock:0.1.0-cu128" if which == "site" else "fedblock:0.1.0")
    assert f"-t {c['image']} ." in (ROOT / "deploy" / "README.md").read_text()  # the README builds that image
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]  # writable scratch on a read-only root
    for m in c["volumeMounts"]:
        v = volumes.get(m["name"], {})
        if "secret" in v or "projected" in v:
            assert m.get("readOnly") is True, m["name"]
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]


# ---- a site of several nodes: overlays/multinode-site/ -------------------------------------------


def service_selects(service: dict, template: dict) -> bool:
    return service["spec"]["selector"].items() <= template["metadata"]["labels"].items()


def site_service() -> dict:
    (svc,) = [d for d in site_manifests() if d["kind"] == "Service"]
    return svc


def run_site_pod(tmp_path: Path, index: int) -> tuple[list[str], dict[str, str]]:
    """Run the site container's shell line as the pod of completion index `index` runs it, the Secrets'
    files laid out under tmp_path (their paths in the line moved there), with a stand-in `torchrun` on the
    PATH; return the argv torchrun got and the FEDBLOCK_* environment it (and so every rank) got."""
    job = site_job()
    c = container(job)
    mounts = volume_files(job, tmp_path / "volumes")  # the same files in every pod
    assert c["command"][:2] == ["/bin/sh", "-c"]
    script = c["command"][2]
    assert "set -eu" in script
    for mount, where in mounts.items():
        script = script.replace(mount + "/", f"{where}/")
    root = tmp_path / f"pod-{index}"
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "torchrun").write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "env = {k: v for k, v in os.environ.items() if k.startswith('FEDBLOCK_')}\n"
        "json.dump({'argv': sys.argv[1:], 'env': env}, open(os.environ['RECORD'], 'w'))\n")
    (bin_dir / "torchrun").chmod(0o755)
    record = root / "torchrun.json"
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    assert not {"JOB_COMPLETION_INDEX", "PATH", "RECORD"} & set(env)
    env |= {"PATH": f"{bin_dir}:/usr/bin:/bin", "JOB_COMPLETION_INDEX": str(index), "RECORD": str(record)}
    r = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    out = json.loads(record.read_text())
    return out["argv"], out["env"]


def launch(argv: list[str], monkeypatch):
    """torchrun's own reading of its command line: (LaunchConfig, the command each rank runs)."""
    run = pytest.importorskip("torch.distributed.run")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # config_from_args would set it in this process otherwise
    config, cmd, cmd_args = run.config_from_args(run.get_args_parser().parse_args(argv))
    assert cmd == sys.executable  # with Python (not --no-python): `python -u -m MODULE ARGS`
    return config, cmd_args


def rdzv_params(config):
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    return RendezvousParameters(config.rdzv_backend, config.rdzv_endpoint, config.run_id, config.min_nodes,
                                config.max_nodes, **config.rdzv_configs)


def site_pods(tmp_path: Path, monkeypatch) -> list[tuple]:
    """(torchrun's LaunchConfig, the worker options, their FEDBLOCK_* env, torchrun's argv) of each pod of
    the site."""
    pods = []
    for index in range(site_job()["spec"]["completions"]):
        argv, env = run_site_pod(tmp_path, index)
        config, cmd_args = launch(argv, monkeypatch)
        assert cmd_args[:3] == ["-u", "-m", "fedblock.client"]  # `python -m fedblock.client` = `fedblock worker`
        pods.append((config, cmd_args[3:], env, argv))
    return pods


def test_site_runs_the_worker_module():
    import importlib.util

    assert importlib.util.find_spec("fedblock.client.__main__") is not None


def test_site_job_shape():
    job = site_job()
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"  # pod N: hostname <job>-N, JOB_COMPLETION_INDEX=N
    assert spec["completions"] == spec["parallelism"] >= 2  # every node at once: the rendezvous waits for all
    pod = spec["template"]["spec"]
    # a failed pod is replaced, only once it is gone (no two pods with one hostname); evictions and drains
    # are not held against the site; the site can come back at least once as a whole (each pod failing)
    assert pod["restartPolicy"] == "Never"
    assert spec["podReplacementPolicy"] == "Failed"
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in spec["podFailurePolicy"]["rules"]
    assert spec["backoffLimit"] >= spec["completions"]
    assert valid_worker_name(job["metadata"]["name"])
    assert len(f"{job['metadata']['name']}-{spec['completions'] - 1}") <= 63  # a hostname
    # the headless Service gives the pods their DNS names
    svc = site_service()
    assert pod["subdomain"] == svc["metadata"]["name"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert service_selects(svc, spec["template"])
    c = container(job)
    for p in svc["spec"]["ports"]:
        assert p["port"] == port(c, p["targetPort"])
    # the site's pods and the base's stay apart: no selector of one matches the other's pods
    for other in (coordinator_sts(), worker_sts()):
        assert not other["spec"]["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
        assert not service_selects(svc, other["spec"]["template"])
    for s in manifests():
        if s["kind"] == "Service":
            assert not service_selects(s, spec["template"]), s["metadata"]["name"]
    # one pod per machine
    (term,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()


def quantity(q: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return int(q[:-2]) * units[q[-2:]] if q[-2:] in units else int(q)


def test_site_gpus_and_shared_memory():
    job = site_job()
    c = container(job)
    gpus = c["resources"]["limits"]["nvidia.com/gpu"]
    assert c["resources"]["requests"].get("nvidia.com/gpu", gpus) == gpus
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    (shm,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"  # NCCL: more than the runtime's 64 MiB
    assert quantity(volumes[shm["name"]]["emptyDir"]["sizeLimit"]) < quantity(c["resources"]["limits"]["memory"])


def test_site_pods_run_one_torchrun_site(tmp_path, monkeypatch):
    job = site_job()
    name, spec = job["metadata"]["name"], job["spec"]
    c = container(job)
    svc = site_service()
    coordinator = find("Service", "fedblock-coordinator")
    grpc_port = {p["name"]: p["port"] for p in coordinator["spec"]["ports"]}["grpc"]
    pods = site_pods(tmp_path, monkeypatch)
    first, options, env, first_argv = pods[0]
    for index, (config, worker_argv, worker_env, argv) in enumerate(pods):
        # the same worker options and environment in every pod (so on every rank)
        assert worker_argv == options and worker_env == env
        # one rendezvous of --nnodes = completions nodes, at pod 0's stable name, hosted by pod 0 alone
        assert config.rdzv_backend == "c10d" and config.run_id == name
        assert config.min_nodes == config.max_nodes == spec["completions"] == spec["parallelism"]
        host, rdzv_port = config.rdzv_endpoint.rsplit(":", 1)
        assert host == f"{name}-0.{svc['metadata']['name']}"
        assert int(rdzv_port) == port(c, "rendezvous") == {p["name"]: p["port"] for p in svc["spec"]["ports"]}["rendezvous"]
        params = rdzv_params(config)
        assert params.get_as_bool("is_host") is (index == 0)
        assert config.local_addr == f"{name}-{index}.{svc['metadata']['name']}"  # its own stable name
        # a pod waits for the others longer than a replaced one takes to come (the defaults: 600 s, 60 s)
        assert params.get_as_int("join_timeout") >= 600 and params.get_as_int("read_timeout") >= 600
        # one rank per GPU; a dead rank takes the site down and torchrun brings it back in place
        assert config.nproc_per_node == c["resources"]["limits"]["nvidia.com/gpu"]
        assert config.max_restarts >= 1
        # nothing else differs between the pods
        differs = {a.split("=", 1)[0] for a in set(argv) ^ set(first_argv)}
        assert len(argv) == len(first_argv) and differs <= {"--local-addr", "--rdzv-conf"}, differs
        assert {k for k, v in config.rdzv_configs.items() if v != first.rdzv_configs[k]} <= {"is_host"}
    # c10d ignores --node-rank and numbers the nodes by their addresses: pod 0 is node 0, so it has rank 0
    # (the session, /metrics); --node-rank would only earn a warning
    assert sorted(p[0].local_addr for p in pods)[0] == first.local_addr
    assert not any("node-rank" in a or "node_rank" in a for a in run_site_pod(tmp_path / "again", 1)[0])

    config = parse(["worker", *options], {k: v for k, v in env.items() if k != "FEDBLOCK_LOG_LEVEL"})
    assert config.name == name  # one federated identity: the Job's name
    assert config.coordinator == f"{coordinator['metadata']['name']}:{grpc_port}"
    assert config.tls_ca and not config.insecure
    assert env["FEDBLOCK_TOKEN"] == "placeholder"  # from the Secret's file (torchrun hands it to every rank)
    assert not any(a.startswith("--token") for a in options)
    assert config.metrics_port == port(c, "metrics")
    assert job["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(config.metrics_port)
    assert config.nproc_per_node == 1  # under torchrun the worker starts no torchrun of its own
    assert config.batch_size >= first.min_nodes * first.nproc_per_node  # the batch is split by rows over the ranks
    # a Job does not restart what exits 0: a short linger, inside torchrun's exit barrier (the other
    # nodes' agents wait for rank 0)
    import inspect

    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    barrier = inspect.signature(LocalElasticAgent.__init__).parameters["exit_barrier_timeout"].default
    assert 0 < config.linger < barrier
    # the token is this site's, from the worker tokens' Secret; the data is one volume for all the pods
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    (token_volume,) = [v for v in volumes.values() if v.get("secret", {}).get("secretName") == "fedblock-worker-tokens"]
    assert [i["key"] for i in token_volume["secret"]["items"]] == [name]
    assert config.data == "/data/train.jsonl" and mounts["/data"]["readOnly"] is True
    claim = volumes[mounts["/data"]["name"]]["persistentVolumeClaim"]["claimName"]
    assert set(find("PersistentVolumeClaim", claim)["spec"]["accessModes"]) & {"ReadWriteMany", "ReadOnlyMany"}
    # the same worker options as the base's workers, but for the name and the linger
    base = {a.split("=", 1)[0]: a for a in worker_commands(tmp_path / "base")[0][1][1:]}
    mine = {a.split("=", 1)[0]: a for a in options}
    assert set(base) == set(mine)
    for flag in set(base) - {"--name", "--linger", "--tls-ca"}:
        assert base[flag] == mine[flag], flag
    assert Path(base["--tls-ca"].split("=", 1)[1]).name == Path(mine["--tls-ca"].split("=", 1)[1]).name


def test_site_probes(tmp_path):
    """No liveness probe (torchrun watches the ranks; one on /metrics would kill pod 0 while it waits at the
    rendezvous); readiness: pod 0 when rank 0 serves /metrics, the others as soon as they run."""
    import http.server
    import socket
    import threading

    c = container(site_job())
    assert "livenessProbe" not in c and "startupProbe" not in c
    cmd = c["readinessProbe"]["exec"]["command"]
    assert cmd[:2] == ["/bin/sh", "-c"]
    url = f"http://127.0.0.1:{port(c, 'metrics')}/metrics"
    assert url in cmd[2]
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}  # `python` as in the image

    def probe(index: int, metrics_port: int) -> int:
        script = cmd[2].replace(url, f"http://127.0.0.1:{metrics_port}/metrics")
        return subprocess.run(["/bin/sh", "-c", script], env={**env, "JOB_COMPLETION_INDEX": str(index)},
                              capture_output=True, timeout=30).returncode

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert probe(1, closed) == 0  # a pod > 0 serves nothing
    assert probe(0, closed) != 0  # rank 0 not serving yet

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/metrics" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert probe(0, server.server_address[1]) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert c["readinessProbe"]["timeoutSeconds"] > 5  # the probe's own urlopen timeout


def test_readme_network_policy_for_a_site():
    """The NetworkPolicy deploy/README.md shows for a namespace that denies by default: every port between
    the pods of the site (the rendezvous, and the ephemeral ports of the ranks' store, gloo and NCCL)."""
    text = (ROOT / "deploy" / "README.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "kind: NetworkPolicy" in b]
    (policy,) = blocks
    validate(policy)
    labels = site_job()["spec"]["template"]["metadata"]["labels"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= labels.items()
    (rule,) = policy["spec"]["ingress"]
    assert "ports" not in rule  # all ports
    assert [peer["podSelector"]["matchLabels"] for peer in rule["from"]] == [selector]


# ---- the rendered deployment ----------------------------------------------------------------------


def test_make_secrets_checks_its_tools_before_writing(tmp_path):
    secrets = tmp_path / "secrets"
    env = {"PATH": "/usr/bin:/bin", "FEDBLOCK": str(tmp_path / "no-such-fedblock")}
    r = subprocess.run(["sh", str(K8S / "make-secrets.sh"), str(secrets)], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "not found" in r.stderr
    assert not secrets.exists()  # nothing written, so a rerun with the tool in place works


@pytest.mark.skipif(shutil.which("kubectl") is None or shutil.which("openssl") is None,
                    reason="needs kubectl (its built-in kustomize) and openssl")
def rendered(overlay):
    """The overlay as kustomize renders it, each object validated, in the fedblock namespace and labelled."""
    r = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    for d in docs:
        validate(d)
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "fedblock", d["metadata"]["name"]
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "fedblock"
    return docs


def test_make_secrets_and_kustomize_build(tmp_path):

    from fedblock.common.security import hash_token

    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("secrets"))
    secrets = tree / "overlays" / "example" / "secrets"
    workers = worker_sts()["spec"]["replicas"]
    sites = sorted(site_names())
    env = {"PATH": "/usr/bin:/bin", "FEDBLOCK": str(Path(sys.executable).parent / "fedblock")}
    r = subprocess.run(["sh", str(tree / "make-secrets.sh"), str(secrets), str(workers), "fedblock", *sites], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    # a second run refuses to overwrite
    again = subprocess.run(["sh", str(tree / "make-secrets.sh"), str(secrets)], env=env, capture_output=True, text=True)
    assert again.returncode == 1
    # tokens: each worker's token hashes to its line in the coordinator's file
    tokens = yaml.safe_load((secrets / "tokens.yaml").read_text())
    worker_tokens = dict(line.split("=", 1) for line in (secrets / "worker-tokens.env").read_text().split())
    assert set(tokens) == set(worker_tokens) == {f"worker-{i}" for i in range(workers)} | set(sites)
    for name, token in worker_tokens.items():
        assert tokens[name] == hash_token(token)
    admin = yaml.safe_load((secrets / "admin-tokens.yaml").read_text())
    assert admin == {"admin": hash_token((secrets / "admin.token").read_text().strip())}
    # the certificate names what the workers and the probes dial
    san = subprocess.run(["openssl", "x509", "-in", str(secrets / "tls.crt"), "-noout", "-ext", "subjectAltName"],
                         capture_output=True, text=True, check=True).stdout
    _, live = probe_commands()
    assert f"DNS:{live[live.index('--tls-server-name') + 1]}," in san
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(secrets / "ca.crt"), str(secrets / "tls.crt")],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr

    docs = rendered(tree / "overlays" / "example")
    secret_names = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    assert len(secret_names) == 4
    worker_secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].startswith("fedblock-worker-tokens"))
    assert set(worker_secret["data"]) == set(worker_tokens)
    # every reference to a generated Secret points at its hashed name
    for d in docs:
        if d["kind"] == "StatefulSet":
            for v in d["spec"]["template"]["spec"]["volumes"]:
                names = [s["secret"]["name"] for s in v.get("projected", {}).get("sources", []) if "secret" in s]
                names += [v["secret"]["secretName"]] if "secret" in v else []
                assert set(names) <= secret_names, names

    # the deployment with a site of several nodes: the example's objects plus the site's
    example = {(d["kind"], d["metadata"]["name"]) for d in docs}
    docs = rendered(tree / "overlays" / "multinode-site")
    assert {(d["kind"], d["metadata"]["name"]) for d in docs} == example | {
        (d["kind"], d["metadata"]["name"]) for d in site_manifests()}
    secrets_by_name = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    (job,) = [d for d in docs if d["kind"] == "Job"]
    assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "fedblock"
    for v in job["spec"]["template"]["spec"]["volumes"]:
        if "secret" in v:  # the hashed name, and the keys the pod takes are in it
            assert v["secret"]["secretName"] in secrets_by_name, v
            for item in v["secret"].get("items", []):
                assert item["key"] in secrets_by_name[v["secret"]["secretName"]]["data"], item
    # the coordinator knows the site's token
    import base64

    auth = next(d for n, d in secrets_by_name.items() if n.startswith("fedblock-auth-tokens"))
    assert job["metadata"]["name"] in yaml.safe_load(base64.b64decode(auth["data"]["tokens.yaml"]))
