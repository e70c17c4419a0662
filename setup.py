"""Builds the optional C page loops (storage/native/pagecodec.c) with cffi.

Everything else is in pyproject.toml.  ``optional=True``: without a C
compiler the install still succeeds and the store uses its pure-Python loops
(``storage.pageloops.loaded()`` says which, ``storage.pageloops.kind()`` how they were loaded)."""
import runpy
from pathlib import Path

from setuptools import setup

here = Path(__file__).parent


def extensions():
    try:
        ffibuilder = runpy.run_path(str(here / "storage" / "native" / "build.py"))["ffibuilder"]
        ext = ffibuilder.distutils_extension(tmpdir=str(here / "build" / "cffi"))
    except Exception as exc:                # no cffi, or the C source is missing
        print(f"snapctl: not building the C page loops ({exc}); the store uses its Python loops")
        return []
    ext.optional = True
    return [ext]


setup(ext_modules=extensions())
