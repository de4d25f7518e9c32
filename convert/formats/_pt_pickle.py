"""A pickle interpreter that understands a state dict and nothing else: it can never run code.

It is not Python's unpickler with a filter in front: it implements the opcodes a ``torch.save`` pickle uses
(containers, scalars, strings, memo, ``GLOBAL``/``REDUCE``, ``BINPERSID``) itself, and a global resolves only
through :func:`vitreg_jax.convert.formats._pt_globals.resolve_global`: to one of our own functions or to a
name (dtype, storage class, layout) that stays inert data. ``REDUCE`` calls only those functions (the tensor
rebuild functions become ``TensorRef`` records; ``OrderedDict()``, ``set(...)``,
``_codecs.encode(s, "latin1")`` build plain values). Anything else is :class:`Refused` before it could
execute: any other global (by name), ``INST``/``OBJ``/``NEWOBJ``/``EXT*``, ``BUILD`` on anything but a dict,
out-of-band buffers. Persistent ids are handed to the caller's ``persistent_load`` (the archive's storages).

Errors: :class:`Refused` (the file asks for more than a state dict) and :class:`Corrupt` (the bytes are not a
well-formed pickle); the reader turns both into one-line ``UserError`` s naming the file.
"""

from __future__ import annotations

import codecs
import struct
from collections.abc import Callable
from typing import Any

from vitreg_jax.convert.formats._pt_globals import (
    Allowed,
    Corrupt,
    Refused,
    StorageType,
    TorchDType,
    resolve_global,
)

# Tuples and frozensets nested deeper than this are refused: hashing one (as a dict key or a set member)
# recurses in C without a depth check, so a 200,000-deep tuple would overflow the C stack (SIGSEGV). A
# state dict nests them a few levels at most.
MAX_NESTING = 100

# opcodes this interpreter refuses outright (they build arbitrary objects or fetch outside the pickle)
_REFUSED_OPS = {
    b"i": "INST",
    b"o": "OBJ",
    b"\x81": "NEWOBJ",
    b"\x92": "NEWOBJ_EX",
    b"\x82": "EXT1",
    b"\x83": "EXT2",
    b"\x84": "EXT4",
    b"\x97": "NEXT_BUFFER",
    b"\x98": "READONLY_BUFFER",
    b"P": "PERSID (text)",
}


