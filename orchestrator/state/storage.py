"""Where searches are stored: a local folder or an object-store URI, seen through pyarrow.

Ray Tune turns ``RunConfig(storage_path)`` into a filesystem with
``pyarrow.fs.FileSystem.from_uri`` (``ray.train._internal.storage.get_fs_and_path``).
normlab resolves the same string the same way and hands Ray that string, so the driver,
Ray's workers and normlab's own files agree on one filesystem:

- a local path (``~`` expanded, made absolute) or ``file:///...``;
- ``s3://bucket/prefix``, with pyarrow's S3 options as query parameters, e.g.
  ``s3://bucket/prefix?endpoint_override=127.0.0.1:8333&scheme=http`` for an
  S3-compatible server (likewise ``gs://`` and other pyarrow filesystems).

Credentials never go into the URI: they come from the environment
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, profiles, instance roles). Ray pickles
the filesystem into the experiment state it writes to the storage, and pyarrow pickles
keys that were given explicitly, so a URI with ``user:secret@`` is refused.

Small files (the search record) are written whole or not at all: locally by the project's
one atomic write (``trainables.checkpoints.write_atomic``: a temporary file in the same
folder, flushed, fsynced and renamed over the target, then the folder fsynced); on an object store one request (S3's PutObject), which shows the whole object
or nothing.
"""

from __future__ import annotations

import fnmatch
import posixpath
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pyarrow import fs as pafs

from orchestrator.credentials.uris import strip_credentials
from trainables.checkpoints import write_atomic as write_local_atomic

DEFAULT_ROOT = Path("normlab_runs") / "ray_results"
STATE_PATTERN = "experiment_state-*.json"  # Ray Tune's experiment snapshots


class StorageError(OSError):
    """A storage path that cannot be resolved, reached, read or written; the message says why."""


@dataclass(frozen=True)
class Location:
    """A file or folder on the storage: the string Ray and the user see, and pyarrow's view of it."""

    uri: str
    fs: pafs.FileSystem
    path: str  # on ``fs``, without scheme or query

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def parent(self) -> Location:
        """The folder holding this one (a URI keeps its query options)."""
        if is_uri(self.uri):
            parts = urlsplit(self.uri)
            uri = urlunsplit(parts._replace(path=posixpath.dirname(parts.path.rstrip("/"))))
        else:
            uri = str(Path(self.uri).parent)
        return Location(uri, self.fs, posixpath.dirname(self.path.rstrip("/")))

    def child(self, name: str) -> Location:
        """``name`` inside this folder (a URI keeps its query options)."""
        return Location(join(self.uri, name), self.fs, posixpath.join(self.path, name))

    def __str__(self) -> str:
        return self.uri


def is_uri(path: str) -> bool:
    return "://" in path


def join(uri: str, name: str) -> str:
    """``uri/name``: a local path, or a URI whose query (pyarrow's options) stays at the end."""
    if not is_uri(uri):
        return str(Path(uri) / name)
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(path=posixpath.join(parts.path or "/", name)))


def resolve(path: str | None, workdir: Path | None = None) -> Location:
    """The storage folder for ``path`` (default: ``normlab_runs/ray_results`` in ``workdir``
    or the current folder), resolved with the call Ray Tune makes."""
    if path and is_uri(path):
        uri = path
        parts = urlsplit(uri)
        if parts.username or parts.password:
            raise StorageError(
                f"storage URI {strip_credentials(uri)[0]} carries credentials (user:secret@): remove them and set "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or a profile) instead; Ray would write them into "
                "the experiment state it keeps in the storage"
            )
    else:
        uri = str(Path(path).expanduser().resolve() if path else (workdir or Path.cwd()).resolve() / DEFAULT_ROOT)
    try:
        fs, fs_path = pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as exc:
        raise StorageError(f"cannot use storage path {uri}: {exc}") from exc
    return Location(uri, fs, fs_path)


def _infos(location: Location, what: str) -> list[pafs.FileInfo]:
    try:
        return location.fs.get_file_info(pafs.FileSelector(location.path, allow_not_found=True))
    except OSError as exc:
        raise StorageError(f"cannot list {what} {location}: {exc}") from exc


def latest_snapshot(folder: Location) -> int | None:
    """When Ray Tune last snapshotted the search in ``folder`` (ns since the epoch); None if never."""
    states = [
        info
        for info in _infos(folder, "search folder")
        if info.type == pafs.FileType.File and fnmatch.fnmatch(info.base_name, STATE_PATTERN)
    ]
    return max((info.mtime_ns or 0 for info in states), default=None) if states else None


def search_folders(root: Location, markers: tuple[str, ...] = ()) -> list[Location]:
    """Folders directly under ``root`` that hold Ray Tune experiment state (or one of the
    ``markers`` files, e.g. a multi-stage search's record), newest last."""
    found = []
    for info in _infos(root, "storage path"):
        if info.type == pafs.FileType.Directory:
            folder = root.child(info.base_name)
            snapshot = latest_snapshot(folder)
            if snapshot is None and markers:
                stamps = [
                    i.mtime_ns or 0
                    for i in folder.fs.get_file_info([folder.child(m).path for m in markers])
                    if i.type == pafs.FileType.File
                ]
                snapshot = max(stamps) if stamps else None
            if snapshot is not None:
                found.append((snapshot, folder.name, folder))
    return [folder for *_, folder in sorted(found, key=lambda f: f[:2])]


def exists(location: Location) -> bool:
    try:
        return location.fs.get_file_info(location.path).type != pafs.FileType.NotFound
    except OSError as exc:
        raise StorageError(f"cannot reach {location}: {exc}") from exc


def require_bucket(root: Location) -> None:
    """On an object store the bucket (the path's first part) must exist: Ray Tune does not
    create it, and fails deep inside ``Tuner.fit`` when it is missing."""
    if root.is_local:
        return
    bucket = root.path.split("/", 1)[0]
    try:
        found = root.fs.get_file_info(bucket).type != pafs.FileType.NotFound
    except OSError as exc:
        raise StorageError(f"cannot reach {root}: {exc}") from exc
    if not found:
        raise StorageError(f"bucket {bucket!r} of {root} does not exist; create it first (Ray Tune does not)")


def read_bytes(location: Location) -> bytes:
    """The whole file; ``FileNotFoundError`` if there is none, ``StorageError`` if unreadable."""
    try:
        with location.fs.open_input_stream(location.path) as fh:
            return fh.read()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StorageError(f"cannot read {location}: {exc}") from exc


def write_atomic(location: Location, data: bytes) -> None:
    """Write ``data`` so that a reader sees the old file or the whole new one, never a part."""
    try:
        if location.is_local:
            write_local_atomic(Path(location.path), data)
        else:  # one object upload: it appears whole or not at all
            fs, path = _one_request(location)
            with fs.open_output_stream(path) as fh:
                fh.write(data)
    except OSError as exc:
        raise StorageError(f"cannot write {location}: {exc}") from exc


def _one_request(location: Location) -> tuple[pafs.FileSystem, str]:
    """pyarrow's S3 streams start a multipart upload on open, unless opening is delayed:
    then a small file goes up in one PutObject."""
    parts = urlsplit(location.uri)
    if location.fs.type_name != "s3" or "allow_delayed_open" in parts.query:
        return location.fs, location.path
    query = "&".join(filter(None, [parts.query, "allow_delayed_open=true"]))
    return pafs.FileSystem.from_uri(urlunsplit(parts._replace(query=query)))
