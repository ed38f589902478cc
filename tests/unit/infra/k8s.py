"""The Kubernetes manifests of infra/k8s as a cluster would receive them, and the checks they must pass.

No kubectl, kustomize or cluster here: `build` is a small kustomize (resources, patches by path,
images, namespace -- what our kustomizations use, and an error for anything else), `schema_errors`
validates each object against the Kubernetes API's schemas (`kubernetes-validate`, strict) or, for
KEDA's custom resources, against the JSON schemas kept in infra/k8s/schemas. The `*_problems`
functions are the consistency checks; each returns sentences, empty when all is well, so a test can
show that a broken manifest is caught as well as that ours pass.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from shared.core.queue import PREDICT_QUEUE
from shared.core.settings import Settings

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "infra" / "k8s"
BASE = K8S / "base"
OVERLAYS = sorted(path.parent for path in (K8S / "overlays").glob("*/kustomization.yaml"))
SECRETS_EXAMPLE = K8S / "secrets.example.yaml"
EXTRAS = sorted((K8S / "extras").glob("*.yaml"))
# The oldest Kubernetes the manifests are written for (the preStop `sleep` action is on by default
# from 1.30; 1.31 is the oldest minor the package ships schemas for that providers still run) and a
# recent one.
KUBERNETES_VERSIONS = ("1.31", "1.34")

Manifest = dict[str, Any]

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
CLUSTER_SCOPED_KINDS = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}
# The volume types the `restricted` Pod Security Standard admits (the namespace enforces it).
RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
# The redis scaler's parameters a TriggerAuthentication may supply (KEDA docs, "Redis Lists").
REDIS_AUTH_PARAMETERS = {"address", "host", "port", "username", "password", "tls", "ca", "cert", "key", "keyPassword"}


def load_documents(path: Path) -> list[Manifest]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document is not None]


# ---------------------------------------------------------------------------------------- kustomize

_KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "namespace", "resources", "patches", "images"}


def build(directory: Path) -> list[Manifest]:
    """The objects `kubectl kustomize DIRECTORY` prints, for the fields our kustomizations use."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - _KUSTOMIZATION_FIELDS
    if unsupported:
        raise ValueError(f"{directory}: this builder does not implement {sorted(unsupported)}")
    objects: list[Manifest] = []
    for entry in kustomization.get("resources", []):
        target = (directory / entry).resolve()
        objects += build(target) if target.is_dir() else load_documents(target)
    objects = copy.deepcopy(objects)
    for patch_entry in kustomization.get("patches", []):
        if set(patch_entry) != {"path"}:
            raise ValueError(f"{directory}: only patches by `path` are implemented, not {patch_entry}")
        for patch in load_documents(directory / patch_entry["path"]):
            apply_patch(objects, patch, where=directory / patch_entry["path"])
    for image in kustomization.get("images", []):
        set_image(objects, image)
    if "namespace" in kustomization:
        for manifest in objects:
            if manifest["kind"] not in CLUSTER_SCOPED_KINDS:
                manifest["metadata"]["namespace"] = kustomization["namespace"]
    return objects


def apply_patch(objects: list[Manifest], patch: Manifest, where: Path) -> None:
    for manifest in objects:
        if identity(manifest) == identity(patch):
            merged = (
                strategic_merge(manifest, patch) if is_built_in(manifest["apiVersion"]) else json_merge(manifest, patch)
            )
            manifest.clear()
            manifest.update(merged)
            return
    raise ValueError(f"{where}: the patch's target {identity(patch)} is not among the resources")


def identity(manifest: Manifest) -> tuple[str, str, str]:
    group = manifest["apiVersion"].rpartition("/")[0]
    return group, manifest["kind"], manifest["metadata"]["name"]


def is_built_in(api_version: str) -> bool:
    """Kubernetes' own API groups: "v1", "apps/v1", "*.k8s.io/..." -- not a custom resource's."""
    group = api_version.rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")


