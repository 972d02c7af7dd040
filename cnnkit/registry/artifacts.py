"""Registry stage: the content-addressed artifact store, where registered models are copied and never change.

``Registry.add`` copies a run's ``model.keras`` to ``<root>/<sha256>/model.keras`` and the version
points only at that copy, so retraining, ``cnnkit calibrate`` or ``--resume`` on the run afterwards
changes nothing that is served. The same file registered twice is stored once; deleting the last
version that uses a copy removes it, unless another registry uses it too: several databases may share
one store (``$CNNKIT_HOME/artifacts`` is every non-SQLite registry's default), and each copy lists the
registries using it in ``<sha256>/users/`` (one file per database, added under the store's lock when a
version is registered, removed when that database's last version of the copy goes). A copy with no
``users/`` folder comes from before this list: who uses it is unknown, so it is never removed.

The root is a local folder (default: ``artifacts/`` beside a SQLite registry file, else
``$CNNKIT_HOME/artifacts``), a ``file://`` URL, or any fsspec URL (``s3://bucket/models``: install
``fsspec`` and the filesystem's package, e.g. ``s3fs``). Remote copies are fetched, hash-checked,
into ``$CNNKIT_HOME/artifact-cache/<sha256>/`` before they are served. On a local root, adding and
deleting take a file lock (``<root>/.lock``), so a copy is never removed under a version being added.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from cnnkit.config import cnnkit_home
from cnnkit.errors import RegistryError

ARTIFACT_FILE = "model.keras"
USERS = "users"  # <sha256>/users/<registry key>: the registries using a copy
_UNKNOWN_USERS = "registered before cnnkit recorded which registries use a copy\n"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_BLOCK = 1 << 20


def default_artifact_root(registry_url: str) -> str:
    """``CNNKIT_ARTIFACT_ROOT``, else ``artifacts/`` beside a SQLite file, else ``$CNNKIT_HOME/artifacts``."""
    root = os.environ.get("CNNKIT_ARTIFACT_ROOT")
    if root:
        return root
    if registry_url.startswith("sqlite") and "///" in registry_url:
        path = registry_url.split("///", 1)[1].split("?", 1)[0]
        if path and path != ":memory:":
            return str(Path(path).resolve().parent / "artifacts")
    return str(cnnkit_home() / "artifacts")


def registry_key(registry_url: str) -> str:
    """A registry's name in a copy's ``users/`` folder: a hash of its database, as its URL names it.

    The URL is normalised so that one database gets one name however it is written: a SQLite file by
    its absolute path (without ``?timeout=``), a server's URL without its driver, user and password
    (the query stays: ``options=-csearch_path=...`` names another registry in the same database).
    Two registries sharing a store must have different URLs: two machines' SQLite files at the same
    path, say, would share a name (their default stores are beside the files, never shared).
    """
    try:
        from sqlalchemy.engine import make_url

        url = make_url(registry_url)
        if url.get_backend_name() == "sqlite":
            database = url.database or ""
            key = f"sqlite:{os.path.abspath(database) if database and database != ':memory:' else database}"
        else:
            query = "&".join(f"{k}={v}" for k, v in sorted(url.query.items()))
            key = f"{url.get_backend_name()}://{url.host or ''}:{url.port or ''}/{url.database or ''}?{query}"
    except Exception:  # not a SQLAlchemy URL: the text itself
        key = registry_url
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def is_url(location: str) -> bool:
    """True for ``scheme://...`` other than ``file://`` (those go through fsspec)."""
    scheme, sep, _ = location.partition("://")
    return bool(sep) and scheme.lower() != "file" and len(scheme) > 1  # "C://" is a Windows drive


def _local(location: str) -> Path:
    if location.lower().startswith("file://"):
        location = location[len("file://"):]
    return Path(location).expanduser()


