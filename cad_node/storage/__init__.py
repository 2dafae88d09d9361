"""Durable spool of received instances and its SQLite index.

See :mod:`cad_node.storage.spool` for the durability contract and
:mod:`cad_node.storage.index` for the index schema and its readers.
"""

from cad_node.storage.index import DuplicateInstanceError, SeriesState, SpoolIndex, StudyState
from cad_node.storage.parse import (
    DatasetError,
    DatasetHeader,
    MalformedDatasetError,
    MissingAttributeError,
    inspect_dataset,
    split_part10,
)
from cad_node.storage.records import StoredInstance, StudyComplete
from cad_node.storage.spool import (
    InsufficientStorageError,
    Spool,
    SpoolLockedError,
    SpoolOutcome,
    StoreResult,
    UIDMismatchError,
    encode_file_meta,
    free_bytes,
)

__all__ = [
    "DatasetError",
    "DatasetHeader",
    "DuplicateInstanceError",
    "InsufficientStorageError",
    "MalformedDatasetError",
    "MissingAttributeError",
    "SeriesState",
    "Spool",
    "SpoolIndex",
    "SpoolLockedError",
    "SpoolOutcome",
    "StoreResult",
    "StoredInstance",
    "StudyComplete",
    "StudyState",
    "UIDMismatchError",
    "encode_file_meta",
    "free_bytes",
    "inspect_dataset",
    "split_part10",
]
