"""The first admin key: made once by `xrayq migrate` when nothing else can let an operator in, stored
only as a hash; a short XRAYQ_ADMIN_KEY is refused with a sentence saying what to set."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.auth import BOOTSTRAP_ORGANISATION, create_bootstrap_admin_key, create_key, hash_key, list_keys, revoke_key
from shared.core.settings import MIN_ADMIN_KEY_LENGTH, Settings
from shared.db.migrate import upgrade_database
from shared.db.session import database_for


@pytest.fixture
def keyed(tmp_path: Path) -> Settings:
    """A fresh database (SQLite) with API keys required, as in any deployment."""
    settings = Settings(home=tmp_path, auth="on")
    upgrade_database(settings)
    return settings


def bootstrap(settings: Settings) -> str | None:
    with database_for(settings).session() as session:
        return create_bootstrap_admin_key(session, settings)


def test_a_new_installation_gets_one_admin_key_stored_only_as_its_hash(keyed: Settings) -> None:
    token = bootstrap(keyed)
    assert token is not None and token.startswith("xq_") and len(token) >= MIN_ADMIN_KEY_LENGTH
    assert bootstrap(keyed) is None  # never again while it is active
    with database_for(keyed).session() as session:
        (row,) = list_keys(session)
        assert (row.organisation, row.roles, row.key_sha256) == (BOOTSTRAP_ORGANISATION, ["admin"], hash_key(token))
        assert token not in {str(value) for value in vars(row).values()}


def test_no_key_is_made_where_one_can_already_get_in(keyed: Settings, tmp_path: Path) -> None:
    assert bootstrap(keyed.model_copy(update={"admin_key": "k" * MIN_ADMIN_KEY_LENGTH})) is None
    assert bootstrap(keyed.model_copy(update={"auth": "off"})) is None
    with database_for(keyed).session() as session:
        create_key(session, "ops", "hospital", ["submit", "admin"])
    assert bootstrap(keyed) is None
    with database_for(keyed).session() as session:
        assert [row.name for row in list_keys(session)] == ["ops"]


def test_when_every_admin_key_is_revoked_the_next_migrate_makes_a_new_one(keyed: Settings) -> None:
    first = bootstrap(keyed)
    with database_for(keyed).session() as session:
        create_key(session, "pacs", "st-mary", ["submit"])  # not an admin: does not count
        (admin,) = [row for row in list_keys(session) if "admin" in row.roles]
        revoke_key(session, admin.id)
    second = bootstrap(keyed)
    assert second is not None and second != first


@pytest.mark.parametrize("length", [1, MIN_ADMIN_KEY_LENGTH - 1])
def test_a_short_admin_key_is_refused_with_what_to_set(length: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XRAYQ_ADMIN_KEY", "k" * length)
    with pytest.raises(ValidationError) as refusal:
        Settings()
    message = str(refusal.value)
    assert f"XRAYQ_ADMIN_KEY is {length} characters long" in message and "at least 32" in message


def test_a_long_or_empty_admin_key_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XRAYQ_ADMIN_KEY", "k" * MIN_ADMIN_KEY_LENGTH)
    assert Settings().admin_key == "k" * MIN_ADMIN_KEY_LENGTH
    monkeypatch.setenv("XRAYQ_ADMIN_KEY", "")
    assert Settings().admin_key == ""
