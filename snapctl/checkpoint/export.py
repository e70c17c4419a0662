"""Writing a checkpoint's memory image to a file (the library side of `snapctl export`)."""

from __future__ import annotations

import os
import tempfile

import numpy as np

from storage import Store

PAGE = 4096


def export_raw(store: Store, ckpt: int, out_path: str, *, force: bool = False) -> int:
    """Write guest memory at ``ckpt`` to ``out_path``: byte i = guest-physical byte i.

    The file is built under a temporary name in the same directory (mode 0600,
    guest memory can hold secrets) and renamed into place, so a failure leaves
    nothing behind and an existing file is never half-overwritten. Without
    ``force`` an existing path (file or symlink) is refused; with it the path
    is replaced, never written through. Returns the bytes written.
    """
    out_path = os.fspath(out_path)
    if os.path.lexists(out_path) and not force:
        kind = "a symlink" if os.path.islink(out_path) else "a file"
        raise FileExistsError(f"{out_path} already exists ({kind}); use --force to replace it")
    if os.path.isdir(out_path):
        raise IsADirectoryError(f"{out_path} is a directory")
    directory = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"directory {directory} does not exist")
    size = store.page_count * PAGE
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".snapctl-export-")  # created 0600
    try:
        os.ftruncate(fd, size)
        image = np.memmap(tmp, dtype=np.uint8, mode="r+", shape=(store.page_count, PAGE))
        store.materialize(ckpt, image)
        image.flush()
        del image
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
