"""Modules imported on first use, not at ``import storage``.

``snapctl list`` reads a few rows; importing numpy for it cost about a
sixth of its start-up (issue 14).  The modules on that path use
``from .deferred import numpy as np``: the first attribute looked up
(``np.zeros``...) imports numpy, and from then on every lookup is a plain
attribute of this object (numpy's namespace is copied into it).
"""

from __future__ import annotations

import importlib


class Deferred:
    """Stands for the module ``name`` until an attribute is looked up."""

    def __init__(self, name: str) -> None:
        self.__dict__["_deferred_name"] = name

    def __getattr__(self, attr: str):
        # only reached for names not copied in yet: the first lookup, or a
        # lazily created attribute of the module itself
        module = importlib.import_module(self.__dict__["_deferred_name"])
        if "_deferred_loaded" not in self.__dict__:
            self.__dict__.update(vars(module))
            self.__dict__["_deferred_loaded"] = True
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<deferred module {self.__dict__['_deferred_name']!r}>"


numpy = Deferred("numpy")
