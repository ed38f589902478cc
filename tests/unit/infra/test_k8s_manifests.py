"""infra/k8s as a cluster would take it: every object of the base, each overlay and the extras passes
Kubernetes' own schemas (kubernetes-validate, strict) or KEDA's (infra/k8s/schemas), and the objects
agree with each other and with the code -- settings, Secrets, selectors, probes, ports, the image, the
queue KEDA watches. Each check is also shown catching a broken manifest."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.dicom.peers import allowed_senders
from services.gateway.app import create_app
from shared.core.settings import Settings
from shared.db.migrate import upgrade_database
from tests.unit.infra import k8s
from tests.unit.infra.k8s import Manifest

BUILDS = {"base": k8s.BASE, **{f"overlays/{path.name}": path for path in k8s.OVERLAYS}}


def built(name: str) -> list[Manifest]:
    objects = k8s.build(BUILDS[name])
    if name == "base":  # the optional Jobs run beside the base
        objects += [document for path in k8s.EXTRAS for document in k8s.load_documents(path)]
    return objects


@pytest.fixture(scope="module")
def base() -> list[Manifest]:
    return built("base")


@pytest.fixture(scope="module")
def gateway_serves(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], bool]:
    """Whether the gateway has a GET route at a path (asked as the kubelet asks: no key, the pod's address)."""
    settings = Settings(home=tmp_path_factory.mktemp("gateway"), auth="on")
    upgrade_database(settings)
    client = TestClient(create_app(settings), base_url="http://10.1.2.3:8000")
    return lambda path: client.get(path).status_code not in (404, 405)


def settings_of(objects: list[Manifest], container: Manifest, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings the container's process builds from its environment (pydantic parses the strings)."""
    with monkeypatch.context() as patch:
        for name in k8s.SETTING_NAMES:
            patch.delenv(name, raising=False)
        for name, value in k8s.container_environment(objects, container).items():
            patch.setenv(name, value)
        return Settings()


def settings_by_container(objects: list[Manifest], monkeypatch: pytest.MonkeyPatch) -> dict[str, Settings]:
    return {
        k8s.container_key(workload, container): settings_of(objects, container, monkeypatch)
        for workload, container in k8s.containers(objects)
    }


def all_problems(objects: list[Manifest], serves: Callable[[str], bool], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    config = k8s.named(objects, "ConfigMap", "xrayq-config")
    prefix = config["data"].get("XRAYQ_BROKER_KEY_PREFIX", "") if config else ""
    return (
        k8s.settings_name_problems(objects)
        + k8s.reference_problems(objects)
        + k8s.selector_problems(objects)
        + k8s.probe_problems(objects, serves)
        + k8s.service_problems(objects)
        + k8s.listening_port_problems(objects, settings_by_container(objects, monkeypatch))
        + k8s.security_problems(objects, k8s.dockerfile_user())
        + k8s.autoscaling_problems(objects, prefix)
    )


# ------------------------------------------------------------------------------------------- schemas


def test_there_is_something_to_check() -> None:
    assert [path.name for path in k8s.OVERLAYS] == ["gpu", "production"]
    assert k8s.EXTRAS and k8s.SECRETS_EXAMPLE.is_file()


@pytest.mark.parametrize("version", k8s.KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", sorted(BUILDS))
def test_every_object_passes_its_schema(name: str, version: str) -> None:
    objects = built(name) + k8s.secrets_example()
    kinds = {manifest["kind"] for manifest in objects}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ScaledObject", "Job"} <= kinds
    assert [problem for manifest in objects for problem in k8s.schema_errors(manifest, version)] == []


def test_the_schemas_refuse_a_broken_object(base: list[Manifest]) -> None:
    deployment = copy.deepcopy(k8s.named(base, "Deployment", "xrayq-gateway"))
    assert deployment is not None
    deployment["spec"]["replica"] = 2  # misspelt: the API server would drop it without a word
    (error,) = k8s.schema_errors(deployment, k8s.KUBERNETES_VERSIONS[0])
    assert "Additional properties are not allowed ('replica' was unexpected)" in error
    del deployment["spec"]["replica"]
    first_container(deployment)["ports"][0]["containerPort"] = "8000"
    assert k8s.schema_errors(deployment, k8s.KUBERNETES_VERSIONS[0]) == [
        "Deployment/xrayq-gateway: $.spec.template.spec.containers[0].ports[0].containerPort: "
        "'8000' is not of type 'integer'"
    ]

    scaled = copy.deepcopy(k8s.named(base, "ScaledObject", "xrayq-worker"))
    assert scaled is not None and k8s.schema_errors(scaled, "1.31") == []
    trigger = scaled["spec"]["triggers"][0]
    trigger["metadata"]["listLength"] = 10  # KEDA's metadata values are strings
    del trigger["metadata"]["listName"]
    scaled["spec"]["minReplicas"] = 0  # an HPA's word, not KEDA's
    errors = "\n".join(k8s.schema_errors(scaled, "1.31"))
    assert "('minReplicas' was unexpected)" in errors
    assert "$.spec.triggers[0].metadata: 'listName' is a required property" in errors
    assert "$.spec.triggers[0].metadata.listLength: 10 is not of type 'string'" in errors

    authentication = copy.deepcopy(k8s.named(base, "TriggerAuthentication", "xrayq-redis"))
    assert authentication is not None
    del authentication["spec"]["secretTargetRef"][0]["key"]
    assert k8s.schema_errors(authentication, "1.31") == [
        "TriggerAuthentication/xrayq-redis: $.spec.secretTargetRef[0]: 'key' is a required property"
    ]
    assert "no schema" in k8s.schema_errors({**authentication, "kind": "ScaledJob"}, "1.31")[0]


# ------------------------------------------------------------------------------------------- consistency


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_the_objects_agree_with_each_other_and_the_code(
    name: str, gateway_serves: Callable[[str], bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert gateway_serves("/healthz") and not gateway_serves("/healthy")
    assert all_problems(built(name), gateway_serves, monkeypatch) == []


def test_the_base_runs_compose_s_image_and_commands(base: list[Manifest]) -> None:
    assert k8s.image_problems(base) == []
    commands = {tuple(container["command"]) for _, container in k8s.containers(base)}
    roles = ("gateway", "worker", "trainer", "dicom", "migrate", "ensure-model")
    assert commands == {("xrayq", role) for role in roles}


def broken(objects: list[Manifest], kind: str, name: str) -> tuple[list[Manifest], Manifest]:
    """A copy of the objects, and the one to break."""
    objects = copy.deepcopy(objects)
    target = k8s.named(objects, kind, name)
    assert target is not None
    return objects, target


def first_container(workload: Manifest) -> Manifest:
    container: Manifest = workload["spec"]["template"]["spec"]["containers"][0]
    return container


def test_each_check_catches_what_it_is_for(
    base: list[Manifest], gateway_serves: Callable[[str], bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    objects, worker = broken(base, "Deployment", "xrayq-worker")
    first_container(worker)["env"].append({"name": "XRAYQ_WORKER_CONCURENCY", "value": "2"})
    assert k8s.settings_name_problems(objects) == [
        "Deployment/xrayq-worker container worker: XRAYQ_WORKER_CONCURENCY is not a setting of shared/core/settings.py"
    ]

    objects, worker = broken(base, "Deployment", "xrayq-worker")
    first_container(worker)["envFrom"][1]["secretRef"]["name"] = "xrayq-secret"
    authentication = k8s.named(objects, "TriggerAuthentication", "xrayq-redis")
    assert authentication is not None
    authentication["spec"]["secretTargetRef"][0]["key"] = "host"
    assert k8s.reference_problems(objects) == [
        "Deployment/xrayq-worker container worker: Secret xrayq-secret does not exist",
        "TriggerAuthentication/xrayq-redis: Secret xrayq-redis-keda has no key host",
    ]

    objects, service = broken(base, "Service", "xrayq-gateway")
    service["spec"]["selector"]["app.kubernetes.io/component"] = "gateways"
    assert k8s.selector_problems(objects) == [
        "Service/xrayq-gateway: its selector {'app.kubernetes.io/name': 'xrayq', "
        "'app.kubernetes.io/component': 'gateways'} chooses the pods of no workload"
    ]
    objects, budget = broken(base, "PodDisruptionBudget", "xrayq-worker")
    del budget["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]  # every xrayq pod
    assert "chooses the pods of" in k8s.selector_problems(objects)[0]

    objects, service = broken(base, "Service", "xrayq-gateway")
    service["spec"]["type"] = "ClusterIp"
    dicom_service = k8s.named(objects, "Service", "xrayq-dicom")
    assert dicom_service is not None
    del dicom_service["spec"]["externalTrafficPolicy"]
    assert k8s.service_problems(objects) == [
        "Service/xrayq-gateway: type ClusterIp is none of ['ClusterIP', 'ExternalName', 'LoadBalancer', 'NodePort']",
        "Service/xrayq-dicom: an outside sender's address is lost without externalTrafficPolicy Local",
    ]

    objects, gateway = broken(base, "Deployment", "xrayq-gateway")
    first_container(gateway)["readinessProbe"]["httpGet"]["path"] = "/ready"
    first_container(gateway)["livenessProbe"]["httpGet"]["port"] = "web"
    assert k8s.probe_problems(objects, gateway_serves) == [
        "Deployment/xrayq-gateway container gateway: livenessProbe uses port web, which it does not name",
        "Deployment/xrayq-gateway container gateway: readinessProbe asks for /ready, "
        "which is no GET route of the gateway",
    ]

    objects, worker = broken(base, "Deployment", "xrayq-worker")
    first_container(worker)["ports"][0]["containerPort"] = 9102
    assert k8s.listening_port_problems(objects, settings_by_container(objects, monkeypatch)) == [
        "Deployment/xrayq-worker container worker: port metrics is 9102, but the process listens on 9101 "
        "(XRAYQ_WORKER_METRICS_PORT)"
    ]

    objects, trainer = broken(base, "Deployment", "xrayq-trainer")
    del first_container(trainer)["securityContext"]["readOnlyRootFilesystem"]
    trainer["spec"]["template"]["spec"]["securityContext"]["runAsUser"] = 0
    trainer["spec"]["template"]["spec"]["volumes"].append({"name": "docker", "hostPath": {"path": "/var/run"}})
    assert k8s.security_problems(objects, k8s.dockerfile_user()) == [
        "Deployment/xrayq-trainer: wants runAsUser 10001 (the image's USER)",
        "Deployment/xrayq-trainer: volume docker is of a type the restricted policy refuses",
        "Deployment/xrayq-trainer container trainer: wants readOnlyRootFilesystem true",
    ]

    objects, scaled = broken(base, "ScaledObject", "xrayq-worker")
    scaled["spec"]["triggers"][0]["metadata"]["listName"] = "celery"
    deployment = k8s.named(objects, "Deployment", "xrayq-worker")
    assert deployment is not None
    deployment["spec"]["replicas"] = 2
    assert k8s.autoscaling_problems(objects, "") == [
        "Deployment/xrayq-worker: sets replicas, which ScaledObject/xrayq-worker owns (a re-apply resets it)",
        "ScaledObject/xrayq-worker: watches the list 'celery'; Celery queues predictions on 'predict' "
        "(XRAYQ_BROKER_KEY_PREFIX + queue)",
    ]
    assert "watches the list 'predict'" in k8s.autoscaling_problems(base, "site-a:")[0]

    objects, dicom = broken(base, "Deployment", "xrayq-dicom")
    first_container(dicom)["command"] = ["xrayq", "receiver"]
    first_container(dicom)["image"] = "xrayq-dicom:latest"
    assert len(k8s.image_problems(objects)) == 2


# ------------------------------------------------------------------------------------------- behaviour


def test_every_container_starts_with_valid_settings_for_the_services_mode(
    base: list[Manifest], monkeypatch: pytest.MonkeyPatch
) -> None:
    for workload, container in k8s.containers(base):
        settings = settings_of(base, container, monkeypatch)
        assert not settings.embedded and settings.auth_enabled, k8s.where(workload, container)
        assert settings.uses_s3 and settings.database_url.startswith("postgresql")
        assert settings.log_format == "json"
    dicom = k8s.named(base, "Deployment", "xrayq-dicom")
    assert dicom is not None
    receiver = settings_of(base, first_container(dicom), monkeypatch)
    assert allowed_senders(receiver)  # the receiver would start: its allow-list names who may send


def test_probes_answer_the_kubelet_without_an_api_key(tmp_path: Path) -> None:
    """The kubelet sends no key, and the pod's address as Host: the probes must answer it all the same."""
    settings = Settings(home=tmp_path, auth="on")
    upgrade_database(settings)
    client = TestClient(create_app(settings), base_url="http://10.1.2.3:8000")
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")  # no model yet: not ready, but answered
    assert ready.json()["checks"]["database"]["ok"] and not ready.json()["checks"]["model"]["ok"]
    assert ready.status_code == 503 and ready.json()["ready"] is False
    assert client.get("/v1/jobs").status_code == 401  # the API itself still wants a key


def test_workers_scale_to_zero_and_wake_at_the_first_message(base: list[Manifest]) -> None:
    scaled = k8s.named(base, "ScaledObject", "xrayq-worker")
    assert scaled is not None
    spec = scaled["spec"]
    assert spec["minReplicaCount"] == 0 and spec["maxReplicaCount"] > 0
    (trigger,) = spec["triggers"]
    # KEDA activates the target (0 -> 1) when the list is longer than activationListLength.
    assert trigger["type"] == "redis" and trigger["metadata"]["activationListLength"] == "0"
    assert trigger["authenticationRef"]["name"] == "xrayq-redis"
    gateway = k8s.named(base, "HorizontalPodAutoscaler", "xrayq-gateway")
    assert gateway is not None and gateway["spec"]["minReplicas"] >= 2  # the API never scales to zero


def test_the_migration_runs_before_everything_else(base: list[Manifest]) -> None:
    job = k8s.named(base, "Job", "xrayq-migrate")
    assert job is not None
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert job["metadata"]["annotations"]["argocd.argoproj.io/hook"] == "PreSync"
    assert first_container(job)["command"] == ["xrayq", "migrate"]
    # `kubectl apply -k ... -l xrayq.io/phase=pre-install` (README) applies the Job and all it needs.
    first = [
        manifest for manifest in base if manifest["metadata"].get("labels", {}).get("xrayq.io/phase") == "pre-install"
    ]
    assert {(manifest["kind"], manifest["metadata"]["name"]) for manifest in first} == {
        ("Namespace", "xrayq"),
        ("ServiceAccount", "xrayq"),
        ("ConfigMap", "xrayq-config"),
        ("Job", "xrayq-migrate"),
    }
    assert k8s.reference_problems(first) == []


def test_the_secrets_example_holds_no_secret_and_no_kustomization_applies_it(base: list[Manifest]) -> None:
    for secret in k8s.secrets_example():
        assert secret["kind"] == "Secret" and "data" not in secret
        for key, value in secret["stringData"].items():
            assert "CHANGE-ME" in value or key == "address", (secret["metadata"]["name"], key)
    for name in BUILDS:
        assert k8s.of_kind(built(name), "Secret") == [], name  # a re-apply never overwrites the real ones


def test_the_production_overlay_pins_the_image_and_keeps_three_gateways() -> None:
    objects = built("overlays/production")
    assert {container["image"] for _, container in k8s.containers(objects)} == {"registry.example.org/xrayq:0.1.0"}
    hpa = k8s.named(objects, "HorizontalPodAutoscaler", "xrayq-gateway")
    assert hpa is not None and hpa["spec"]["minReplicas"] == 3
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"  # the rest of the base is kept
    assert {manifest["metadata"].get("namespace") for manifest in objects if manifest["kind"] != "Namespace"} == {
        "xrayq"
    }


def test_the_gpu_overlay_adds_cuda_workers_and_keeps_cpu_workers_for_a_backlog() -> None:
    objects = built("overlays/gpu")
    assert {container["image"] for _, container in k8s.containers(objects)} == {"registry.example.org/xrayq:0.1.0"}
    gpu = k8s.named(objects, "Deployment", "xrayq-worker-gpu")
    assert gpu is not None
    pod = gpu["spec"]["template"]["spec"]
    assert first_container(gpu)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "XRAYQ_DEVICE", "value": "cuda"} in first_container(gpu)["env"]
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu" and pod["nodeSelector"]
    gpu_scaling = k8s.named(objects, "ScaledObject", "xrayq-worker-gpu")
    assert gpu_scaling is not None and gpu_scaling["spec"]["minReplicaCount"] == 0
    cpu_scaling = k8s.named(objects, "ScaledObject", "xrayq-worker")
    assert cpu_scaling is not None
    (trigger,) = cpu_scaling["spec"]["triggers"]
    assert trigger["metadata"]["activationListLength"] == "200"
    assert trigger["authenticationRef"]["name"] == "xrayq-redis"


# ------------------------------------------------------------------------------------------- the builder


def test_the_builder_merges_as_kustomize_does() -> None:
    # Custom resources: JSON merge patch, a list replaces the list.
    assert k8s.json_merge({"a": [1, 2], "b": {"c": 1, "d": 2}}, {"a": [3], "b": {"d": None}}) == {
        "a": [3],
        "b": {"c": 1},
    }
    # Built-in kinds: strategic merge, containers and their env by name.
    target = {"containers": [{"name": "a", "image": "x", "env": [{"name": "A", "value": "1"}]}, {"name": "b"}]}
    patch = {"containers": [{"name": "a", "env": [{"name": "B", "value": "2"}]}]}
    assert k8s.strategic_merge(target, patch) == {
        "containers": [
            {"name": "a", "image": "x", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
            {"name": "b"},
        ]
    }


def test_the_builder_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {team: x}\n")
    with pytest.raises(ValueError, match="commonLabels"):
        k8s.build(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(f"resources: [{k8s.BASE}]\npatches: [{{path: p.yaml}}]\n")
    (tmp_path / "p.yaml").write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: xrayq-gateways}\n")
    with pytest.raises(ValueError, match="not among the resources"):
        k8s.build(tmp_path)


def test_the_readme_s_kubectl_commands_name_what_exists(base: list[Manifest]) -> None:
    """The README's apply order, as written: its files, kustomizations, label selector and Job exist."""
    readme = (k8s.ROOT / "README.md").read_text()
    section = readme[readme.index("## Kubernetes") :]
    commands = re.findall(r"^kubectl .*$", section[: section.index("\n## ")], re.MULTILINE)
    assert len(commands) >= 5
    for command in commands:
        for option, path in re.findall(r"(-[fk]) (infra/k8s/\S+)", command):
            target = k8s.ROOT / path
            assert (target / "kustomization.yaml").is_file() if option == "-k" else target.is_file(), command
        for key, value in re.findall(r"-l (\S+)=(\S+)", command):
            selected = [manifest for manifest in base if manifest["metadata"].get("labels", {}).get(key) == value]
            assert k8s.named(selected, "Job", "xrayq-migrate") is not None, command
        for job in re.findall(r"job/(\S+)", command):
            assert k8s.named(base, "Job", job) is not None, command
