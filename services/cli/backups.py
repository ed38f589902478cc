"""`xrayq backup DEST` and `xrayq restore SRC`: the deployment's database and object store, through
`shared/backup` and the configured settings (the same XRAYQ_* variables the services read)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from services.cli.output import JsonOutput, fail, print_json


def backup(
    destination: Annotated[Path, typer.Argument(help="a new folder (or an empty one), or a file ending in .tar")],
    as_json: JsonOutput = False,
) -> None:
    """Back up the database and every stored object, with a manifest of sizes and sha256s."""
    from shared.backup import create_backup
    from shared.core.errors import XrayqError
    from shared.core.settings import get_settings

    try:
        summary = create_backup(get_settings(), destination)
    except XrayqError as error:
        raise fail(f"{error.code}: {error.detail}") from None
    manifest = summary.manifest
    if as_json:
        print_json(
            {
                "destination": str(summary.destination),
                "created_at": manifest.created_at,
                "alembic_revision": manifest.database.alembic_revision,
                "database_bytes": manifest.database.size,
                "objects": manifest.object_count,
                "object_bytes": manifest.object_bytes,
                "vanished": summary.vanished,
            }
        )
        return
    typer.echo(
        f"backup written to {summary.destination}: {manifest.database.kind} database"
        f" ({manifest.database.size} bytes, schema {manifest.database.alembic_revision}),"
        f" {manifest.object_count} objects ({manifest.object_bytes} bytes)"
    )
    if summary.vanished:
        typer.echo(f"{summary.vanished} objects were deleted while the backup ran (inputs past retention)")


def restore(
    source: Annotated[Path, typer.Argument(help="a backup folder or .tar file written by `xrayq backup`")],
    force: Annotated[
        bool, typer.Option("--force", help="replace the target's database even though it holds data")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="check the backup and the target, change nothing")] = False,
    as_json: JsonOutput = False,
) -> None:
    """Restore a backup into a fresh database and object store (stop the stack first)."""
    from shared.backup import restore_backup
    from shared.core.errors import XrayqError
    from shared.core.settings import get_settings

    try:
        summary = restore_backup(get_settings(), source, force=force, dry_run=dry_run)
    except XrayqError as error:
        raise fail(f"{error.code}: {error.detail}") from None
    manifest = summary.manifest
    if as_json:
        print_json(
            {
                "source": str(source),
                "created_at": manifest.created_at,
                "alembic_revision": manifest.database.alembic_revision,
                "migrated_to": summary.migrated_to,
                "objects": manifest.object_count,
                "dry_run": summary.dry_run,
            }
        )
        return
    what = f"backup of {manifest.created_at:%Y-%m-%d %H:%M:%S} UTC ({manifest.object_count} objects)"
    if summary.dry_run:
        typer.echo(f"{what} is intact and the target can take it; nothing was changed")
        return
    typer.echo(f"restored the {what}")
    if summary.migrated_to:
        typer.echo(f"schema migrated from {manifest.database.alembic_revision} to {summary.migrated_to}")
