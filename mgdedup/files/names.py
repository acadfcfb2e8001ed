"""File names as people should see them: any name a file system allows is shown, losslessly
enough to find the file, without reaching the terminal as control sequences or markup."""

from __future__ import annotations

import json
import re
import unicodedata

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_SURROGATE = re.compile("[\udc80-\udcff]")


def printable(text: str) -> str:
    """`text` with control and format characters escaped (``\\x1b``, ``\\n``, ``\\u200e``) and
    the bytes of an undecodable name (kept as lone surrogates, ``os.fsdecode``) shown as
    ``\\xff``: safe to print on any terminal and in any encoding."""
    if text.isprintable() and text.isascii():
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: one undecodable byte
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn") and ch != " ":
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def json_text(document: object, **options: object) -> str:
    """`json.dumps` (UTF-8 text) in which a file name that is not valid UTF-8 keeps its bytes:
    each undecodable byte, a lone surrogate in Python, is written as the escape ``\\udcXX``,
    which `json.loads` turns back into the same name (``os.fsencode`` gives the bytes)."""
    text = json.dumps(document, ensure_ascii=False, **options)  # type: ignore[arg-type]
    return _SURROGATE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def csv_safe(text: str) -> str:
    """A field for CSV output, which must be valid text: undecodable bytes as ``\\xff``."""
    return _SURROGATE.sub(lambda match: f"\\x{ord(match.group()) - 0xDC00:02x}", text)
