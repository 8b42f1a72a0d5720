"""deploy/ checked offline: Kubernetes manifests against the API schemas, KEDA's ScaledObject against models
generated from its CRD, both HAProxy configurations by haproxy itself, every replica's environment by the
server's own settings, and the Kubernetes balancer's routing by pod IP on loopback."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from audio_interaction_server.config import load_config

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
COMPOSE_OVERLAY = DEPLOY / "docker-compose.replicas.yml"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
needs_haproxy = pytest.mark.skipif(not os.access(HAPROXY, os.X_OK),
                                   reason="Debian's haproxy is not installed (apt-get install haproxy; .ci/run does)")
KUBERNETES_VERSION = "1.29"  # the oldest minor still widely run; every field used here exists since then


def documents() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        found += [(path.name, document) for document in yaml.safe_load_all(path.read_text()) if document]
    return found


def of_kind(kind: str, name: str | None = None) -> dict:
    return next(doc for _, doc in documents() if doc["kind"] == kind and name in (None, doc["metadata"]["name"]))


# ---- Kubernetes ---------------------------------------------------------------------------------------------


def test_every_core_manifest_is_valid_against_the_kubernetes_schema():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate "
                                              "(the [test] extra)")
    kinds = []
    for name, document in documents():
        if document["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: checked by the next test
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)  # raises, naming the field
        kinds.append(document["kind"])
    assert sorted(kinds) == sorted(["Namespace", "Deployment", "Service", "PodDisruptionBudget", "ConfigMap",
                                    "Deployment", "Service", "PersistentVolumeClaim"])
    # The check can fail: a misspelled field of the replicas' Deployment is refused (strict: unknown fields too).
    broken = copy.deepcopy(of_kind("Deployment", "ais-replica"))
    broken["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 90
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_keda_scaledobject_is_valid_against_models_of_its_crd():
    """kubernetes-validate knows only Kubernetes' own kinds. cloudcoil-models-keda holds pydantic models generated
    from KEDA's CRD (the OpenAPI schema KEDA installs); they ignore unknown fields, so the manifest must also come
    back field for field from the model: a misspelled field would be dropped, and the round trip would differ."""
    keda = pytest.importorskip("cloudcoil.models.keda.v1alpha1", reason="pip install cloudcoil-models-keda "
                               "(the [test] extra)")
    manifest = of_kind("ScaledObject")

    def round_trip(document: dict) -> dict:
        model = keda.ScaledObject.model_validate(document)
        return json.loads(model.model_dump_json(by_alias=True, exclude_unset=True))

    assert round_trip(manifest) == manifest
    broken = copy.deepcopy(manifest)
    broken["spec"]["triggers"][0]["metricTyp"] = "Value"
    assert round_trip(broken) != broken
    wrong_type = copy.deepcopy(manifest)
    wrong_type["spec"]["maxReplicaCount"] = "sixteen"
    with pytest.raises(ValueError):
        keda.ScaledObject.model_validate(wrong_type)
    # Scaling on the share of slots in use, from the gauges the server exports.
    query = manifest["spec"]["triggers"][0]["metadata"]["query"]
    assert "ais_sessions_active" in query and "ais_sessions_max" in query
    assert manifest["spec"]["scaleTargetRef"]["name"] == of_kind("Deployment", "ais-replica")["metadata"]["name"]


def container_env(deployment: dict) -> dict[str, str]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {item["name"]: item["value"] for item in container["env"] if "value" in item}


def test_the_replicas_drain_within_the_grace_period_and_probe_the_right_endpoints():
    deployment = of_kind("Deployment", "ais-replica")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = container_env(deployment)
    assert pod["terminationGracePeriodSeconds"] > float(env["AIS_DRAIN_TIMEOUT_S"]) + 10
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready?capacity=ignore"
    assert "/v1/admin/drain" in container["lifecycle"]["preStop"]["exec"]["command"][-1]
    assert env["AIS_BUSY_REFUSAL"] == "http_503" and env["AIS_REPLICA_ID"] == "$(POD_IP)"
    service = of_kind("Service", "ais-replicas")
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    budget = of_kind("PodDisruptionBudget")
    assert budget["spec"]["selector"] == deployment["spec"]["selector"]


# ---- each replica's environment is a configuration the server accepts ---------------------------------------


def compose_defaults(value: str) -> str:
    """Compose's ``${NAME:-default}`` as it reads with nothing set."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", str(value))


