"""Numbers written to sysfs files, parsed as the kernel's show/store functions
parse them: ``kstrtoul()`` (lib/kstrtox.c) and ``memparse()`` (lib/cmdline.c).
A parse error raises ValueError (the store's EINVAL); a number that does not
fit raises OSError(ERANGE), as ``kstrtoul()`` returns -ERANGE.
"""
from __future__ import annotations

import errno
import re

ULONG_MAX = (1 << 64) - 1

_DIGITS = {8: "01234567", 10: "0123456789", 16: "0123456789abcdefABCDEF"}


def kstrtoul(text: str, base: int = 10) -> int:
    """``kstrtoul(buf, base, &res)``: an optional ``+``, the digits of base
    (16 may start with ``0x``; 0 picks 16 for ``0x``, 8 for a leading ``0``,
    else 10), at most one trailing newline, nothing else: no space, no sign
    ``-``, no empty number."""
    s = text[1:] if text.startswith("+") else text
    if base in (0, 16) and s[:2].lower() == "0x" and s[2:3] and s[2] in _DIGITS[16]:
        s, base = s[2:], 16
    elif base == 0:
        base = 8 if s.startswith("0") and len(s.rstrip("\n")) > 1 else 10
    if s.endswith("\n"):
        s = s[:-1]
    if not s or any(ch not in _DIGITS[base] for ch in s):
        raise ValueError(f"not a base-{base} number: {text!r}")
    value = int(s, base)
    if value > ULONG_MAX:
        raise OSError(errno.ERANGE, f"{s} does not fit an unsigned long")
    return value


_MEMPARSE = re.compile(r"(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)([KkMmGgTtPpEe]?)")
_SHIFT = {"k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


def memparse(text: str) -> int:
    """``memparse(buf, NULL)``: a number (``simple_strtoull(.., 0)``: ``0x``
    hex, a leading ``0`` octal, else decimal) and an optional K/M/G/T/P/E
    suffix; whatever follows is ignored, and no number at all is 0 (as in the
    kernel, whose callers then refuse the size).  Wraps at 2**64 as the
    kernel's shifts do."""
    m = _MEMPARSE.match(text)
    if m is None:
        return 0
    value = int(m.group(1), 0) if not m.group(1).startswith("0") or m.group(1)[:2].lower() == "0x" \
        else int(m.group(1), 8)
    return (value << _SHIFT.get(m.group(2).lower(), 0)) & ULONG_MAX


def kstrtobool(text: str) -> bool:
    """``kstrtobool()``: ``y``/``Y``/``1``/``t``/``T``... true, ``n``/``N``/
    ``0``/``f``/``F`` false, ``on``/``off`` (any case); the kernel looks at the
    first characters only, but a write here must be one word (ValueError
    otherwise)."""
    word = text.strip()
    low = word.lower()
    if low in ("1", "y", "yes", "t", "true", "on"):
        return True
    if low in ("0", "n", "no", "f", "false", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


INT_MAX = (1 << 31) - 1
U32_MAX = (1 << 32) - 1


def proc_dointvec(text: str, lo: int = -INT_MAX - 1, hi: int = INT_MAX) -> int:
    """One integer written to a sysctl (``proc_dointvec_minmax``): blanks
    around it, decimal (or ``0x`` hex), within [lo, hi]; ValueError
    otherwise (the write's EINVAL)."""
    word = text.strip()
    neg = word.startswith("-")
    digits = word[1:] if neg else word
    if digits[:2].lower() == "0x" and len(digits) > 2 and all(c in _DIGITS[16] for c in digits[2:]):
        value = int(digits[2:], 16)
    elif digits and all(c in _DIGITS[10] for c in digits):
        value = int(digits, 10)
    else:
        raise ValueError(f"not an integer: {text!r}")
    value = -value if neg else value
    if not lo <= value <= hi:
        raise ValueError(f"{value} is outside {lo}..{hi}")
    return value


def debugfs_u32(text: str) -> int:
    """A debugfs u32 attribute's write (simple_attr_write: kstrtoull base 0),
    refused past U32_MAX."""
    try:
        value = kstrtoul(text.strip() + "\n" if text.strip() else text, 0)
    except OSError:
        value = U32_MAX + 1
    if value > U32_MAX:
        raise ValueError(f"{value} does not fit a u32")
    return value