class Machine:
    """One run over ``data``; :meth:`load` returns the root object."""

    def __init__(self, data: bytes, persistent_load: Callable[[Any], Any]) -> None:
        self.data = data
        self.pos = 0
        self.stack: list[Any] = []
        self.marks: list[int] = []
        self.memo: dict[int, Any] = {}
        self.persistent_load = persistent_load
        # id -> (nesting depth, the tuple or frozenset itself, kept alive so that its id stays its own)
        self.depths: dict[int, tuple[int, Any]] = {}

    # reading ---------------------------------------------------------------------------------------------
    def read(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise Corrupt("pickle data was truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def readline(self) -> bytes:
        end = self.data.find(b"\n", self.pos)
        if end < 0:
            raise Corrupt("pickle data was truncated")
        out = self.data[self.pos : end]
        self.pos = end + 1
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.read(n), "little")

    def pop(self) -> Any:
        if not self.stack or (self.marks and len(self.stack) <= self.marks[-1]):
            raise Corrupt("pickle stack underflow")
        return self.stack.pop()

    def pop_mark(self) -> list[Any]:
        if not self.marks:
            raise Corrupt("pickle mark missing")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def top(self) -> Any:
        if not self.stack or (self.marks and len(self.stack) <= self.marks[-1]):
            raise Corrupt("pickle stack underflow")
        return self.stack[-1]

    # the loop --------------------------------------------------------------------------------------------
    def load(self) -> Any:
        while True:
            op = self.read(1)
            if op == b".":
                if len(self.stack) != 1 or self.marks:
                    raise Corrupt("pickle ends with a malformed stack")
                return self.stack[0]
            if op in _REFUSED_OPS:
                raise Refused(
                    f"its pickle uses the {_REFUSED_OPS[op]} opcode, which builds arbitrary objects"
                )
            handler = _HANDLERS.get(op)
            if handler is None:
                raise Corrupt(f"unknown pickle opcode {op!r} at byte {self.pos - 1}")
            handler(self)

    # values ----------------------------------------------------------------------------------------------
    def push(self, value: Any) -> None:
        if type(value) in (tuple, frozenset) and id(value) not in self.depths:
            depth = 1 + max((self.depths[id(v)][0] for v in value if id(v) in self.depths), default=0)
            if depth > MAX_NESTING:
                raise Refused(
                    f"its pickle nests tuples or sets deeper than {MAX_NESTING} levels, "
                    "which a state dict never does"
                )
            self.depths[id(value)] = (depth, value)
        self.stack.append(value)

    def text_int(self) -> None:
        line = self.readline()
        if line in (b"00", b"01"):
            self.push(line == b"01")
        else:
            self.push(_int(line.rstrip(b"L")))

    def long_n(self, n: int) -> None:
        size = self.uint(n)
        if n == 4 and size >= 1 << 31:
            raise Corrupt("negative LONG4 size")
        self.push(int.from_bytes(self.read(size), "little", signed=True))

    def text_string(self) -> None:
        raw = self.readline()
        if len(raw) < 2 or raw[0] != raw[-1] or raw[:1] not in (b"'", b'"'):
            raise Corrupt("malformed STRING")
        self.push(codecs.escape_decode(raw[1:-1])[0].decode("ascii"))

    def unicode(self, n: int) -> None:
        self.push(self.read(self.uint(n)).decode("utf-8", "surrogatepass"))

    def binbytes(self, n: int) -> None:
        self.push(bytes(self.read(self.uint(n))))

    def binstring(self, n: int) -> None:  # protocol 0-1 byte strings: torch reads them as latin-1 text
        self.push(self.read(self.uint(n)).decode("latin1"))

    # containers ------------------------------------------------------------------------------------------
    def to_tuple(self, n: int | None) -> None:
        if n is None:
            self.push(tuple(self.pop_mark()))
        else:
            items = [self.pop() for _ in range(n)][::-1]
            self.push(tuple(items))

    def to_list(self) -> None:
        self.push(self.pop_mark())

    def to_dict(self) -> None:
        items = self.pop_mark()
        self.push(_pairs_into({}, items))

    def append(self) -> None:
        value = self.pop()
        target = self.top()
        if not isinstance(target, list):
            raise Corrupt("APPEND to something that is not a list")
        target.append(value)

    def appends(self) -> None:
        items = self.pop_mark()
        target = self.top()
        if not isinstance(target, list):
            raise Corrupt("APPENDS to something that is not a list")
        target.extend(items)

    def setitem(self) -> None:
        value, key = self.pop(), self.pop()
        target = self.top()
        if not isinstance(target, dict):
            raise Corrupt("SETITEM on something that is not a dict")
        _pairs_into(target, [key, value])

    def setitems(self) -> None:
        items = self.pop_mark()
        target = self.top()
        if not isinstance(target, dict):
            raise Corrupt("SETITEMS on something that is not a dict")
        _pairs_into(target, items)

    def additems(self) -> None:
        items = self.pop_mark()
        target = self.top()
        if not isinstance(target, set):
            raise Corrupt("ADDITEMS to something that is not a set")
        try:
            target.update(items)
        except TypeError:
            raise Corrupt("unhashable set item") from None

    def frozenset_(self) -> None:
        try:
            self.push(frozenset(self.pop_mark()))
        except TypeError:
            raise Corrupt("unhashable set item") from None

    # memo ------------------------------------------------------------------------------------------------
    def get(self, key: int) -> None:
        if key not in self.memo:
            raise Corrupt(f"pickle memo key {key} is missing")
        self.push(self.memo[key])

    def put(self, key: int) -> None:
        self.memo[key] = self.top()

    # objects ---------------------------------------------------------------------------------------------
    def global_(self, module: str, name: str) -> None:
        self.push(resolve_global(module, name))

    def stack_global(self) -> None:
        name, module = self.pop(), self.pop()
        if not isinstance(module, str) or not isinstance(name, str):
            raise Corrupt("STACK_GLOBAL with names that are not strings")
        self.global_(module, name)

    def reduce(self) -> None:
        args, func = self.pop(), self.pop()
        if not isinstance(func, Allowed):
            raise Refused(f"its pickle calls a {type(func).__name__} value, which a weights file never does")
        if not isinstance(args, tuple):
            raise Corrupt("REDUCE arguments are not a tuple")
        try:
            self.push(func.fn(*args))
        except TypeError:
            raise Corrupt(f"{func.name} called with the wrong arguments") from None

    def build(self) -> None:
        """``BUILD``: only a dict's attributes (``state_dict()._metadata``), which are dropped, never set."""
        state = self.pop()
        target = self.top()
        if not isinstance(target, dict) or not isinstance(state, dict | tuple):
            what = (
                target.name
                if isinstance(target, StorageType | TorchDType | Allowed)
                else type(target).__name__
            )
            raise Refused(f"its pickle sets the state of a {what}, which a weights file never does")

    def binpersid(self) -> None:
        self.push(self.persistent_load(self.pop()))


def _int(text: bytes) -> int:
    try:
        return int(text)
    except ValueError:
        raise Corrupt("malformed INT/LONG") from None


def _pairs_into(target: dict[Any, Any], items: list[Any]) -> dict[Any, Any]:
    if len(items) % 2:
        raise Corrupt("odd number of items for a dict")
    try:
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]
    except TypeError:
        raise Corrupt("unhashable dict key") from None
    return target


