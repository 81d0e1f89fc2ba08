"""deploy/k8s/: there is no cluster here, so check what can be checked. Every manifest passes
kubernetes-validate (Kubernetes 1.30, strict); each kustomization lists every file of its folder; every
fedblock command in a pod (the coordinator's args with its ConfigMap, the workers' shell line, the probes)
parses and validates with the project's own CLI; the files those commands name are the ones the volumes
provide; worker pod names are valid worker names; ports agree across containers, Services and scrape
annotations; and, where kubectl and openssl exist, make-secrets.sh + `kubectl kustomize` render a
deployment whose every object validates.

`probe_commands()` gives the coordinator's readiness and liveness exec commands, for a test that runs them
against a live coordinator."""
from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from fedblock.common.cli import _fields, make_parser, parse_configs
from fedblock.common.config import flag_name, valid_worker_name

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAY = K8S / "overlays" / "example"
K8S_VERSION = "1.30.0"
UID = 10001  # the Dockerfile's user


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests() -> list[dict]:
    return [d for p in sorted(BASE.glob("*.yaml")) if p.name != "kustomization.yaml" for d in load_all(p)]


def find(kind: str, name: str) -> dict:
    (obj,) = [d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    return obj


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


@pytest.mark.parametrize("folder", [BASE, OVERLAY], ids=["base", "overlay"])
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
    """Secret name -> its keys, from the overlay's secretGenerator (env files: keys are worker names)."""
    out = {}
    for gen in kustomization(OVERLAY)["secretGenerator"]:
        keys = {f.split("=", 1)[0] for f in gen.get("files", [])}
        if gen.get("envs"):
            keys |= {f"worker-{i}" for i in range(worker_sts()["spec"]["replicas"])}
        out[gen["name"]] = keys
    return out


def test_overlay_generates_the_referenced_secrets():
    gens = generated_secrets()
    for f in [f.split("=", 1)[-1] for g in kustomization(OVERLAY)["secretGenerator"] for f in g.get("files", []) + g.get("envs", [])]:
        assert f.startswith("secrets/"), f
    ignore = (OVERLAY / "secrets" / ".gitignore").read_text().split()
    assert "*" in ignore  # keys and tokens never get committed
    for sts in (coordinator_sts(), worker_sts()):
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


@pytest.mark.parametrize("path", sorted(p.name for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml"))
def test_manifest_validates(path):
    for doc in load_all(BASE / path):
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


@pytest.mark.parametrize("which", ["coordinator", "worker"])
def test_security_context(which):
    sts = coordinator_sts() if which == "coordinator" else worker_sts()
    pod = sts["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == UID and pod["securityContext"]["runAsGroup"] == UID
    assert pod["securityContext"]["fsGroup"] == UID
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    c = container(sts)
    assert c["image"] == "fedblock:0.1.0"
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
def test_make_secrets_and_kustomize_build(tmp_path):
    import sys

    from fedblock.common.security import hash_token

    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("secrets"))
    secrets = tree / "overlays" / "example" / "secrets"
    workers = worker_sts()["spec"]["replicas"]
    env = {"PATH": "/usr/bin:/bin", "FEDBLOCK": str(Path(sys.executable).parent / "fedblock")}
    r = subprocess.run(["sh", str(tree / "make-secrets.sh"), str(secrets), str(workers)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    # a second run refuses to overwrite
    again = subprocess.run(["sh", str(tree / "make-secrets.sh"), str(secrets)], env=env, capture_output=True, text=True)
    assert again.returncode == 1
    # tokens: each worker's token hashes to its line in the coordinator's file
    tokens = yaml.safe_load((secrets / "tokens.yaml").read_text())
    worker_tokens = dict(line.split("=", 1) for line in (secrets / "worker-tokens.env").read_text().split())
    assert set(tokens) == set(worker_tokens) == {f"worker-{i}" for i in range(workers)}
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

    r = subprocess.run(["kubectl", "kustomize", str(tree / "overlays" / "example")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    for d in docs:
        validate(d)
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "fedblock", d["metadata"]["name"]
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "fedblock"
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
