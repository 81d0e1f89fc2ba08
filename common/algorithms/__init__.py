"""The algorithms a run can use: the built-in ones by name, or any importable `package.module:Name`.

See base.py for the interface. Code never travels: a worker imports the algorithm the coordinator
names, and one that cannot import it leaves the run at Join with a message that says so.
"""

from __future__ import annotations

import importlib

from .base import Algorithm, Local, Stopped, Task
from .blockwise import BlockDescent, FedAvg, ParaBlock
from .cyclic import FedCyBGD
from .zeroth import DeComFL, FedSPZO

BUILTIN: dict[str, type[Algorithm]] = {a.name: a for a in (BlockDescent, ParaBlock, FedAvg, FedCyBGD, DeComFL, FedSPZO)}

__all__ = ["BUILTIN", "Algorithm", "AlgorithmError", "Local", "Stopped", "Task", "load"]


class AlgorithmError(ValueError):
    """The algorithm named cannot be used here."""


def load(name: str) -> type[Algorithm]:
    """The algorithm class for a built-in name or `package.module:Name`."""
    if name in BUILTIN:
        return BUILTIN[name]
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise AlgorithmError(f"unknown algorithm {name!r}: one of {', '.join(BUILTIN)}, or package.module:Name")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or the module failing as it loads
        raise AlgorithmError(f"cannot import algorithm module {module_name!r}: {type(e).__name__}: {e}") from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise AlgorithmError(f"{name}: {attr!r} in {module_name} is not a fedblock Algorithm class")
    return cls
