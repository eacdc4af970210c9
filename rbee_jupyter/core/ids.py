"""Ids of jobs and workers: random enough that knowing one tells nothing about another.

An id is the handle of a progress stream, a worker and a cancel; in a shared hive other
users must not reach them by counting or guessing. 128 random bits from the OS's CSPRNG
(``secrets``): at a million guesses a second, finding any one of a thousand live ids
takes about 10^19 years on average.
"""

from __future__ import annotations

import secrets

__all__ = ["ID_BITS", "new_id"]

ID_BITS = 128


def new_id(prefix: str = "") -> str:
    """``prefix`` followed by 32 lowercase hex digits (``ID_BITS`` random bits)."""
    return prefix + secrets.token_hex(ID_BITS // 8)