def replica_environments() -> dict[str, dict[str, str]]:
    compose = yaml.safe_load(COMPOSE_OVERLAY.read_text())
    environments = {}
    for name, service in compose["services"].items():
        if "environment" in service and "AIS_REPLICA_ID" in service["environment"]:
            environments[f"compose {name}"] = {key: compose_defaults(value) for key, value in
                                               service["environment"].items()}
    pod_env = container_env(of_kind("Deployment", "ais-replica"))
    environments["kubernetes ais-replica"] = {key: value.replace("$(POD_IP)", "10.1.2.3") for key, value in
                                              pod_env.items()}
    return environments


@pytest.mark.parametrize("where", sorted(replica_environments()))
def test_every_replica_environment_is_a_valid_server_configuration(where, tmp_path):
    environ = {key: value for key, value in replica_environments()[where].items() if key.startswith("AIS_")}
    if environ.get("AIS_ENGINE__CHECKPOINT") == "/models":
        environ["AIS_ENGINE__CHECKPOINT"] = str(tmp_path)  # the volume's path inside the container
    config = load_config(None, environ)  # an unknown AIS_* name or a bad value raises, naming it
    assert config.busy_refusal == "http_503" and config.agent_port == 8001 and config.drain_timeout_s
    assert config.replica_id is not None


def test_compose_stops_replicas_after_their_drain():
    compose = yaml.safe_load(COMPOSE_OVERLAY.read_text())
    for name in ("ais1", "ais2", "ais3", "demo1", "demo2", "demo3"):
        service = compose["services"][name]
        grace_s = int(service["stop_grace_period"].removesuffix("s"))
        assert grace_s > float(compose_defaults(service["environment"]["AIS_DRAIN_TIMEOUT_S"])), name
    assert compose["services"]["server"]["profiles"] == ["single"]


def test_compose_replicas_trust_their_balancer_alone_as_a_proxy():
    """A replica believes X-Forwarded-For from its balancer's one address, not from the whole private range: any
    other container (or host) there could otherwise choose the address the per-IP limits and the log see."""
    import ipaddress

    compose = yaml.safe_load(COMPOSE_OVERLAY.read_text())
    services = compose["services"]
    for balancer, replicas in (("lb", ("ais1", "ais2", "ais3")), ("demo-lb", ("demo1", "demo2", "demo3"))):
        (network, attachment), = services[balancer]["networks"].items()
        balancer_address = ipaddress.ip_address(compose_defaults(attachment["ipv4_address"]))
        subnet = ipaddress.ip_network(compose_defaults(compose["networks"][network]["ipam"]["config"][0]["subnet"]))
        assert balancer_address in subnet
        for name in replicas:
            environ = {key: compose_defaults(value) for key, value in services[name]["environment"].items()}
            config = load_config(None, {key: value for key, value in environ.items()
                                        if key.startswith("AIS_TRANSPORT__")})
            trusted = [ipaddress.ip_network(proxy, strict=False) for proxy in config.transport.trusted_proxies]
            assert trusted == [ipaddress.ip_network(balancer_address)], (name, trusted)
            assert list(services[name]["networks"]) == [network], name  # where the balancer reaches it


def test_the_public_service_keeps_the_clients_address_for_haproxy_to_forward():
    """Behind a LoadBalancer Service with the default externalTrafficPolicy (Cluster), the node that takes a
    connection NATs it: HAProxy saw node addresses and forwarded those, so every client that one node carried
    shared one address's limits on the replicas (one flooder could get the others refused). ``Local`` keeps the
    client's address (review, 2026-12-06)."""
    service = of_kind("Service", "ais")
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"].get("externalTrafficPolicy") == "Local"


# ---- HAProxy ------------------------------------------------------------------------------------------------


def kubernetes_haproxy_cfg() -> str:
    return of_kind("ConfigMap", "ais-haproxy")["data"]["haproxy.cfg"]


