"""Storage: the async engine, the declarative base and the migrations."""

from legator.core.db.base import Base, UTCDateTime, new_id, new_sorted_id, utcnow
from legator.core.db.engine import Database

__all__ = ["Base", "Database", "UTCDateTime", "new_id", "new_sorted_id", "utcnow"]