def _filesystem(location: str):
    try:
        import fsspec
    except ImportError:
        raise RegistryError(f"The artifact location {location!r} is a URL; reading and writing URLs needs fsspec "
                            "(pip install fsspec, plus e.g. s3fs for s3://), or use a local folder as "
                            "--artifact-root.") from None
    try:
        fs, path = fsspec.core.url_to_fs(location)
    except (ImportError, ValueError) as exc:
        raise RegistryError(f"Cannot open the artifact location {location!r}: {exc}. Install the filesystem's "
                            "package (e.g. s3fs for s3://) or use a local folder as --artifact-root.") from exc
    return fs, path


def _copy_and_hash(read, target: Path) -> str:
    digest = hashlib.sha256()
    with read() as src, open(target, "wb") as dst:
        for block in iter(lambda: src.read(_BLOCK), b""):
            digest.update(block)
            dst.write(block)
    return digest.hexdigest()


def artifact_exists(location: str) -> bool:
    """Whether the file at ``location`` (path or URL) is there, without reading it."""
    if is_url(location):
        fs, path = _filesystem(location)
        return bool(fs.exists(path))
    return _local(location).is_file()


def artifact_sha256(location: str) -> str | None:
    """The SHA-256 of the file at ``location`` (path or URL); None when it is missing."""
    digest = hashlib.sha256()
    try:
        if is_url(location):
            fs, path = _filesystem(location)
            opener = fs.open(path, "rb")
        else:
            opener = open(_local(location), "rb")
        with opener as fh:
            for block in iter(lambda: fh.read(_BLOCK), b""):
                digest.update(block)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):  # reported as missing
        return None
    return digest.hexdigest()