@needs_haproxy
def test_both_haproxy_configurations_pass_haproxy_check(tmp_path):
    env = {**os.environ, "AIS_LB_ADMIN_SOCKET": str(tmp_path / "admin.sock")}  # the compose file's defaults
    compose = subprocess.run([HAPROXY, "-c", "-f", str(DEPLOY / "haproxy" / "haproxy.cfg")], env=env,
                             capture_output=True, text=True, timeout=30)
    assert compose.returncode == 0, compose.stdout + compose.stderr
    cfg = tmp_path / "kubernetes-haproxy.cfg"
    cfg.write_text(kubernetes_haproxy_cfg())
    kubernetes = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30,
                                env={**os.environ, "POD_CIDR": "10.0.0.0/8", "POD_NAMESPACE": "audio-interaction"})
    assert kubernetes.returncode == 0, kubernetes.stdout + kubernetes.stderr


@needs_haproxy
def test_kubernetes_balancer_routes_a_subscriber_to_the_pod_its_session_id_names(tiny_checkpoint, tmp_path):
    """The Kubernetes configuration on loopback: a replica on 127.0.0.2 (its "pod IP", also its replica id), the
    pod network 127.0.0.0/8; only the listening addresses and ports are changed for this machine."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    from benchmarks.harness import free_port, wait_for_port

    skip_unless_loopback_binds("127.0.0.2")
    replica = balancer = None
    try:
        # The replica picks its own port (port 0) and logs it: a port chosen here and bound later may be taken
        # in between by a test on another worker (one on 0.0.0.0 takes it on every address).
        replica, replica_port = spawn_replica_on(tiny_checkpoint, "127.0.0.2", tmp_path / "replica.log")
        balancer_port = free_port()
        cfg = kubernetes_haproxy_cfg()
        for old, new in (("bind :8000", f"bind 127.0.0.1:{balancer_port}"),
                         ("bind 127.0.0.1:8404", f"bind 127.0.0.1:{free_port()}"),
                         ("/tmp/haproxy-admin.sock", str(tmp_path / "admin.sock")),
                         ("set-dst-port int(8000)", f"set-dst-port int({replica_port})")):
            assert old in cfg
            cfg = cfg.replace(old, new)
        (tmp_path / "haproxy.cfg").write_text(cfg)
        balancer = subprocess.Popen([HAPROXY, "-db", "-f", str(tmp_path / "haproxy.cfg")], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL,
                                    env={**os.environ, "POD_CIDR": "127.0.0.0/8", "POD_NAMESPACE": "test"})
        url = f"ws://127.0.0.1:{balancer_port}"
        wait_for_port(balancer_port)
        with connect(f"ws://127.0.0.2:{replica_port}/v1/stream") as stream:
            session_id = json.loads(stream.recv(timeout=10))["session_id"]
            assert session_id.startswith("127.0.0.2_")
            with connect(f"{url}/v1/sessions/{session_id}/events") as subscriber:
                stream.send(json.dumps({"type": "session.close"}))
                closed = json.loads(subscriber.recv(timeout=10))
            assert closed["type"] == "session.closed" and closed["session_id"] == session_id
        # An id naming an address outside the pod network (or no address) goes nowhere.
        for foreign in ("192.168.1.1", "evil.example"):
            with pytest.raises(InvalidStatus) as refused:
                connect(f"{url}/v1/sessions/{foreign}_{'0' * 32}/events", open_timeout=5)
            assert refused.value.response.status_code == 404
    finally:
        for process in (balancer, replica):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(timeout=10)


def skip_unless_loopback_binds(host: str) -> None:
    """Skip, saying so, where this machine cannot listen on the loopback address ``host`` (Linux serves all of
    127.0.0.0/8 on lo; a sandboxed network stack may serve 127.0.0.1 alone)."""
    import errno
    import socket

    with socket.socket() as probe:
        try:
            probe.bind((host, 0))
        except OSError as error:
            if error.errno != errno.EADDRNOTAVAIL:
                raise
            pytest.skip(f"this machine cannot listen on {host} (the pod's address in this test): {error}")


def spawn_replica_on(checkpoint: Path, host: str, log_path: Path) -> tuple[subprocess.Popen, int]:
    """The real entry point on the pod's address, on a port it picks itself; (process, port) once ready. Its log
    goes to ``log_path`` and is quoted if it exits or never serves."""
    import sys
    import time
    import urllib.error
    import urllib.request

    env = {**os.environ, "AIS_ENGINE__DEVICE": "cpu", "AIS_REPLICA_ID": host, "AIS_LOG_LEVEL": "info"}
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "audio_interaction_server", "--host", host, "--port", "0",
                                    "--checkpoint", str(checkpoint)], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    port = None
    while True:
        assert process.poll() is None, f"the replica exited ({process.returncode}):\n{log_path.read_text()}"
        assert time.monotonic() < deadline, f"the replica never became ready:\n{log_path.read_text()}"
        if port is None:
            found = re.search(rf"running on http://{re.escape(host)}:(\d+)", log_path.read_text())
            port = int(found.group(1)) if found else None
        if port is not None:
            try:
                with urllib.request.urlopen(f"http://{host}:{port}/ready", timeout=5):
                    return process, port
            except (urllib.error.URLError, OSError):  # 503 while the model loads
                pass
        time.sleep(0.1)


def test_compose_only_variables_of_the_overlay_do_not_use_the_settings_prefix():
    """As for docker-compose.yml: a variable the user exports for Compose must not reach a server started by hand
    as an unknown AIS_* setting (it would stop with exit status 2)."""
    from tests.test_deployment import is_setting

    interpolated = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE_OVERLAY.read_text()))
    assert {"LB_ADDRESS", "REPLICA_SUBNET", "AIS_DRAIN_TIMEOUT_S"} <= interpolated
    assert sorted(name for name in interpolated if name.startswith("AIS_") and not is_setting(name)) == []


# ---- one GPU host, several fronts on its engine (serve --fronts N) ------------------------------------------

FRONTS_COMPOSE = DEPLOY / "docker-compose.fronts.yml"
FRONTS_KUBERNETES = KUBERNETES / "fronts"


def fronts_documents() -> list[dict]:
    return [document for path in sorted(FRONTS_KUBERNETES.glob("*.yaml"))
            for document in yaml.safe_load_all(path.read_text()) if document]


def fronts_environments() -> dict[str, dict[str, str]]:
    services = yaml.safe_load(FRONTS_COMPOSE.read_text())["services"]
    deployment = next(doc for doc in fronts_documents() if doc["kind"] == "Deployment")
    return {"compose ais1": {key: compose_defaults(value) for key, value in services["ais1"]["environment"].items()},
            "kubernetes ais-fronts": {key: value.replace("$(POD_IP)", "10.1.2.3")
                                      for key, value in container_env(deployment).items()}}


@pytest.mark.parametrize("where", sorted(fronts_environments()))
def test_every_fronts_host_environment_is_a_valid_configuration_of_four_fronts(where, tmp_path):
    environ = {key: value for key, value in fronts_environments()[where].items() if key.startswith("AIS_")}
    environ["AIS_ENGINE__CHECKPOINT"] = str(tmp_path)
    config = load_config(None, environ)
    assert config.fronts == 4 and config.busy_refusal == "http_503" and config.drain_timeout_s
    assert (config.port, config.agent_port) == (8000, 8100)


def test_a_hung_front_is_the_supervisors_to_restart_before_the_pods_liveness_probe_restarts_the_pod(tmp_path):
    """Front 0 answers the pod's liveness probe: the supervisor must kill and restart a hung front 0 (with some
    seconds for its start) before the probe's failures restart the whole pod, engine and every front with it."""
    deployment = next(doc for doc in fronts_documents() if doc["kind"] == "Deployment")
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]
    environ = {key: value for key, value in fronts_environments()["kubernetes ais-fronts"].items()
               if key.startswith("AIS_")}
    config = load_config(None, {**environ, "AIS_ENGINE__CHECKPOINT": str(tmp_path)})
    front_start_s, supervisor_look_s = 10.0, 0.5
    # The first failed probe may come just after the hang begins: the pod is restarted after the last failure,
    # (failureThreshold - 1) periods later; the restarted front must answer a probe (timeoutSeconds) by then.
    restarted_front_answers_s = (config.front_hang_timeout_s + supervisor_look_s + front_start_s
                                 + probe.get("timeoutSeconds", 1))
    assert restarted_front_answers_s <= probe["periodSeconds"] * (probe["failureThreshold"] - 1)


