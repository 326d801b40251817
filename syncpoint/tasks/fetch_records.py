"""Where and how the fetch cache keeps its records: Prefect's result store, its default
result storage, and a serializer of our own.

A record is written for every fetched batch before the batch is stored (see
syncpoint.tasks.batches), so writing one is on the way of every batch and has to cost
little; reading one happens only on a rerun.
"""

from __future__ import annotations

import base64
import pickle
from pathlib import Path
from typing import Any

from prefect.filesystems import LocalFileSystem, WritableFileSystem
from prefect.results import ResultStore, get_default_result_storage
from prefect.serializers import Serializer
from pydantic import Field, PrivateAttr


class RecordSerializer(Serializer):
    """The fetch cache's records: the standard library's pickler, in base64 without line
    breaks. Prefect's PickleSerializer wraps its base64 every 76 characters, a Python
    loop that took a third of the time of writing a backfill batch's record.

    The standard library's pickler, not cloudpickle: cloudpickle calls back into Python
    for every date in the rows (thousands a batch) to learn what the C pickler already
    knows. A record holds only syncpoint's dataclasses and plain values.
    """

    type: str = Field(default="syncpoint-fetch-record", frozen=True)

    def dumps(self, obj: Any) -> bytes:
        return base64.b64encode(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))

    def loads(self, blob: bytes) -> Any:
        return pickle.loads(base64.b64decode(blob))  # noqa: S301 - our own records


class RecordFolder(LocalFileSystem):
    """Prefect's local result storage, with its folder resolved once.

    LocalFileSystem resolves its folder and the record's path (os.path.realpath: a system
    call for every part of the path) on every call, and a result store's write makes
    several: about 46 system calls a record. Each lets go of the GIL, and while the
    stage's HTTP loop keeps another thread busy in Python, taking it back waits up to a
    switch interval (5 ms). A record's name is one file in the folder, so here it is
    joined to the folder resolved the first time; any other path goes the long way.
    """

    # Its own block type: inherited, LocalFileSystem's would register this class in its
    # place, and every "local-file-system" block loaded would come back as one of these.
    _block_type_name = "Syncpoint Record Folder"
    _folder: Path | None = PrivateAttr(default=None)

    def _resolve_path(self, path: str) -> Path:
        folder = self._folder
        if folder is None:
            folder = self._folder = super()._resolve_path(None)  # type: ignore[arg-type]
        if not path:
            return folder
        given = Path(path)
        # A bare name, or a path the store resolved before (it keeps the full path); a
        # name of "." or ".." is no file in the folder, and takes the long way.
        one_file = given.parent == folder or (not given.is_absolute() and given.name == path)
        if one_file and given.name not in ("", ".", ".."):
            return folder / given.name
        return super()._resolve_path(path)


def record_storage() -> WritableFileSystem:
    """The default result storage (PREFECT_LOCAL_STORAGE_PATH, shared by a sharded run's
    workers, or the storage block a server or a setting names); a local folder as a
    RecordFolder."""
    storage = get_default_result_storage(_sync=True)  # type: ignore[call-arg]
    if not isinstance(storage, WritableFileSystem):  # the coroutine of an async caller
        raise TypeError(f"no result storage, got {type(storage).__name__}")
    if type(storage) is LocalFileSystem:
        return RecordFolder(basepath=storage.basepath)
    return storage


def fetch_cache() -> ResultStore:
    """Prefect's result store as the fetch cache: one record per fetched batch, in the
    default result storage, under its key (syncpoint.tasks.batches.batch_cache_key), as a
    cached task's result would be. Records an older syncpoint wrote (Prefect's own
    "pickle" serializer, or its own LocalFileSystem) still read.

    Nothing is kept in memory: a record is read once, by a rerun.
    """
    return ResultStore(
        result_storage=record_storage(),
        serializer=RecordSerializer(),
        cache_result_in_memory=False,
    )
