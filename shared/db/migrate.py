"""Run Alembic migrations from code (`xrayq migrate`, and `xrayq up` before it starts anything)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from shared.core.settings import Settings

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # '%' is ConfigParser's interpolation sign; URLs may contain it (escaped passwords).
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade_database(settings: Settings, revision: str = "head") -> None:
    command.upgrade(alembic_config(settings.database_url), revision)
