"""Writing a checkpoint's memory image to a file or a stream (the library side of `snapctl export`)."""

from __future__ import annotations

import os
import tempfile

import numpy as np

from storage import Store

PAGE = 4096
#: Pages read from the store at a time (16 MiB): bounded memory, a progress step.
CHUNK_PAGES = 4096


def _chunks(store: Store, ckpt: int, on_pages=None):
    """(first page, (n, 4096) array) over the whole image, in order."""
    n = store.page_count
    for lo in range(0, n, CHUNK_PAGES):
        k = min(CHUNK_PAGES, n - lo)
        data = np.frombuffer(store.read(ckpt, lo * PAGE, k * PAGE), np.uint8).reshape(k, PAGE)
        yield lo, data
        if on_pages is not None:
            on_pages(k)


def export_raw(store: Store, ckpt: int, out, *, force: bool = False, on_pages=None) -> int:
    """Write guest memory at ``ckpt``: byte i = guest-physical byte i. Returns the bytes written.

    ``out`` is a path or a binary stream (``sys.stdout.buffer``). A file is
    sparse: all-zero pages are holes, never written. It is built under a
    temporary name in the same directory (mode 0600, guest memory can hold
    secrets) and renamed into place, so a failure leaves nothing behind and
    an existing file is never half-overwritten. Without ``force`` an existing
    path (file or symlink) is refused; with it the path is replaced, never
    written through. ``on_pages(n)`` is called as pages are done.
    """
    size = store.page_count * PAGE
    if hasattr(out, "write"):
        for _, data in _chunks(store, ckpt, on_pages):
            out.write(data.data)
        out.flush()
        return size
    out_path = os.fspath(out)
    if os.path.lexists(out_path) and not force:
        kind = "a symlink" if os.path.islink(out_path) else "a file"
        raise FileExistsError(f"{out_path} already exists ({kind}); use --force to replace it")
    if os.path.isdir(out_path):
        raise IsADirectoryError(f"{out_path} is a directory")
    directory = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"directory {directory} does not exist")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".snapctl-export-")  # created 0600
    try:
        os.ftruncate(fd, size)  # a hole of the full size: zero pages stay holes
        for lo, data in _chunks(store, ckpt, on_pages):
            nz = np.flatnonzero(data.any(axis=1))
            # runs of consecutive non-zero pages, one pwrite each
            breaks = np.flatnonzero(np.diff(nz) != 1) + 1
            for run in np.split(nz, breaks) if nz.size else ():
                a, b = int(run[0]), int(run[-1]) + 1
                os.pwrite(fd, data[a:b].data, (lo + a) * PAGE)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, out_path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return size
