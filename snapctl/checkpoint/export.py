"""Writing a checkpoint's memory image to a file or a stream (the library side of `snapctl export`)."""

from __future__ import annotations

import contextlib
import os
import tempfile

import numpy as np

from storage import Store

from ..kvm.constants import PAGE_SIZE

#: Pages read from the store at a time (16 MiB): bounded memory, a progress step.
CHUNK_PAGES = 4096


def _is_store_file(store: Store, out_path: str) -> bool:
    """Whether ``out_path`` names the store or one of its SQLite sidecars
    (by name through symlinks, or as the same file through a hard link)."""
    real = os.path.realpath(out_path)
    base = os.path.realpath(store.filename)
    for suffix in ("", "-wal", "-shm", "-journal"):
        if real == base + suffix:
            return True
        try:
            if os.path.samefile(out_path, store.filename + suffix):
                return True
        except OSError:
            pass
    return False


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _chunks(store: Store, ckpt: int, on_pages=None):
    """(first page, (k, 4096) pages, mask of non-zero pages) over the whole image, in order,
    from one snapshot (``pages`` valid until the next chunk); zero pages are left unset."""
    with contextlib.closing(store.image_chunks(ckpt, CHUNK_PAGES)) as chunks:
        for lo, pages, nonzero in chunks:
            yield lo, pages, nonzero
            if on_pages is not None:
                on_pages(len(pages))


def export_raw(store: Store, ckpt: int, out, *, force: bool = False, on_pages=None) -> int:
    """Write guest memory at ``ckpt``: byte i = guest-physical byte i. Returns the image size.

    ``out`` is a path or a binary stream (``sys.stdout.buffer``). A file is
    sparse: all-zero pages are holes, never written (with ``pwrite``, never
    through a mapping, so a full disk is an ``OSError``, not SIGBUS). It is
    built under a temporary name in the same directory (mode 0600, guest
    memory can hold secrets) and renamed into place, so a failure leaves
    nothing behind and an existing file is never half-overwritten. Without
    ``force`` an existing path (file or symlink) is refused; with it the path
    is replaced, never written through -- but never the store itself or its
    -wal/-shm. ``on_pages(n)`` is called as pages are done.
    """
    size = store.page_count * PAGE_SIZE
    if hasattr(out, "write"):
        for _, pages, nonzero in _chunks(store, ckpt, on_pages):
            pages[~nonzero] = 0
            out.write(memoryview(pages).cast("B"))
        out.flush()
        return size
    out_path = os.fspath(out)
    if _is_store_file(store, out_path):
        raise FileExistsError(f"{out_path} is the store {store.filename} (or one of its files); "
                              "refusing to export onto it")
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
        try:
            os.ftruncate(fd, size)                     # a hole: allocates nothing
            for lo, pages, nonzero in _chunks(store, ckpt, on_pages):
                idx = np.flatnonzero(nonzero)
                if not len(idx):
                    continue
                cuts = np.flatnonzero(np.diff(idx) != 1) + 1
                for run in np.split(idx, cuts):   # runs of pages that hold data, one pwrite each
                    a, b = int(run[0]), int(run[-1]) + 1
                    _pwrite_all(fd, memoryview(pages[a:b]).cast("B"), (lo + a) * PAGE_SIZE)
            os.fsync(fd)
        except OSError as exc:
            if exc.errno is None:
                raise
            raise OSError(f"{out_path}: cannot write the export ({exc.strerror}); "
                          "nothing was written") from None
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
