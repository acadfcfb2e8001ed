"""Content digests: how an index recognises a file whatever its name, and how an action
checks that the file it is about to touch is still the one that was indexed."""

from __future__ import annotations

import hashlib
from pathlib import Path

from mgdedup.files.regular import open_regular

DIGEST_CHUNK = 1 << 20


def file_digest(path: str | Path) -> str:
    """blake2b-128 hex of the whole content, streamed: identical files, whatever their names."""
    digest = hashlib.blake2b(digest_size=16)
    buffer = bytearray(DIGEST_CHUNK)
    view = memoryview(buffer)
    with open_regular(path) as fp:
        while True:
            count = fp.readinto(buffer)
            if not count:
                break
            digest.update(view[:count])
    return digest.hexdigest()
