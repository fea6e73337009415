"""Fingerprints of Python callables, for caches whose content depends on a user function (curvature losses).

:func:`callable_fingerprint` hashes what decides a function's result as far as it can be read without running it:
its qualified name, its bytecode and constants (nested functions included), the global values it names (numbers,
strings, lists, dicts, tensors by content, modules, classes, functions), its defaults, and its closure cells (the
same kinds); ``functools.partial`` objects by their function and arguments. It returns None when a part cannot be
keyed (a callable object or bound method whose state is unknown, a closure over a model, a global ``nn.Module`` such
as a loss criterion): a cache must then not be reused.

Example:
    >>> def make(scale):
    ...     return lambda x: scale * x
    >>> callable_fingerprint(make(2.0)) == callable_fingerprint(make(2.0))
    True
    >>> callable_fingerprint(make(2.0)) == callable_fingerprint(make(3.0))
    False
    >>> def logits(model, batch):  # reads an attribute named like itself: hashed once, not forever
    ...     return model(batch).logits
    >>> callable_fingerprint(logits) is not None
    True
    >>> class Loss:
    ...     def __call__(self, x): return x
    >>> callable_fingerprint(Loss()) is None
    True
"""

from __future__ import annotations

import functools
import hashlib
import threading
import types
from typing import Any

import torch

from .hashing import byte_view

__all__ = ["callable_fingerprint", "value_fingerprint"]

_SIMPLE = (bool, int, float, complex, str, bytes, type(None))
_MAX_DEPTH = 12
# functions of installed libraries are keyed by name: their code changes only with the library's version
_LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "numpy", "math", "functools", "builtins")


_STATE = threading.local()


def _active() -> set[int]:
    """The functions whose code is being hashed, innermost last (per thread): a function met again inside itself is
    hashed by name only."""
    if not hasattr(_STATE, "active"):
        _STATE.active = set()
    return _STATE.active


class _Unkeyable(Exception):
    """A part of the callable whose effect on the result cannot be read."""


def _value(value: Any, h: Any, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise _Unkeyable("nested too deeply")
    if isinstance(value, _SIMPLE):
        h.update(f"{type(value).__name__}:{value!r};".encode())
    elif isinstance(value, (tuple, list)):
        h.update(f"{type(value).__name__}[{len(value)}](".encode())
        for item in value:
            _value(item, h, depth + 1)
        h.update(b")")
    elif isinstance(value, (frozenset, set)):
        parts = sorted(value_fingerprint(item) or "?" for item in value)
        if "?" in parts:
            raise _Unkeyable("set member")
        h.update(f"set({','.join(parts)})".encode())
    elif isinstance(value, dict):
        h.update(b"dict(")
        for key in sorted(value, key=repr):
            _value(key, h, depth + 1)
            _value(value[key], h, depth + 1)
        h.update(b")")
    elif isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"tensor:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(byte_view(t))
    elif isinstance(value, torch.dtype):
        h.update(f"dtype:{value};".encode())
    elif isinstance(value, types.ModuleType):
        h.update(f"module:{value.__name__};".encode())
    elif isinstance(value, type):
        h.update(f"class:{value.__module__}.{value.__qualname__};".encode())
    elif callable(value):
        _callable(value, h, depth + 1)
    else:
        raise _Unkeyable(type(value).__name__)


def _code(code: types.CodeType, fn_globals: dict, h: Any, depth: int) -> None:
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _code(const, fn_globals, h, depth)
        else:
            _value(const, h, depth + 1)
    for name in code.co_names:  # the global values the code reads (a module constant, a helper function)
        if name in fn_globals:
            value = fn_globals[name]
            if isinstance(value, (*_SIMPLE, tuple, types.ModuleType, type, torch.dtype)):
                _value(value, h, depth + 1)
            elif isinstance(value, types.FunctionType):
                if depth < _MAX_DEPTH:
                    h.update(f"global:{name}:".encode())
                    _callable(value, h, depth + 1)
            else:
                # lists, dicts, sets and tensors by content; an object whose state is unknown (a global
                # `criterion = nn.CrossEntropyLoss(weight=w)`) makes the function unkeyable: skipped, the cache kept a
                # loss's results after its class weights changed (+16 % on one stage)
                h.update(f"global:{name}:".encode())
                _value(value, h, depth + 1)


def _callable(fn: Any, h: Any, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise _Unkeyable("nested too deeply")
    if isinstance(fn, functools.partial):
        h.update(b"partial(")
        _callable(fn.func, h, depth + 1)
        _value(fn.args, h, depth + 1)
        _value(dict(fn.keywords), h, depth + 1)
        h.update(b")")
        return
    if isinstance(fn, types.FunctionType) and str(fn.__module__).split(".")[0] in _LIBRARIES:
        h.update(f"library-fn:{fn.__module__}.{fn.__qualname__};".encode())
        return
    if isinstance(fn, types.FunctionType):
        h.update(f"fn:{fn.__module__}.{fn.__qualname__}:".encode())
        active = _active()
        if id(fn) in active:  # named again inside itself (recursion, or `.logits` read in a global `logits`)
            h.update(b"again;")
            return
        active.add(id(fn))
        try:
            _code(fn.__code__, fn.__globals__, h, depth)
            _value(fn.__defaults__ or (), h, depth + 1)
            _value(dict(fn.__kwdefaults__ or {}), h, depth + 1)
            for cell in fn.__closure__ or ():
                try:
                    contents = cell.cell_contents
                except ValueError:  # an empty cell
                    h.update(b"empty-cell;")
                    continue
                _value(contents, h, depth + 1)
        finally:
            active.discard(id(fn))
        return
    if isinstance(fn, types.BuiltinFunctionType):  # C functions (torch.sum, len): fixed by the installed version
        owner = fn.__self__
        if owner is not None and not isinstance(owner, (types.ModuleType, type)):
            raise _Unkeyable("a builtin method bound to an object")
        h.update(f"builtin:{getattr(fn, '__module__', None)}.{fn.__qualname__};".encode())
        return
    raise _Unkeyable(f"a {type(fn).__name__} (its state is not part of its code)")


def callable_fingerprint(fn: Any) -> str | None:
    """A hex digest that changes when ``fn`` would compute something else, or None when that cannot be told.

    Also accepts a tuple of callables (a ``(forward, loss)`` pair).
    """
    return value_fingerprint(fn)


def value_fingerprint(value: Any) -> str | None:
    """As :func:`callable_fingerprint`, for any value built of simple values, containers, tensors and functions."""
    h = hashlib.sha256()
    try:
        _value(value, h, 0)
    except _Unkeyable:
        return None
    return h.hexdigest()