class ArtifactStore:
    """A content-addressed folder (or URL) of immutable model copies: ``<root>/<sha256>/model.keras``.

    Args:
        root: a local folder, ``file://`` URL or fsspec URL.
    """

    def __init__(self, root: str | Path) -> None:
        root = str(root)
        self.remote = is_url(root)
        self.root = root.rstrip("/") if self.remote else str(_local(root).resolve())

    @contextlib.contextmanager
    def stage(self, source: Path) -> Iterator[tuple[Path, str]]:
        """Copy ``source`` aside, hashing the bytes copied: yields (the staged copy, its sha256).

        The copy, not the source, is hashed and published, so a run rewritten meanwhile cannot make
        the recorded hash and the stored bytes disagree. The staged file is removed on exit.
        """
        if self.remote:
            folder = Path(tempfile.mkdtemp(prefix=".cnnkit-artifact-"))
        else:
            Path(self.root).mkdir(parents=True, exist_ok=True)
            folder = Path(self.root) / f".incoming-{uuid.uuid4().hex}"
            folder.mkdir()
        try:
            staged = folder / ARTIFACT_FILE
            try:
                digest = _copy_and_hash(lambda: open(source, "rb"), staged)
            except OSError as exc:
                raise RegistryError(f"Cannot copy '{source}' into the artifact store {self.root}: {exc}. Check "
                                    "that the folder is writable, or choose another --artifact-root.") from exc
            yield staged, digest
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def publish(self, staged: Path, digest: str) -> str:
        """Move a staged copy to ``<root>/<digest>/model.keras`` (kept if already there intact); its location."""
        if self.remote:
            fs, path = _filesystem(self.root)
            target = f"{path}/{digest}/{ARTIFACT_FILE}"
            if artifact_sha256(f"{self.root}/{digest}/{ARTIFACT_FILE}") != digest:
                fs.makedirs(f"{path}/{digest}", exist_ok=True)
                fs.put_file(str(staged), target)
            elif not fs.exists(f"{path}/{digest}/{USERS}"):  # from before the users list: keep it for them
                fs.pipe_file(f"{path}/{digest}/{USERS}/unknown", _UNKNOWN_USERS.encode())
            return f"{self.root}/{digest}/{ARTIFACT_FILE}"
        final = Path(self.root) / digest
        if artifact_sha256(str(final / ARTIFACT_FILE)) != digest:  # absent, or damaged: replace it
            if (final / USERS).is_dir():  # a damaged copy's users still use the repaired one
                os.replace(final / USERS, staged.parent / USERS)
            shutil.rmtree(final, ignore_errors=True)
            os.chmod(staged, 0o444)  # read-only: a registered model is never edited in place
            os.replace(staged.parent, final)  # the staging folder becomes <sha256>/ in one rename
        elif not (final / USERS).is_dir():  # a copy from before the users list: keep it for its unknown users
            (final / USERS).mkdir()
            (final / USERS / "unknown").write_text(_UNKNOWN_USERS)
        return str(final / ARTIFACT_FILE)

    def add_user(self, location: str, registry_url: str, where: str) -> None:
        """Record that the registry at ``registry_url`` (shown as ``where``) uses the copy at ``location``.

        Call it under :meth:`lock`, after :meth:`publish`.
        """
        marker = f"{location.rsplit('/', 1)[0]}/{USERS}/{registry_key(registry_url)}"
        if self.remote:
            fs, path = _filesystem(marker)
            fs.pipe_file(path, f"{where}\n".encode())
            return
        _local(marker).parent.mkdir(exist_ok=True)
        _local(marker).write_text(f"{where}\n")

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """An exclusive lock on a local store (``<root>/.lock``) across processes; a no-op for URLs."""
        if self.remote:
            yield
            return
        try:
            import fcntl
        except ImportError:  # not POSIX: no cross-process lock
            yield
            return
        Path(self.root).mkdir(parents=True, exist_ok=True)
        with open(Path(self.root) / ".lock", "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def store_of(location: str) -> ArtifactStore:
    """The store holding ``location`` (``<root>/<sha256>/model.keras``)."""
    return ArtifactStore(location.rsplit("/", 2)[0] if is_url(location) else str(_local(location).parent.parent))


def remove_artifact(location: str, registry_url: str) -> bool:
    """The registry at ``registry_url`` no longer uses the copy at ``location``: its name leaves the copy's
    ``users/``, and the copy and its ``<sha256>`` folder go when no registry is left (nothing outside a
    store's layout is touched). True when the copy was removed.

    Call it under the store's lock.
    """
    folder, _, name = location.rpartition("/")
    if name != ARTIFACT_FILE or not _SHA256.fullmatch(folder.rpartition("/")[2]):
        return False
    mine = registry_key(registry_url)
    if is_url(location):
        fs, path = _filesystem(folder)
        try:  # an object store has no empty folders: a name listed is the only sign of a user
            users = {entry.rstrip("/").rpartition("/")[2] for entry in fs.ls(f"{path}/{USERS}", detail=False)}
        except FileNotFoundError:
            users = set()
        if mine in users:
            fs.rm(f"{path}/{USERS}/{mine}")
        if not users or users - {mine}:  # from before the users list, or used by another registry
            return False
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path, recursive=True)
        return True
    users_folder = _local(folder) / USERS
    users = {entry.name for entry in users_folder.iterdir()} if users_folder.is_dir() else set()
    (users_folder / mine).unlink(missing_ok=True)
    if not users or users - {mine}:
        return False
    shutil.rmtree(_local(folder), ignore_errors=True)
    return True


def local_artifact(location: str, sha256: str) -> Path:
    """A local file with the artifact's bytes: the path itself, or a hash-checked copy of a URL in the cache.

    Raises:
        RegistryError: the copy is missing or its bytes differ from ``sha256``.
    """
    if not is_url(location):
        return _local(location)
    cached = cnnkit_home() / "artifact-cache" / sha256 / ARTIFACT_FILE
    if artifact_sha256(str(cached)) == sha256:
        return cached
    fs, path = _filesystem(location)
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(f".{ARTIFACT_FILE}.{uuid.uuid4().hex}")
    try:
        digest = _copy_and_hash(lambda: fs.open(path, "rb"), partial)
    except FileNotFoundError:
        partial.unlink(missing_ok=True)
        raise RegistryError(f"The registered artifact {location} is missing; run 'cnnkit registry verify'.") from None
    if digest != sha256:
        partial.unlink(missing_ok=True)
        raise RegistryError(f"The registered artifact {location} changed since it was registered (sha256 {digest[:12]}, "
                            f"expected {sha256[:12]}); refusing to use it. Run 'cnnkit registry verify'.")
    os.replace(partial, cached)
    return cached
