"""`xrayq keys create|list|revoke`: API keys, straight in the database (the first key cannot come
from the API, which needs a key)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated

import typer
from sqlalchemy.orm import Session

from services.cli.output import JsonOutput, fail, print_json, print_table

keys = typer.Typer(help="Manage API keys (services mode requires them)", no_args_is_help=True)


@contextlib.contextmanager
def key_store() -> Iterator[Session]:
    """A unit of work on the configured database (migrated first); a refusal exits with its code."""
    from shared.core.errors import XrayqError
    from shared.core.settings import get_settings
    from shared.db.bootstrap import prepare_backends
    from shared.db.session import database_for

    settings = get_settings()
    prepare_backends(settings)
    try:
        with database_for(settings).session() as session:
            yield session
    except XrayqError as error:
        raise fail(f"{error.code}: {error.detail}") from None


@keys.command("create")
def create(
    name: Annotated[str, typer.Argument(help="what the key is for, e.g. pacs-gateway")],
    organisation: Annotated[str, typer.Option("--organisation", "--org", help="the organisation it acts for")],
    roles: Annotated[str, typer.Option(help="comma-separated: submit, train, admin")] = "submit",
    as_json: JsonOutput = False,
) -> None:
    """Create a key and print it: it is shown this once, only its hash is kept."""
    from shared.auth import create_key, key_view

    with key_store() as session:
        row, token = create_key(session, name, organisation, [role.strip() for role in roles.split(",")])
        view = key_view(row)
    if as_json:
        print_json({**view.model_dump(mode="json"), "key": token})
        return
    typer.echo(f"created key {view.id} ({view.name}, {view.organisation}, roles {','.join(view.roles)}):")
    typer.echo(token)
    typer.echo("Store it now: only its hash is kept.", err=True)


@keys.command("list")
def list_all(as_json: JsonOutput = False) -> None:
    """List keys (their prefixes, never the keys themselves)."""
    from shared.auth import key_view, list_keys

    with key_store() as session:
        views = [key_view(row) for row in list_keys(session)]
    if as_json:
        print_json([view.model_dump(mode="json") for view in views])
        return
    print_table(
        ("id", "prefix", "organisation", "roles", "name", "state"),
        [
            (
                v.id,
                f"{v.key_prefix}…",
                v.organisation,
                ",".join(v.roles),
                v.name,
                f"revoked {v.revoked_at:%Y-%m-%d}" if v.revoked_at else "active",
            )
            for v in views
        ],
    )


@keys.command("revoke")
def revoke(key_id: Annotated[str, typer.Argument(help="the key's id (see `xrayq keys list`)")]) -> None:
    """Revoke a key. Gateways stop honouring it within XRAYQ_AUTH_CACHE_S."""
    from shared.auth import revoke_key

    with key_store() as session:
        row = revoke_key(session, key_id)
        revoked = f"revoked {row.id} ({row.name})"
    typer.echo(revoked)
