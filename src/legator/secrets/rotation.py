"""Rotating the KEK of the control plane's shared store (PostgreSQL), replica by replica.

Two steps, because every replica holds the KEK in its environment: ``start`` wraps the data
key under the new KEK as well (replicas with either key keep working while they are
restarted one at a time with the new one), ``finish`` drops every other wrapping. Values are
not re-encrypted: the data key does not change.
"""

from __future__ import annotations

from dataclasses import dataclass

from legator.secrets.crypto import Kek
from legator.secrets.errors import KekError
from legator.secrets.pgstore import PgSecretStore


@dataclass(frozen=True)
class RotationResult:
    key_id: str
    verified: int


def start(database_url: str, current: Kek, new: Kek) -> RotationResult:
    if new.key_id == current.key_id:
        raise KekError("the new key is the same as the current one")
    store = PgSecretStore(database_url, current)
    try:
        store.add_kek(new, current)
    finally:
        store.close()
    return _verify(database_url, new)


def finish(database_url: str, current: Kek) -> RotationResult:
    store = PgSecretStore(database_url, current)
    try:
        store.drop_other_keks(current)
    finally:
        store.close()
    return _verify(database_url, current)


def _verify(database_url: str, kek: Kek) -> RotationResult:
    store = PgSecretStore(database_url, kek)
    try:
        return RotationResult(kek.key_id, store.verify_all())
    finally:
        store.close()
