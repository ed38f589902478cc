"""The compose stack as `docker compose up` would configure it (no Docker engine needed): the DICOM
receiver's settings, with the file's defaults, make a receiver that starts and names who may send."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from services.dicom.peers import AllowListError, admitted, allowed_senders
from shared.core.settings import Settings

COMPOSE = Path(__file__).resolve().parents[3] / "docker-compose.yml"
# Compose interpolation: ${NAME}, ${NAME:-default}, ${NAME-default} (defaults here hold no nested ${...}).
_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?:(?P<colon>:?)-(?P<default>[^}]*))?\}")


def interpolated(value: str, environment: dict[str, str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        name, default = match["name"], match["default"]
        if name in environment and (environment[name] or not match["colon"]):
            return environment[name]
        return default or ""

    return _VARIABLE.sub(substitute, value)


def service_environment(service: str, environment: dict[str, str]) -> dict[str, str]:
    compose = yaml.safe_load(COMPOSE.read_text())  # merge keys (<<) are resolved by the loader
    variables = compose["services"][service]["environment"]
    return {name: interpolated(str(value), environment) for name, value in variables.items()}


def receiver_settings(environment: dict[str, str], tmp_path: Path) -> Settings:
    variables = service_environment("dicom", environment)
    # An empty variable is "the default" (env_ignore_empty): compose passes every setting, most of them empty.
    fields = {name.removeprefix("XRAYQ_").lower(): value for name, value in variables.items() if value}
    fields["home"] = str(tmp_path)  # the container's /var/lib/xrayq
    return Settings(**fields)


def test_the_compose_receiver_starts_with_the_development_allow_list(tmp_path: Path) -> None:
    settings = receiver_settings({}, tmp_path)
    assert not settings.embedded  # Postgres, Redis and MinIO: the allow-list is required
    senders = allowed_senders(settings)  # raises AllowListError where the receiver refuses to start
    assert [(sender.ae_title, str(sender.network), sender.organisation) for sender in senders] == [
        ("DEV-SCU", "172.16.0.0/12", "dicom")
    ]
    assert admitted(senders, "DEV-SCU", "172.18.0.1") is not None  # a host-side SCU via the bridge gateway
    assert admitted(senders, "DEV-SCU", "10.20.1.5") is None  # not from the hospital network
    assert admitted(senders, "OTHER", "172.18.0.1") is None


def test_the_operators_allow_list_replaces_the_development_one(tmp_path: Path) -> None:
    settings = receiver_settings({"XRAYQ_DICOM_ALLOWED_AE_TITLES": "CR1@10.20.0.0/16:st-mary"}, tmp_path)
    (sender,) = allowed_senders(settings)
    assert (sender.ae_title, str(sender.network), sender.organisation) == ("CR1", "10.20.0.0/16", "st-mary")


def test_an_allow_list_without_addresses_still_stops_the_compose_receiver(tmp_path: Path) -> None:
    settings = receiver_settings({"XRAYQ_DICOM_ALLOWED_AE_TITLES": "CR1"}, tmp_path)
    with pytest.raises(AllowListError):
        allowed_senders(settings)


def test_interpolation_follows_compose() -> None:
    environment = {"SET": "x", "EMPTY": ""}
    assert interpolated("${SET:-d}/${EMPTY:-d}/${EMPTY-d}/${UNSET-d}/${UNSET}", environment) == "x/d//d/"
