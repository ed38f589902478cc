"""Backup and restore of one deployment: its database and every object of its store, in one folder or
one .tar file with a manifest (`xrayq backup`, `xrayq restore`).

The database is dumped first (one consistent snapshot: `pg_dump`, or SQLite's online backup), then the
objects are copied. Objects are immutable and named by content or by the id of the row that owns them,
so an object written after the snapshot is at worst an extra, unreferenced one in the backup; the one
object a row of the snapshot can lack is an input that the retention purge deleted in between.
"""

from shared.backup.create import BackupSummary, create_backup
from shared.backup.restore import RestoreSummary, restore_backup

__all__ = ["BackupSummary", "RestoreSummary", "create_backup", "restore_backup"]
