"""Content-addressed image store.

Images are kept by the sha256 of their bytes under ``<store>/<ab>/<cd>/<sha256>.<ext>``, so later stages never
depend on the drop folder still existing, and writing the same bytes twice is a no-op (after checking that the
object there still hashes to its name; a damaged object is replaced by the good bytes). Writes go to a temporary
file in the target directory and are published with ``os.replace`` (atomic on POSIX), so a reader or a crashed
writer never sees a half-written object under its final name.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.common import atomic

_HEX = frozenset("0123456789abcdef")


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_sha(sha256: str) -> str:
    if len(sha256) != 64 or not set(sha256) <= _HEX:
        raise ValueError(f"not a lowercase hex sha256: {sha256!r}")
    return sha256


def _check_ext(ext: str) -> str:
    ext = ext.lower().lstrip(".")
    if not ext or not ext.isalnum() or len(ext) > 8:
        raise ValueError(f"bad file extension for the store: {ext!r}")
    return ext


@dataclass(frozen=True)
class StoredObject:
    """Where a ``put`` left an object.

    Attributes:
        sha256: Hex digest of the bytes (the object's key).
        relpath: Path relative to the store directory, ``ab/cd/<sha256>.<ext>``.
        path: Absolute path of the object.
        written: False when the object was already present (same bytes stored before).
        repaired: True when an object was present under this digest but its bytes no longer hashed to it (bit rot,
            a truncated copy) and this call replaced it with the good bytes.
    """

    sha256: str
    relpath: str
    path: Path
    written: bool
    repaired: bool = False


class ContentStore:
    """A directory of immutable objects keyed by sha256.

    Args:
        directory: The store directory (created on first write).
        fsync: Flush each object to disk before publishing it (survives power loss, slower). Process crashes
            (``kill -9``) are safe without it because the rename only happens after the write completed.
    """

    def __init__(self, directory: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.directory = Path(directory)
        self.fsync = fsync

    def relpath(self, sha256: str, ext: str) -> str:
        """Relative path of the object with this digest and extension."""
        sha256 = _check_sha(sha256)
        return f"{sha256[:2]}/{sha256[2:4]}/{sha256}.{_check_ext(ext)}"

    def path(self, sha256: str, ext: str) -> Path:
        """Absolute path of the object with this digest and extension (it may not exist)."""
        return self.directory / self.relpath(sha256, ext)

    def exists(self, sha256: str, ext: str) -> bool:
        """Whether the object is present."""
        return self.path(sha256, ext).is_file()

    def put(self, data: bytes, ext: str, *, sha256: str | None = None) -> StoredObject:
        """Store ``data`` under its digest; a no-op when the same, intact object is already present.

        An existing object is trusted only after its bytes hash to its digest: a damaged one (same size or not) is
        replaced atomically by ``data``, so a re-sent good copy repairs the store before anything removes it.

        Args:
            data: The bytes to keep.
            ext: File extension of the object (``png``, ``tif`` ...), kept so tools can open it.
            sha256: The digest if the caller already computed it (saves hashing twice).

        Returns:
            Where the object is, and whether this call wrote it.
        """
        digest = sha256 if sha256 is not None else sha256_bytes(data)
        rel = self.relpath(digest, ext)
        final = self.directory / rel
        repaired = False
        try:
            if os.stat(final).st_size == len(data) and _file_sha256(final) == digest:
                return StoredObject(digest, rel, final, written=False)
            repaired = True
        except FileNotFoundError:
            pass
        atomic.write_bytes(final, data, mode=0o444, fsync=self.fsync)
        return StoredObject(digest, rel, final, written=True, repaired=repaired)

    def read(self, relpath: str) -> bytes:
        """Bytes of a stored object, by its relative path."""
        return (self.directory / relpath).read_bytes()

    def verify(self, relpath: str) -> bool:
        """Whether the object's bytes still hash to the digest in its name."""
        name = Path(relpath).name
        expected = name.split(".", 1)[0]
        try:
            return _file_sha256(self.directory / relpath) == expected
        except FileNotFoundError:
            return False

    def size_bytes(self) -> tuple[int, int]:
        """``(n_objects, total_bytes)`` of the published objects (temporary files excluded)."""
        n = total = 0
        if not self.directory.exists():
            return 0, 0
        for dirpath, _dirs, files in os.walk(self.directory):
            for name in files:
                if name.startswith("."):
                    continue
                n += 1
                total += os.stat(os.path.join(dirpath, name)).st_size
        return n, total