def test_the_fronts_balancer_names_each_front_by_its_replica_id_port_and_agent_port(tmp_path):
    """haproxy-fronts.cfg's servers are the fronts the compose host starts: the names their session ids begin
    with, their ports and their agents' ports, as api/fronts.front_config gives them."""
    from audio_interaction_server.api.fronts import front_config

    environ = {key: value for key, value in fronts_environments()["compose ais1"].items() if key.startswith("AIS_")}
    config = load_config(None, {**environ, "AIS_ENGINE__CHECKPOINT": str(tmp_path)})
    servers = re.findall(r'^\s*server (\S+) "\$\{AIS1_HOST-ais1\}:(\d+)" agent-port (\d+)$',
                         (DEPLOY / "haproxy" / "haproxy-fronts.cfg").read_text(), re.M)
    fronts = [front_config(config, index) for index in range(config.fronts)]
    assert servers == [(front.replica_id, str(front.port), str(front.agent_port)) for front in fronts]
    compose = yaml.safe_load(FRONTS_COMPOSE.read_text())
    assert int(compose["services"]["ais1"]["stop_grace_period"].removesuffix("s")) > config.drain_timeout_s
    # Kubernetes: the pod's and the Service's ports are the fronts' ports, the balancer's templates their agents.
    deployment, service = (next(doc for doc in fronts_documents() if doc["kind"] == kind)
                           for kind in ("Deployment", "Service"))
    ports = {port["name"]: port["containerPort"]
             for port in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert [ports[f"http-f{i}"] for i in range(4)] == [front.port for front in fronts]
    assert [ports[f"agent-f{i}"] for i in range(4)] == [front.agent_port for front in fronts]
    assert {port["name"]: port["port"] for port in service["spec"]["ports"]} == \
        {f"http-f{i}": front.port for i, front in enumerate(fronts)}
    cfg = next(doc for doc in fronts_documents() if doc["kind"] == "ConfigMap")["data"]["haproxy.cfg"]
    assert re.findall(r"server-template f(\d)- \d+ \"_http-f(\d)\._tcp\.ais-fronts\..*\" agent-port (\d+)", cfg) == \
        [(str(i), str(i), str(front.agent_port)) for i, front in enumerate(fronts)]


def test_the_fronts_kubernetes_manifests_are_valid_against_the_kubernetes_schema():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate "
                                              "(the [test] extra)")
    kinds = []
    for document in fronts_documents():
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        kinds.append(document["kind"])
    assert sorted(kinds) == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service"]
    # Replacing ../haproxy.yaml's configuration: the same ConfigMap, which its HAProxy Deployment mounts.
    assert next(doc for doc in fronts_documents() if doc["kind"] == "ConfigMap")["metadata"]["name"] == \
        of_kind("ConfigMap", "ais-haproxy")["metadata"]["name"]


