"""The store: one directory with the metadata database (SQLAlchemy + Alembic), atlas vectors, indexes and maps."""
