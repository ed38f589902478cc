"""Database: SQLAlchemy 2.0 models, the engine/session, and Alembic migrations."""
