"""What every fuzzed loader test shares: the hypothesis profile, and the one property every mutated input must
meet.

The property (:func:`load_or_refuse`): the loader either returns (the caller then compares what it returned
with the original, bit for bit) or raises :class:`vitreg_jax.errors.UserError` with a one-line message. Any
other exception type is an escape and fails the test with that exception (hypothesis then shrinks the input);
so does a load that runs longer than :data:`TIME_LIMIT_S` (a hang) or that allocates more than the mutated
file's size (plus a fixed allowance for the interpreter's own small objects), measured with ``tracemalloc``.

``VITREG_JAX_FUZZ_EXAMPLES`` sets the number of mutated inputs per test (default :data:`DEFAULT_EXAMPLES`,
sized for CI); the runs are derandomized, so a CI failure reproduces exactly. A longer run::

    VITREG_JAX_FUZZ_EXAMPLES=3000 python -m pytest tests/test_fuzz_*.py -q --hypothesis-show-statistics
"""

from __future__ import annotations

import os
import signal
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings

from vitreg_jax.errors import UserError

DEFAULT_EXAMPLES = 60
TIME_LIMIT_S = 20.0  # one load of a file under a few MiB takes milliseconds; this is a hang
# tracemalloc also counts the loader's small Python objects (the unpickled metadata, dicts of arrays,
# zipfile's directory): allowed on top of the file's size, which is the bound on anything sized by the file's
# claims
FIXED_ALLOWANCE = 4 << 20
T = TypeVar("T")


def fuzz_settings(examples_per_run: int | None = None) -> settings:
    n = int(os.environ.get("VITREG_JAX_FUZZ_EXAMPLES", examples_per_run or DEFAULT_EXAMPLES))
    return settings(
        max_examples=n,
        derandomize=True,
        database=None,
        # the hang guard is the alarm below (a deadline would also fail slow-but-finished loads)
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


class Hang(Exception):
    """The load ran past TIME_LIMIT_S."""


@contextmanager
def time_limit(seconds: float = TIME_LIMIT_S) -> Iterator[None]:
    def expire(signum: int, frame: Any) -> None:
        raise Hang(f"the load ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def load_or_refuse(load: Callable[[], T], file_size: int) -> T | None:
    """``load()``'s result, or None when it raised a one-line UserError; anything else fails the test."""
    tracemalloc.start()
    try:
        with time_limit():
            try:
                result = load()
            except UserError as e:
                message = str(e)
                assert message and "\n" not in message and "\r" not in message, repr(message)
                result = None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= file_size + FIXED_ALLOWANCE, f"allocated {peak} bytes reading a {file_size}-byte file"
    return result


def flip(data: bytes, at: int, bit: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 1 << bit
    return bytes(out)


def put_int(data: bytes, at: int, width: int, value: int) -> bytes:
    """``data`` with the little-endian ``width``-byte field at ``at`` set to ``value`` (mod 2**(8*width))."""
    out = bytearray(data)
    out[at : at + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    return bytes(out)


def interesting_ints(original: int, file_size: int, width: int) -> list[int]:
    """Values a corrupted or hostile field tends to hold."""
    top = (1 << (8 * width)) - 1
    return sorted(
        {
            0,
            1,
            2,
            original - 1,
            original + 1,
            original * 2,
            original // 2,
            file_size - 1,
            file_size,
            file_size + 1,
            top,
            top // 2,
            top // 2 + 1,
            top - 1,
            1 << 31 if width >= 4 else 255,
        }
        - {original}
    )
