"""Text written to an operator's terminal."""

from __future__ import annotations

# C0 and C1 control characters but newline and tab: a folder or file name (or a worker's error text)
# holding ESC sequences must not drive the operator's terminal, so they are printed as \x1b etc.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if c not in (0x09, 0x0A)}


def printable(text: str) -> str:
    """``text`` safe to write to a terminal: control characters shown escaped, lines and tabs kept."""
    return text.translate(_CONTROLS)
