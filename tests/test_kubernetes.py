"""deploy/kubernetes/ checked offline (no cluster runs here): every manifest loads into the
official `kubernetes` client's API models, strictly (a key the API type does not have, or a value
of the wrong type, fails with its path, where the client alone would drop it silently), and the
shape the sidecar needs is there: the init container is the only one with NET_ADMIN and
excludes uid 1337, the proxy runs as 1337, probes hit the admin endpoint and grpc health, every
container asks for resources, every element is a headless Service. The proxy's TOML in the
ConfigMap is loaded by the proxy's own config code, and the certificate recipe of
docs/kubernetes.md is run for real (openssl) and its certificates used over mTLS by a real
proxy and element. docs/kubernetes.md says what this does not exercise.
"""

from __future__ import annotations

import datetime
import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s

from proxy.config import build, parse_host_port
from tests.procs import REPO, free_port
from tests.test_enforcement import send_and_end
from tests.test_reliability import Harness, h  # noqa: F401  (h: the fixture, used by name)

DEPLOY = REPO / "deploy" / "kubernetes"
DOC = REPO / "docs" / "kubernetes.md"
PRIMITIVES: dict[str, type | tuple[type, ...]] = {"str": str, "int": int, "bool": bool, "float": (int, float)}
PROXY_UID = 1337


def manifests() -> list[tuple[str, dict[str, Any]]]:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    found = []
    for name in kustomization["resources"]:
        for document in yaml.safe_load_all((DEPLOY / name).read_text()):
            if document:
                found.append((f"{name} {document['kind']}/{document['metadata']['name']}", document))
    return found


def model_name(document: dict[str, Any]) -> str:
    group_version = document["apiVersion"].split("/")[-1]
    return f"{group_version.capitalize()}{document['kind']}"


def strict(value: Any, kind: str, path: str) -> None:
    """Raises AssertionError naming `path` for a key `kind` lacks or a value of the wrong type."""
    if kind.startswith("List["):
        assert isinstance(value, list), f"{path}: {value!r} is not a list"
        for index, item in enumerate(value):
            strict(item, kind[5:-1], f"{path}[{index}]")
    elif kind.startswith("Dict["):
        assert isinstance(value, dict), f"{path}: {value!r} is not a map"
        for key, item in value.items():
            strict(item, kind[5:-1].split(", ", 1)[1], f"{path}.{key}")
    elif kind in PRIMITIVES:
        assert isinstance(value, PRIMITIVES[kind]) and not (kind != "bool" and isinstance(value, bool)), \
            f"{path}: {value!r} is not a {kind}"
    elif kind == "object":  # IntOrString and friends
        assert isinstance(value, (int, str, dict)), f"{path}: {value!r}"
    else:
        model = getattr(k8s, kind)
        assert isinstance(value, dict), f"{path}: {value!r} is not a {kind}"
        by_json = {json: attribute for attribute, json in model.attribute_map.items()}
        for key, item in value.items():
            assert key in by_json, f"{path}.{key}: not a field of {kind} (fields: {sorted(by_json)})"
            strict(item, model.openapi_types[by_json[key]], f"{path}.{key}")


@pytest.mark.parametrize(("where", "document"), manifests(), ids=[where for where, _ in manifests()])
def test_every_manifest_loads_into_the_kubernetes_api_types(where: str, document: dict[str, Any]) -> None:
    kind = model_name(document)
    strict(document, kind, where)
    loaded = k8s.ApiClient()._ApiClient__deserialize(document, kind)  # the client's own model, filled in
    assert type(loaded).__name__ == kind and loaded.metadata.name == document["metadata"]["name"]


def objects() -> dict[tuple[str, str], dict[str, Any]]:
    return {(document["kind"], document["metadata"]["name"]): document for _, document in manifests()}


def pod(kind_name: tuple[str, str]) -> dict[str, Any]:
    return objects()[kind_name]["spec"]["template"]["spec"]


def every_container() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for (kind, name), document in objects().items():
        if kind == "Deployment":
            spec = document["spec"]["template"]["spec"]
            found += [(f"{name}/{c['name']}", c) for c in spec.get("initContainers", []) + spec["containers"]]
    return found


def test_the_app_pod_has_the_sidecar_and_the_iptables_init_container() -> None:
    spec = pod(("Deployment", "app"))
    (init,) = spec["initContainers"]
    containers = {c["name"]: c for c in spec["containers"]}
    assert set(containers) == {"app", "proxy"}
    assert init["command"][:3] == ["element-proxy", "iptables", "install"]
    argv = init["command"]
    assert argv[argv.index("--exclude-uid") + 1] == str(PROXY_UID), "the proxy's own dials would loop"
    app_port = containers["app"]["ports"][0]["containerPort"]
    assert argv[argv.index("--inbound-ports") + 1] == str(app_port)
    assert init["securityContext"]["capabilities"]["add"] == ["NET_ADMIN"]
    proxy = containers["proxy"]
    assert proxy["securityContext"]["runAsUser"] == PROXY_UID
    assert containers["app"]["securityContext"]["runAsUser"] != PROXY_UID
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 15000}
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 15000}


def test_net_admin_is_granted_to_the_init_container_alone_and_nothing_is_privileged() -> None:
    for name, container in every_container():
        context = container.get("securityContext", {})
        assert not context.get("privileged"), name
        if name != "app/iptables-init":
            assert "NET_ADMIN" not in context.get("capabilities", {}).get("add", []), name
            assert context.get("runAsNonRoot") is True or pod_runs_as_non_root(name), name


def pod_runs_as_non_root(container: str) -> bool:
    return bool(pod(("Deployment", container.split("/")[0])).get("securityContext", {}).get("runAsNonRoot"))