def _float(text: bytes) -> float:
    try:
        return float(text)
    except ValueError:
        raise Corrupt("malformed FLOAT") from None


def _mark(m: Machine) -> None:
    m.marks.append(len(m.stack))


def _pop(m: Machine) -> None:
    if m.marks and len(m.stack) == m.marks[-1]:
        m.pop_mark()  # POP right after MARK discards the mark (as CPython's unpickler does)
    else:
        m.pop()


def _frame(m: Machine) -> None:
    m.uint(8)  # a length hint only; the data follows inline


def _global_text(m: Machine) -> None:
    module, name = m.readline(), m.readline()
    try:
        m.global_(module.decode("ascii"), name.decode("ascii"))
    except UnicodeDecodeError:
        raise Corrupt("GLOBAL with a non-ASCII name") from None


_HANDLERS: dict[bytes, Callable[[Machine], None]] = {
    b"\x80": lambda m: m.read(1),  # PROTO
    b"\x95": _frame,
    b"(": _mark,
    b"0": _pop,
    b"1": lambda m: m.pop_mark(),
    b"2": lambda m: m.push(m.top()),
    b"N": lambda m: m.push(None),
    b"\x88": lambda m: m.push(True),
    b"\x89": lambda m: m.push(False),
    b"I": Machine.text_int,
    b"L": lambda m: m.push(_int(m.readline().rstrip(b"L"))),
    b"J": lambda m: m.push(int.from_bytes(m.read(4), "little", signed=True)),
    b"K": lambda m: m.push(m.uint(1)),
    b"M": lambda m: m.push(m.uint(2)),
    b"\x8a": lambda m: m.long_n(1),
    b"\x8b": lambda m: m.long_n(4),
    b"F": lambda m: m.push(_float(m.readline())),
    b"G": lambda m: m.push(struct.unpack(">d", m.read(8))[0]),
    b"S": Machine.text_string,
    b"T": lambda m: m.binstring(4),
    b"U": lambda m: m.binstring(1),
    b"V": lambda m: m.push(m.readline().decode("raw-unicode-escape")),
    b"X": lambda m: m.unicode(4),
    b"\x8c": lambda m: m.unicode(1),
    b"\x8d": lambda m: m.unicode(8),
    b"B": lambda m: m.binbytes(4),
    b"C": lambda m: m.binbytes(1),
    b"\x8e": lambda m: m.binbytes(8),
    b"\x96": lambda m: m.push(bytearray(m.read(m.uint(8)))),
    b")": lambda m: m.push(()),
    b"t": lambda m: m.to_tuple(None),
    b"\x85": lambda m: m.to_tuple(1),
    b"\x86": lambda m: m.to_tuple(2),
    b"\x87": lambda m: m.to_tuple(3),
    b"]": lambda m: m.push([]),
    b"l": Machine.to_list,
    b"}": lambda m: m.push({}),
    b"d": Machine.to_dict,
    b"\x8f": lambda m: m.push(set()),
    b"\x90": Machine.additems,
    b"\x91": Machine.frozenset_,
    b"a": Machine.append,
    b"e": Machine.appends,
    b"s": Machine.setitem,
    b"u": Machine.setitems,
    b"g": lambda m: m.get(_int(m.readline())),
    b"h": lambda m: m.get(m.uint(1)),
    b"j": lambda m: m.get(m.uint(4)),
    b"p": lambda m: m.put(_int(m.readline())),
    b"q": lambda m: m.put(m.uint(1)),
    b"r": lambda m: m.put(m.uint(4)),
    b"\x94": lambda m: m.put(len(m.memo)),
    b"c": _global_text,
    b"\x93": Machine.stack_global,
    b"R": Machine.reduce,
    b"b": Machine.build,
    b"Q": Machine.binpersid,
}


def unpickle(data: bytes, persistent_load: Callable[[Any], Any]) -> Any:
    """The root object of ``data``; raises :class:`Refused` or :class:`Corrupt` (nothing else)."""
    try:
        return Machine(data, persistent_load).load()
    except (Refused, Corrupt):
        raise
    except (UnicodeDecodeError, ValueError, OverflowError, struct.error, RecursionError, MemoryError) as e:
        raise Corrupt(f"malformed pickle ({type(e).__name__})") from None