def json_merge(target: Any, patch: Any) -> Any:
    """RFC 7386, which kustomize applies to custom resources: a list in the patch replaces the list."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = json_merge(merged.get(key), value)
    return merged


# The merge keys of the lists our patches may touch (Kubernetes' `patchMergeKey`s); other lists are
# replaced, as strategic merge does for lists without one.
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}


def strategic_merge(target: Any, patch: Any, field: str = "") -> Any:
    if isinstance(patch, dict) and isinstance(target, dict):
        merged = dict(target)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = strategic_merge(target.get(key), value, key)
        return merged
    if isinstance(patch, list) and isinstance(target, list) and field in _MERGE_KEYS:
        key = _MERGE_KEYS[field]
        merged_list = [dict(item) for item in target]
        for item in patch:
            match = next((existing for existing in merged_list if existing.get(key) == item.get(key)), None)
            if match is None:
                merged_list.append(item)
            else:
                match.update(strategic_merge(match, item))
        return merged_list
    return copy.deepcopy(patch)


def set_image(objects: list[Manifest], image: dict[str, str]) -> None:
    for _, container in containers(objects):
        name, _, tag = container["image"].partition(":")
        if name == image["name"]:
            container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"


# ---------------------------------------------------------------------------------------- schemas


@cache
def keda_schema(kind: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((K8S / "schemas" / f"keda.sh_v1alpha1_{kind.lower()}.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def schema_errors(manifest: Manifest, kubernetes_version: str) -> list[str]:
    """Why the API server (or KEDA's CRD) would refuse the object; empty when it would take it."""
    name = f"{manifest.get('kind')}/{manifest.get('metadata', {}).get('name')}"
    if manifest.get("apiVersion") == "keda.sh/v1alpha1":
        try:
            validator = jsonschema.Draft202012Validator(keda_schema(manifest["kind"]))
        except FileNotFoundError:
            return [f"{name}: no schema for KEDA's {manifest['kind']} in infra/k8s/schemas"]
        return [f"{name}: {error.json_path}: {error.message}" for error in validator.iter_errors(manifest)]
    try:
        kubernetes_validate.validate(manifest, kubernetes_version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{name}: {error.json_path}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError as error:
        return [f"{name}: {error.message}"]
    return []


# ---------------------------------------------------------------------------------------- walking


def of_kind(objects: list[Manifest], kind: str) -> list[Manifest]:
    return [manifest for manifest in objects if manifest["kind"] == kind]


def named(objects: list[Manifest], kind: str, name: str) -> Manifest | None:
    return next((manifest for manifest in of_kind(objects, kind) if manifest["metadata"]["name"] == name), None)


def pod_templates(objects: list[Manifest]) -> Iterator[tuple[Manifest, Manifest]]:
    """(workload, its pod template) for every Deployment, Job, ..."""
    for manifest in objects:
        if manifest["kind"] in WORKLOAD_KINDS:
            yield manifest, manifest["spec"]["template"]


def containers(objects: list[Manifest]) -> Iterator[tuple[Manifest, Manifest]]:
    for workload, template in pod_templates(objects):
        spec = template["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            yield workload, container


def where(workload: Manifest, container: Manifest | None = None) -> str:
    place = f"{workload['kind']}/{workload['metadata']['name']}"
    return f"{place} container {container['name']}" if container else place


# ---------------------------------------------------------------------------------------- settings

SETTING_NAMES = {f"XRAYQ_{field.upper()}" for field in Settings.model_fields}


def secrets_example() -> list[Manifest]:
    return load_documents(SECRETS_EXAMPLE)


def key_values(objects: list[Manifest], kind: str, name: str) -> dict[str, str] | None:
    """The keys of a ConfigMap's `data` or a Secret's `stringData`/`data`; None when there is no such object."""
    manifest = named(objects, kind, name)
    if manifest is None:
        return None
    return {**manifest.get("data", {}), **manifest.get("stringData", {})}


def container_environment(objects: list[Manifest], container: Manifest) -> dict[str, str]:
    """The variables the container starts with: envFrom first, then `env`, which wins (as the kubelet does)."""
    environment: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            environment.update(key_values(objects, "ConfigMap", source["configMapRef"]["name"]) or {})
        if "secretRef" in source:
            environment.update(key_values(secrets_example(), "Secret", source["secretRef"]["name"]) or {})
    for variable in container.get("env", []):
        environment[variable["name"]] = variable.get("value", "")
    return environment


def settings_name_problems(objects: list[Manifest]) -> list[str]:
    """Every variable a container gets is an XRAYQ_* setting of shared/core/settings.py."""
    problems = []
    for workload, container in containers(objects):
        for name in container_environment(objects, container):
            if name not in SETTING_NAMES:
                problems.append(f"{where(workload, container)}: {name} is not a setting of shared/core/settings.py")
    return problems


# ---------------------------------------------------------------------------------------- references


def reference_problems(objects: list[Manifest]) -> list[str]:
    """Every ConfigMap, Secret, key, service account and TriggerAuthentication named exists."""
    secrets = secrets_example()
    problems = []

    def check(kind: str, name: str, key: str | None, source: list[Manifest], user: str) -> None:
        values = key_values(source, kind, name)
        if values is None:
            problems.append(f"{user}: {kind} {name} does not exist")
        elif key is not None and key not in values:
            problems.append(f"{user}: {kind} {name} has no key {key}")

    for workload, template in pod_templates(objects):
        account = template["spec"].get("serviceAccountName")
        if account and named(objects, "ServiceAccount", account) is None:
            problems.append(f"{where(workload)}: ServiceAccount {account} does not exist")
    for workload, container in containers(objects):
        user = where(workload, container)
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                check("ConfigMap", source["configMapRef"]["name"], None, objects, user)
            if "secretRef" in source:
                check("Secret", source["secretRef"]["name"], None, secrets, user)
        for variable in container.get("env", []):
            reference = variable.get("valueFrom", {})
            if "configMapKeyRef" in reference:
                ref = reference["configMapKeyRef"]
                check("ConfigMap", ref["name"], ref["key"], objects, user)
            if "secretKeyRef" in reference:
                ref = reference["secretKeyRef"]
                check("Secret", ref["name"], ref["key"], secrets, user)
    for authentication in of_kind(objects, "TriggerAuthentication"):
        user = where(authentication)
        for ref in authentication["spec"].get("secretTargetRef", []):
            check("Secret", ref["name"], ref["key"], secrets, user)
    for scaled in of_kind(objects, "ScaledObject"):
        for trigger in scaled["spec"]["triggers"]:
            ref = trigger.get("authenticationRef")
            if ref and named(objects, "TriggerAuthentication", ref["name"]) is None:
                problems.append(f"{where(scaled)}: TriggerAuthentication {ref['name']} does not exist")
    return problems


# ---------------------------------------------------------------------------------------- labels


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def selector_problems(objects: list[Manifest]) -> list[str]:
    """Each workload selects its own pods; each Service and PodDisruptionBudget selects exactly one
    workload's pods; each autoscaler targets a Deployment that exists."""
    problems = []
    templates = [(workload, template["metadata"].get("labels", {})) for workload, template in pod_templates(objects)]
    for workload, labels in templates:
        if workload["kind"] == "Job":
            continue
        selector = workload["spec"]["selector"].get("matchLabels", {})
        if not selector or not matches(selector, labels):
            problems.append(f"{where(workload)}: its selector {selector} does not match its pods' labels {labels}")
    selecting = [(service, service["spec"].get("selector", {})) for service in of_kind(objects, "Service")]
    selecting += [
        (budget, budget["spec"]["selector"].get("matchLabels", {}))
        for budget in of_kind(objects, "PodDisruptionBudget")
    ]
    for user, selector in selecting:
        chosen = [where(workload) for workload, labels in templates if selector and matches(selector, labels)]
        if len(chosen) != 1:
            problems.append(f"{where(user)}: its selector {selector} chooses the pods of {chosen or 'no workload'}")
    for autoscaler in of_kind(objects, "HorizontalPodAutoscaler") + of_kind(objects, "ScaledObject"):
        target = autoscaler["spec"]["scaleTargetRef"]
        if target.get("kind", "Deployment") != "Deployment" or named(objects, "Deployment", target["name"]) is None:
            problems.append(f"{where(autoscaler)}: scales {target}, which is not a Deployment here")
    return problems


# ---------------------------------------------------------------------------------------- ports, probes


def probe_problems(objects: list[Manifest], gateway_serves: Callable[[str], bool]) -> list[str]:
    """HTTP probes ask for real GET routes of the gateway; probes and Services name ports that exist."""
    problems = []
    port_names: dict[str, set[str]] = {}
    for workload, container in containers(objects):
        names = {port["name"] for port in container.get("ports", []) if "name" in port}
        port_names.setdefault(workload["metadata"]["name"], set()).update(names)
        for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = container.get(probe_name)
            if probe is None:
                continue
            action = probe.get("httpGet") or probe.get("tcpSocket") or {}
            port = action.get("port")
            if isinstance(port, str) and port not in names:
                problems.append(f"{where(workload, container)}: {probe_name} uses port {port}, which it does not name")
            if "httpGet" in probe and not gateway_serves(probe["httpGet"]["path"]):
                problems.append(
                    f"{where(workload, container)}: {probe_name} asks for {probe['httpGet']['path']}, "
                    "which is no GET route of the gateway"
                )
    for service in of_kind(objects, "Service"):
        workloads = [
            workload["metadata"]["name"]
            for workload, template in pod_templates(objects)
            if matches(service["spec"].get("selector", {}), template["metadata"].get("labels", {}))
        ]
        for port in service["spec"]["ports"]:
            target = port.get("targetPort")
            if isinstance(target, str) and not any(target in port_names.get(name, set()) for name in workloads):
                problems.append(f"{where(service)}: targetPort {target} is no port of the pods it selects")
    return problems


# Enumerations the API schemas of kubernetes-validate do not carry (they come from OpenAPI v2).
SERVICE_TYPES = {"ClusterIP", "NodePort", "LoadBalancer", "ExternalName"}


def service_problems(objects: list[Manifest]) -> list[str]:
    """Service types are real ones, and a Service reached from outside keeps the sender's address:
    the DICOM allow-list tells senders apart by it (externalTrafficPolicy Local)."""
    problems = []
    for service in of_kind(objects, "Service"):
        kind = service["spec"].get("type", "ClusterIP")
        if kind not in SERVICE_TYPES:
            problems.append(f"{where(service)}: type {kind} is none of {sorted(SERVICE_TYPES)}")
        elif kind in {"NodePort", "LoadBalancer"} and service["spec"].get("externalTrafficPolicy") != "Local":
            problems.append(
                f"{where(service)}: an outside sender's address is lost without externalTrafficPolicy Local"
            )
    return problems


def listening_port_problems(objects: list[Manifest], settings_for: dict[str, Settings]) -> list[str]:
    """The named ports are the ones the process listens on, by its settings (XRAYQ_PORT, ...)."""
    listens = {"http": "port", "metrics": "worker_metrics_port", "dicom": "dicom_port"}
    problems = []
    for workload, container in containers(objects):
        settings = settings_for[container_key(workload, container)]
        for port in container.get("ports", []):
            attribute = listens.get(port.get("name", ""))
            if attribute and getattr(settings, attribute) != port["containerPort"]:
                problems.append(
                    f"{where(workload, container)}: port {port['name']} is {port['containerPort']}, but the "
                    f"process listens on {getattr(settings, attribute)} (XRAYQ_{attribute.upper()})"
                )
    return problems


def container_key(workload: Manifest, container: Manifest) -> str:
    return f"{workload['metadata']['name']}/{container['name']}"


# ---------------------------------------------------------------------------------------- security


def security_problems(objects: list[Manifest], image_user: int) -> list[str]:
    """Non-root (the image's own user), no privilege escalation, no capabilities, read-only root file
    system, no API token, no service-link variables, resource requests and a memory limit."""
    problems = []
    for workload, template in pod_templates(objects):
        pod = template["spec"]
        context = pod.get("securityContext", {})
        wanted = {
            "runAsNonRoot": context.get("runAsNonRoot") is True,
            f"runAsUser {image_user} (the image's USER)": context.get("runAsUser") == image_user,
            "seccompProfile RuntimeDefault": context.get("seccompProfile", {}).get("type") == "RuntimeDefault",
            "automountServiceAccountToken false": pod.get("automountServiceAccountToken") is False,
            "enableServiceLinks false": pod.get("enableServiceLinks") is False,
        }
        problems += [f"{where(workload)}: wants {what}" for what, ok in wanted.items() if not ok]
        for volume in pod.get("volumes", []):
            kinds = set(volume) - {"name"}
            if not kinds <= RESTRICTED_VOLUME_TYPES:
                problems.append(
                    f"{where(workload)}: volume {volume['name']} is of a type the restricted policy refuses"
                )
    for workload, container in containers(objects):
        context = container.get("securityContext", {})
        resources = container.get("resources", {})
        wanted = {
            "allowPrivilegeEscalation false": context.get("allowPrivilegeEscalation") is False,
            "readOnlyRootFilesystem true": context.get("readOnlyRootFilesystem") is True,
            "capabilities drop ALL": context.get("capabilities", {}).get("drop") == ["ALL"],
            "cpu and memory requests": {"cpu", "memory"} <= set(resources.get("requests", {})),
            "a memory limit": "memory" in resources.get("limits", {}),
        }
        problems += [f"{where(workload, container)}: wants {what}" for what, ok in wanted.items() if not ok]
        mounts = {mount["mountPath"] for mount in container.get("volumeMounts", [])}
        if context.get("readOnlyRootFilesystem") and "/tmp" not in mounts:
            problems.append(f"{where(workload, container)}: a read-only root file system needs a volume at /tmp")
    return problems


# ---------------------------------------------------------------------------------------- autoscaling


def autoscaling_problems(objects: list[Manifest], broker_key_prefix: str) -> list[str]:
    """Autoscaled Deployments leave `replicas` to their autoscaler; redis triggers watch the `predict`
    list Celery writes; counts and authentication parameters make sense."""
    problems = []
    for autoscaler in of_kind(objects, "HorizontalPodAutoscaler") + of_kind(objects, "ScaledObject"):
        deployment = named(objects, "Deployment", autoscaler["spec"]["scaleTargetRef"]["name"])
        if deployment is not None and "replicas" in deployment["spec"]:
            problems.append(
                f"{where(deployment)}: sets replicas, which {where(autoscaler)} owns (a re-apply resets it)"
            )
    for scaled in of_kind(objects, "ScaledObject"):
        spec = scaled["spec"]
        if spec.get("minReplicaCount", 0) > spec.get("maxReplicaCount", 100):
            problems.append(f"{where(scaled)}: minReplicaCount is above maxReplicaCount")
        for trigger in spec["triggers"]:
            if trigger["type"] != "redis":
                continue
            list_name = trigger["metadata"].get("listName")
            if list_name != f"{broker_key_prefix}{PREDICT_QUEUE}":
                problems.append(
                    f"{where(scaled)}: watches the list {list_name!r}; Celery queues predictions on "
                    f"{broker_key_prefix + PREDICT_QUEUE!r} (XRAYQ_BROKER_KEY_PREFIX + queue)"
                )
            if "authenticationRef" not in trigger and "address" not in trigger["metadata"]:
                problems.append(f"{where(scaled)}: its redis trigger has no address and no authenticationRef")
    for authentication in of_kind(objects, "TriggerAuthentication"):
        for ref in authentication["spec"].get("secretTargetRef", []):
            if ref["parameter"] not in REDIS_AUTH_PARAMETERS:
                problems.append(f"{where(authentication)}: {ref['parameter']} is no parameter of KEDA's redis scaler")
    return problems


# ---------------------------------------------------------------------------------------- the image


def dockerfile_user() -> int:
    match = re.search(r"^USER\s+(\d+)", (ROOT / "infra" / "Dockerfile").read_text(), re.MULTILINE)
    assert match, "infra/Dockerfile names no numeric USER"
    return int(match[1])


def compose_roles() -> tuple[str, set[tuple[str, ...]]]:
    """The compose file's xrayq image name and the commands its xrayq services run."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = [
        service for service in compose["services"].values() if str(service.get("image", "")).startswith("xrayq")
    ]
    (image,) = {service["image"].partition(":")[0] for service in services}
    return image, {tuple(service["command"]) for service in services}


def image_problems(objects: list[Manifest]) -> list[str]:
    """The compose file's image, running one of the commands compose runs it with."""
    image, commands = compose_roles()
    problems = []
    for workload, container in containers(objects):
        if container["image"].partition(":")[0] != image:
            problems.append(f"{where(workload, container)}: image {container['image']} is not compose's {image}")
        if tuple(container.get("command", ())) not in commands:
            problems.append(f"{where(workload, container)}: {container.get('command')} is no command compose runs")
    return problems