@needs_haproxy
def test_both_fronts_haproxy_configurations_pass_haproxy_check(tmp_path):
    env = {**os.environ, "AIS_LB_ADMIN_SOCKET": str(tmp_path / "admin.sock")}
    compose = subprocess.run([HAPROXY, "-c", "-f", str(DEPLOY / "haproxy" / "haproxy-fronts.cfg")], env=env,
                             capture_output=True, text=True, timeout=30)
    assert compose.returncode == 0, compose.stdout + compose.stderr
    cfg = tmp_path / "kubernetes-fronts-haproxy.cfg"
    cfg.write_text(next(doc for doc in fronts_documents() if doc["kind"] == "ConfigMap")["data"]["haproxy.cfg"])
    kubernetes = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30,
                                env={**os.environ, "POD_CIDR": "10.0.0.0/8", "POD_NAMESPACE": "audio-interaction"})
    assert kubernetes.returncode == 0, kubernetes.stdout + kubernetes.stderr


def haproxy_configurations() -> dict[str, str]:
    """Every HAProxy configuration in deploy/, by where it is."""
    return {"compose": (DEPLOY / "haproxy" / "haproxy.cfg").read_text(),
            "compose fronts": (DEPLOY / "haproxy" / "haproxy-fronts.cfg").read_text(),
            "kubernetes": kubernetes_haproxy_cfg(),
            "kubernetes fronts": next(doc for doc in fronts_documents()
                                      if doc["kind"] == "ConfigMap")["data"]["haproxy.cfg"]}


