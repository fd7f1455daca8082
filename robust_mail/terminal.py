"""Text from a message made safe to print on a terminal. Imports nothing from Django."""

from __future__ import annotations

import unicodedata

__all__ = ["terminal_safe"]


def terminal_safe(text: str) -> str:
    """``text`` with control characters (but tab and newline) written as ``\\xNN``.

    Message headers and bodies are anyone's input: printed raw, an escape sequence could
    retitle the terminal, erase lines above or write to the clipboard (OSC 52).
    """
    # Line ends as the terminal expects them: messages are built with CRLF.
    text = text.replace("\r\n", "\n")
    return "".join(
        f"\\x{ord(char):02x}" if unicodedata.category(char) == "Cc" and char not in "\t\n" else char
        for char in text
    )