def test_every_container_asks_for_cpu_and_memory() -> None:
    for name, container in every_container():
        requests = container.get("resources", {}).get("requests", {})
        assert {"cpu", "memory"} <= set(requests), name


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_each_element_is_a_headless_service_probed_on_grpc_health_and_drains_within_its_grace() -> None:
    config = tomllib.loads(objects()[("ConfigMap", "element-proxy-config")]["data"]["proxy.toml"])
    assert config["element"], "no element in the proxy's configuration"
    for element in config["element"]:
        address = parse_host_port("address", element["address"])
        service = objects()[("Service", address.host)]
        assert service["spec"]["clusterIP"] == "None", f"{address.host}: not headless, one pod would get it all"
        assert address.port in [port["port"] for port in service["spec"]["ports"]]
        deployment = objects()[("Deployment", address.host)]
        assert deployment["spec"]["replicas"] >= 2
        spec = deployment["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        argv = container["command"]
        health = int(flag(argv, "--health-port"))
        assert container["readinessProbe"]["grpc"]["port"] == health
        assert container["livenessProbe"]["grpc"]["port"] == health
        assert float(flag(argv, "--grace")) < spec["terminationGracePeriodSeconds"]
        mounted = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        secrets = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
        for option in ("--tls-cert", "--tls-key", "--tls-client-ca"):
            assert any(flag(argv, option).startswith(mounted[v] + "/") for v in secrets), option
        assert f"{secrets['tls']}" in DOC.read_text(), f"docs/kubernetes.md does not make Secret {secrets['tls']}"


def test_the_proxy_toml_is_valid_and_its_tls_files_come_from_the_mounted_secret(tmp_path: Path) -> None:
    """The proxy's own loader takes the ConfigMap's TOML (its TLS paths pointed at real files), and
    the paths it names are where the proxy container mounts the Secret and the ConfigMap."""
    spec = pod(("Deployment", "app"))
    proxy = next(c for c in spec["containers"] if c["name"] == "proxy")
    mounts = {m["name"]: m["mountPath"] for m in proxy["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "element-proxy-config"
    assert flag(proxy["command"], "--config") == f"{mounts['config']}/proxy.toml"
    assert f"{volumes['tls']['secret']['secretName']}" in DOC.read_text()
    text = objects()[("ConfigMap", "element-proxy-config")]["data"]["proxy.toml"]
    certs = make_certificates(tmp_path)
    for key, file in (("ca.crt", "ca.crt"), ("tls.crt", "proxy.crt"), ("tls.key", "proxy.key")):
        assert f"{mounts['tls']}/{key}" in text
        text = text.replace(f"{mounts['tls']}/{key}", str(certs / file))
    config = build(tomllib.loads(text), {}, {})
    assert str(config.admin) == "0.0.0.0:15000" and {a.port for a in config.listen} == {15002, 15006}
    assert all(e.tls is not None and e.tls.client is not None for e in config.elements)


# --- the certificate recipe of docs/kubernetes.md, run for real ----------------------------------

def recipe() -> str:
    """The doc's `openssl` block (between its recipe markers), without the kubectl lines."""
    block = re.search(r"<!-- certificates -->\s*```bash\n(.*?)```", DOC.read_text(), re.S)
    assert block, "docs/kubernetes.md has no certificate recipe"
    return "\n".join(line for line in block.group(1).splitlines() if not line.startswith("kubectl"))


def make_certificates(folder: Path) -> Path:
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", recipe()], cwd=folder, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return folder / "certs"


def test_the_documented_certificates_carry_a_working_mtls_session(h: Harness, tmp_path: Path) -> None:
    """The firewall served with the recipe's certificate and client CA, the proxy with the recipe's
    client certificate and the name the manifests make it verify (the Service's): the session comes
    up and the firewall filters."""
    from cryptography import x509

    certs = make_certificates(tmp_path)
    cert = x509.load_pem_x509_certificate((certs / "firewall.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert "firewall" in names, names
    assert cert.not_valid_after_utc > datetime.datetime.now(datetime.timezone.utc)
    argv = pod(("Deployment", "firewall"))["containers"][0]["command"]
    files = {"/etc/element/tls/tls.crt": "firewall.crt", "/etc/element/tls/tls.key": "firewall.key",
             "/etc/element/tls/ca.crt": "ca.crt"}
    options = [str(certs / files[a]) if a in files else a for a in argv[argv.index("--pattern"):]
               if a not in ("--log-format", "json")]
    upstream = h.upstream()
    port = free_port()
    _, address = h.element("elements.firewall", *options, port=port)
    p = h.proxy([address], "--target", f"127.0.0.1:{upstream.port}", "--element-tls-ca", str(certs / "ca.crt"),
                "--element-tls-cert", str(certs / "proxy.crt"), "--element-tls-key", str(certs / "proxy.key"),
                "--element-tls-server-name", "firewall")
    assert p.element("session_up") == 1, shlex.join(options)
    assert send_and_end(p.port, b"DROP TABLE users;") == "reset"


@pytest.mark.parametrize(("spec", "words"), [
    ({"replicaz": 3}, "spec.replicaz: not a field of V1DeploymentSpec"),
    ({"replicas": "3"}, "spec.replicas: '3' is not a int"),
    ({"template": {"spec": {"containers": [{"name": "a", "securityContext": {"capabilities": {"add": "NET_ADMIN"}}}]}}},
     "spec.template.spec.containers[0].securityContext.capabilities.add: 'NET_ADMIN' is not a list"),
])
def test_the_strict_loader_refuses_what_the_api_would(spec: dict[str, Any], words: str) -> None:
    with pytest.raises(AssertionError, match=re.escape(words)):
        strict({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}, "spec": spec},
               "V1Deployment", "x")