def test_every_balancer_limits_each_clients_requests_before_a_replica_works():
    """Behind a balancer every request reaches a replica from the balancer's address, so the replica's own limits
    see one client only through X-Forwarded-For, after its loop has read the request: a client flooding through
    an unlimited balancer keeps the replica busy (probe, round four). The Kubernetes configurations had no limit
    of their own; the Compose ones did."""
    for where, cfg in haproxy_configurations().items():
        frontend = cfg.partition("frontend ")[2].partition("\n    backend ")[0].partition("\nbackend ")[0]
        assert re.search(r"stick-table type ipv6 .*store http_req_rate\(10s\)", frontend), where
        assert "http-request track-sc0 src" in frontend, where
        assert re.search(r"http-request deny deny_status 429 if \{ sc_http_req_rate\(0\) gt ", frontend), where


# ---- Kubernetes service links: the variables the kubelet adds to every container --------------------------------


def service_link_environment(services: list[dict]) -> dict[str, str]:
    """The Docker-link variables Kubernetes puts in a pod's environment for every Service of its namespace that has
    a cluster IP (headless ones give none), unless the pod sets ``enableServiceLinks: false``: for the Service
    ``ais``, ``AIS_SERVICE_HOST``, ``AIS_PORT=tcp://...`` and more, all in the server's settings prefix."""
    environ: dict[str, str] = {}
    for service in services:
        spec = service["spec"]
        if spec.get("clusterIP") == "None":
            continue
        name, address = service["metadata"]["name"].upper().replace("-", "_"), "10.96.0.12"
        for index, port in enumerate(spec["ports"]):
            number, protocol = port["port"], port.get("protocol", "TCP")
            url = f"{protocol.lower()}://{address}:{number}"
            if index == 0:
                environ |= {f"{name}_SERVICE_HOST": address, f"{name}_SERVICE_PORT": str(number), f"{name}_PORT": url}
            if "name" in port:
                environ[f"{name}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = str(number)
            prefix = f"{name}_PORT_{number}_{protocol}"
            environ |= {prefix: url, f"{prefix}_PROTO": protocol.lower(), f"{prefix}_PORT": str(number),
                        f"{prefix}_ADDR": address}
    return environ


def server_pods() -> dict[str, tuple[dict, list[dict]]]:
    """Each Deployment that runs the server, with the Services of its namespace when it is applied as documented
    (haproxy.yaml's public Service ``ais`` among them: the fronts are applied after it)."""
    core = [document for _, document in documents()]
    every = core + fronts_documents()
    services = [document for document in every if document["kind"] == "Service"]
    return {document["metadata"]["name"]: (document, services) for document in every
            if document["kind"] == "Deployment" and "AIS_REPLICA_ID" in container_env(document)}


@pytest.mark.parametrize("name", sorted(server_pods()))
def test_the_kubelets_service_link_variables_do_not_stop_a_replica(name, tmp_path):
    """Kubernetes adds AIS_PORT=tcp://<ip>:80, AIS_SERVICE_HOST, ... for the Service ``ais`` to every pod of the
    namespace: AIS_* names the server reads as settings, so a replica would stop at start-up with exit status 2
    (port not an integer, service_host no such setting), in a crash loop, unless its pod turns the links off."""
    deployment, services = server_pods()[name]
    pod = deployment["spec"]["template"]["spec"]
    links = {} if pod.get("enableServiceLinks") is False else service_link_environment(services)
    container = {key: value.replace("$(POD_IP)", "10.1.2.3") for key, value in container_env(deployment).items()}
    environ = {key: value for key, value in (links | container).items() if key.startswith("AIS_")}
    environ["AIS_ENGINE__CHECKPOINT"] = str(tmp_path)
    load_config(None, environ)  # an unknown AIS_* name or a bad value raises, naming it


# ---- HAProxy's own 503: what a client hears when no replica takes a new session --------------------------------


def balancer_configurations() -> dict[str, str]:
    fronts_map = next(doc for doc in fronts_documents() if doc["kind"] == "ConfigMap")
    return {"compose replicas": (DEPLOY / "haproxy" / "haproxy.cfg").read_text(),
            "compose fronts": (DEPLOY / "haproxy" / "haproxy-fronts.cfg").read_text(),
            "kubernetes replicas": kubernetes_haproxy_cfg(),
            "kubernetes fronts": fronts_map["data"]["haproxy.cfg"]}


@needs_haproxy
@pytest.mark.parametrize("where", sorted(balancer_configurations()))
def test_the_balancers_own_503_says_retry_after_as_a_replicas_does(where, tmp_path):
    """docs/scaling.md, "What a client sees": every replica full is HTTP 503 with Retry-After: 1. With several
    fronts a full engine's agents say weight 0, and a draining or loading replica is out of rotation too: then
    HAProxy answers the 503 itself, which was its HTML page without Retry-After. Here no replica resolves at all."""
    import urllib.error
    import urllib.request

    from benchmarks.harness import free_port, wait_for_port

    port = free_port()
    cfg = balancer_configurations()[where]
    cfg = re.sub(r'bind "\$\{AIS_LB_BIND-:8000\}"|bind :8000', f"bind 127.0.0.1:{port}", cfg)
    cfg = re.sub(r'bind "\$\{AIS_LB_STATS_BIND-127.0.0.1:8404\}"|bind 127.0.0.1:8404',
                 f"bind 127.0.0.1:{free_port()}", cfg)
    cfg = cfg.replace('"${AIS_LB_ADMIN_SOCKET-/tmp/haproxy-admin.sock}"', str(tmp_path / "admin.sock"))
    cfg = cfg.replace("/tmp/haproxy-admin.sock", str(tmp_path / "admin.sock"))
    (tmp_path / "haproxy.cfg").write_text(cfg)
    env = {**os.environ, "POD_CIDR": "127.0.0.0/8", "POD_NAMESPACE": "test", "AIS1_HOST": "absent.invalid",
           **{f"AIS{i}_ADDR": "absent.invalid:1" for i in (1, 2, 3)}}
    balancer = subprocess.Popen([HAPROXY, "-db", "-f", str(tmp_path / "haproxy.cfg")], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/stream",
                                         headers={"Connection": "Upgrade", "Upgrade": "websocket"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 503
        assert refused.value.headers["Retry-After"] == "1"
        assert refused.value.headers["Content-Type"] == "application/json"
        body = json.loads(refused.value.read())
        assert body["type"] == "error" and body["code"] == "capacity" and "retry later" in body["message"]
    finally:
        balancer.kill()
        balancer.wait(timeout=10)


def test_the_gpu_host_example_config_is_the_fronts_balancers_host(tmp_path):
    """configs/gpu-host.yaml says it runs behind deploy/haproxy/haproxy-fronts.cfg, with the balancer on the same
    host (its only trusted proxy is 127.0.0.1). It had agent_port 9000 (the balancer's agents are on 8100-8103: no
    drain or full signal ever reached HAProxy), no replica_id (session ids began with the host name, so no
    subscriber or resume was routed to its front), and host 0.0.0.0: the fronts on 8000-8003 of every address,
    past the balancer's rules, and on the port the balancer binds by default."""
    from audio_interaction_server.api.fronts import front_config

    given = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "gpu-host.yaml").read_text())
    given["engine"]["checkpoint"] = str(tmp_path)
    (tmp_path / "gpu-host.yaml").write_text(yaml.safe_dump(given))
    config = load_config(tmp_path / "gpu-host.yaml", environ={})
    servers = re.findall(r'^\s*server (\S+) "\$\{AIS1_HOST-ais1\}:(\d+)" agent-port (\d+)$',
                         (DEPLOY / "haproxy" / "haproxy-fronts.cfg").read_text(), re.M)
    fronts = [front_config(config, index) for index in range(config.fronts)]
    assert servers == [(front.replica_id, str(front.port), str(front.agent_port)) for front in fronts]
    assert [str(proxy) for proxy in config.transport.trusted_proxies] in (["127.0.0.1"], ["127.0.0.1/32"])
    assert config.host == "127.0.0.1"  # the balancer is on this host: nobody else needs the fronts' ports
