"""Lazy materialization: serve a checkpoint's pages into memory on first touch.

:class:`LazyImage` registers a memory range (guest RAM) with userfaultfd in
missing mode and hands it to the C fault handler in
``storage/native/lazyfault.c``: one thread serves each missing page the
moment something touches it (a vCPU, KVM on its behalf, or any VMM thread),
another fills the rest in the background -- first the pages the newest
checkpoints of the path changed, then everything in page order.  Neither
thread is a Python thread, so a Python thread that holds the GIL and touches
an unpopulated page is served all the same (a handler in Python would
deadlock there: it would need the GIL the faulting thread holds).

Pages are decoded from the store's own packs, through a read-only SQLite
connection per C thread held in one read transaction (one snapshot) for the
whole lazy phase, and checked like every read: the blob's checksum, one
decoded page, its content hash.  Nothing is written to the store, so killing
the process at any moment leaves it as it was.

A page that fails its checks is never populated: it becomes PROT_NONE (so a
vCPU on it gets EFAULT rather than running on a wrong or zero page), the
failure is kept (:meth:`LazyImage.error`) and ``on_event`` is called from a
watcher thread, which the VMM uses to stop the machine.

Nothing here knows about KVM: the caller passes an address and a size.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import mmap
import os
import threading
import time

import numpy as np

from . import pageloops
from .codec import PAGE_SIZE
from .errors import CorruptionError, InvalidArgumentError, StoreError
from .packs import MAX_PACK_ID
from .validate import MAX_BLOB_ID, MAX_PACK_BLOBS

#: Why a page failed (lazyfault.c's LZE_* kinds).
_KINDS = {1: "references a blob that is missing from the store",
          2: "stored bytes fail their checksum",
          3: "does not decode to one page",
          4: "does not decode to its content hash",
          5: "its delta base is missing or damaged",
          6: "could not be placed (UFFDIO_COPY failed)",
          7: "its pack's metadata are damaged",
          8: "its page maps do not match the checkpoint's digest"}
_LZE_META, _LZE_DIGEST, _LZE_MAP = 7, 8, 9
_SQLITE_NAMES = ("sqlite3_open_v2", "sqlite3_close_v2", "sqlite3_exec", "sqlite3_busy_timeout",
                 "sqlite3_blob_open", "sqlite3_blob_reopen", "sqlite3_blob_read", "sqlite3_blob_close",
                 "sqlite3_blob_bytes", "sqlite3_prepare_v2", "sqlite3_bind_int64", "sqlite3_step",
                 "sqlite3_column_int64", "sqlite3_column_type", "sqlite3_finalize")


def pack_directory(rows) -> np.ndarray:
    """``packs`` rows (id, first, n) -> the (3, k) int64 directory the C
    handler searches by first blob id: rows whose integers are out of range, or whose
    blob ids overlap a lower-numbered pack's, are left out (their blobs are then
    missing, as a damaged pack's are in the catalogue).  The handler reads each
    pack's size and check value with its metadata and checks them when it first
    needs one of its blobs (those columns follow the big arrays in the row:
    reading them here would walk every pack's overflow pages)."""
    limits = (MAX_PACK_ID - 1, MAX_BLOB_ID - 1, MAX_PACK_BLOBS)
    good = [r for r in rows if len(r) == 3 and all(type(v) is int and 0 <= v <= hi for v, hi in zip(r, limits))
            and r[0] > 0 and r[1] > 0 and r[2] > 0 and r[1] + r[2] <= MAX_BLOB_ID]
    good.sort(key=lambda r: r[0])
    taken: list[tuple[int, int]] = []
    keep = []
    for r in good:                    # by id: a later pack overlapping an earlier one is damaged
        lo, hi = r[1], r[1] + r[2]
        i = bisect.bisect_left(taken, (lo, hi))
        if (i > 0 and taken[i - 1][1] > lo) or (i < len(taken) and taken[i][0] < hi):
            continue
        taken.insert(i, (lo, hi))
        keep.append(r)
    keep.sort(key=lambda r: r[1])
    out = np.zeros((3, len(keep)), np.int64)
    if keep:
        out[:] = np.array(keep, np.int64).T
    return out


#: How a host thread that touches a page that failed its checks is reported
#: (lazyfault.c, lz_segv): it would otherwise die of SIGSEGV on the page, which
#: is PROT_NONE so that no vCPU ever runs on it.  The process writes one line
#: to stderr, prefix + message + suffix, and exits 1.
_FATAL = ["error: ", "\n"]


def report_as_json(on: bool = True) -> None:
    """Write that line in the CLI's ``--json`` error form instead
    (``{"error": ..., "exit_code": 1}``; the messages hold no quote or backslash)."""
    _FATAL[:] = ['{"error": "', '", "exit_code": 1}\n'] if on else ["error: ", "\n"]


class LazyUnavailable(StoreError):
    """This kernel or process cannot serve memory lazily (no userfaultfd, no permission,
    or the C extension is not built)."""


_sqlite = None


def _sqlite_fns() -> dict[str, int]:
    """Entry points of the libsqlite3 that Python's sqlite3 module uses (one
    library in the process: its file locks must be shared with the store's
    own connections), by name."""
    global _sqlite
    if _sqlite is None:
        import _sqlite3
        name = ctypes.util.find_library("sqlite3") or "libsqlite3.so.0"
        lib = None
        for cand in (getattr(_sqlite3, "__file__", None), name):
            try:
                lib = ctypes.CDLL(cand)
                _sqlite = {n: ctypes.cast(getattr(lib, n), ctypes.c_void_p).value for n in _SQLITE_NAMES}
                break
            except (OSError, AttributeError, TypeError):
                continue
        else:
            raise LazyUnavailable("lazy restore needs the SQLite C library Python uses; it exports no "
                                  "incremental BLOB functions here")
    return _sqlite


def fn_table(lib) -> np.ndarray:
    """lz_create's function table, in the order the C side names (``lz_fn(i)``),
    from the LZ4/xxh3 functions the page loops use and the SQLite ones: by name
    on both sides, so a reordering on either can never mismatch silently."""
    from ._pagecodec import ffi
    have = dict(pageloops.functions(), **_sqlite_fns())
    names = []
    while (name := lib.lz_fn(len(names))) != ffi.NULL:
        names.append(ffi.string(name).decode())
    try:
        return np.array([have[n] for n in names], np.uint64)
    except KeyError as exc:
        raise LazyUnavailable(f"the lazy-restore handler wants a function nothing gave it: {exc}") from None


def probe() -> str:
    """'' when lazy restore can work here, else why not (one line)."""
    if os.environ.get("SNAPCTL_NO_USERFAULTFD", "") not in ("", "0"):
        return "userfaultfd is disabled (SNAPCTL_NO_USERFAULTFD is set)"
    if not pageloops.loaded():
        return f"lazy restore needs the C extension (the store runs {pageloops.kind()})"
    if not hasattr(pageloops.library(), "lz_fn"):
        return "lazy restore needs the C extension rebuilt (python setup.py build_ext --inplace)"
    fd = int(pageloops.library().lz_uffd_open())
    if fd < 0:
        return f"userfaultfd is not available here ({os.strerror(-fd)})"
    os.close(fd)
    return ""


class LazyImage:
    """Serve checkpoint ``ckpt`` of ``store`` into the ``npages`` pages at
    host address ``addr`` (fresh anonymous memory nothing has touched).

    ``eager``: page range populated before this returns (checked; raises
    ``CorruptionError``).  ``index``: ``store.page_index(ckpt)`` when the caller
    has already read it (e.g. while it built the VM).  Call :meth:`start` to start
    the handler and the background fill, :meth:`close` before unmapping the memory."""

    def __init__(self, store, ckpt: int, addr: int, npages: int, *, eager: tuple[int, int] = (0, 0),
                 on_event=None, recent: int = 4, recent_max: int = 0, index=None):
        if index is not None and index.ckpt != ckpt:
            raise InvalidArgumentError(f"a page index of checkpoint {index.ckpt} given for checkpoint {ckpt}")
        why = probe()
        if why:
            raise LazyUnavailable(why)
        if npages != store.page_count:
            raise StoreError(f"memory of {npages} pages for a store of {store.page_count}")
        self._lib = pageloops.library()
        self.index = index if index is not None else store.page_index(ckpt)
        self.ckpt = self.index.ckpt
        self._maps = np.ascontiguousarray(self.index.maps)
        self._map_ptrs = np.array([self._maps[i].ctypes.data for i in range(2)], np.uint64)
        self.addr, self.npages = addr, npages
        self.on_event = on_event
        self.t0 = time.perf_counter()
        # straight from the kernel, zero and untouched (np.zeros' calloc clears it when
        # glibc serves it from the heap: O(memory) before the guest starts)
        self._state_map = mmap.mmap(-1, npages, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._state = np.frombuffer(self._state_map, np.uint8)
        packs = self.index.packs
        self._dir = np.ascontiguousarray(packs)
        self._dir_ptrs = np.array([self._dir[i].ctypes.data for i in range(3)], np.uint64)
        d = self.index.digest
        self._digest = np.array([d & ((1 << 64) - 1), (d >> 64) & ((1 << 64) - 1)], np.uint64)
        self._fns = fn_table(self._lib)
        self._ctx = 0
        self._last: dict | None = None
        self._uffd = -1
        self._evfd = -1
        self._closed = False
        self._lock = threading.RLock()      # the handler is freed under it: stats() takes it too
        self._watcher: threading.Thread | None = None
        self.finished_at: float | None = None
        fd = int(self._lib.lz_uffd_open())
        if fd < 0:
            raise LazyUnavailable(f"userfaultfd is not available here ({os.strerror(-fd)})")
        self._uffd = fd
        try:
            rc = int(self._lib.lz_uffd_register(fd, addr, npages * PAGE_SIZE))
            if rc < 0:
                raise LazyUnavailable(f"cannot register guest memory with userfaultfd ({os.strerror(-rc)})")
            self._evfd = os.eventfd(0, os.EFD_CLOEXEC)
            self._ctx = int(self._lib.lz_create(fd, self._evfd, addr, npages, self._map_ptrs.ctypes.data,
                                                self._maps.shape[1], recent, recent_max,
                                                self._dir_ptrs.ctypes.data, self._dir.shape[1],
                                                self._digest.ctypes.data, self._state.ctypes.data,
                                                self._fns.ctypes.data, os.fsencode(store.filename)))
            if not self._ctx:
                raise LazyUnavailable(f"{store.filename}: the lazy-restore handler cannot open the store")
            self._lib.lz_set_fatal(self._ctx, self.ckpt, _FATAL[0].encode(), _FATAL[1].encode(), 2, 1)
            lo, hi = eager
            if hi > lo and int(self._lib.lz_fill_now(self._ctx, lo, hi)):
                self.raise_error()
        except BaseException:
            self.close()
            raise

    # -- running -----------------------------------------------------------------------
    def start(self, background: bool = True, *, eager: bool = False) -> None:
        """Serve faults from now on, and fill the rest in the background (``eager``: nothing
        runs meanwhile, so the fill does not start below the caller's priority)."""
        self.t0 = time.perf_counter()
        if int(self._lib.lz_start(self._ctx, (2 if eager else 1) if background else 0)):
            raise LazyUnavailable("cannot start the lazy-restore threads")
        self._watcher = threading.Thread(target=self._watch, name="lazy-restore-watch", daemon=True)
        self._watcher.start()

    def started(self) -> None:
        """A vCPU is about to enter the guest: the background fill stops making way for the
        start (it would after 50 ms anyway) and runs ahead of the vCPUs."""
        with self._lock:
            if self._ctx:
                self._lib.lz_started(self._ctx)

    def _watch(self) -> None:
        """Wakes on the handler's event fd (a failure, or the fill is done); GIL-free while waiting."""
        while True:
            try:
                os.read(self._evfd, 8)
            except OSError:
                return
            if self._closed:
                return
            st = self.stats()
            if st["error"] or st["done"]:
                if st["done"] and not st["error"]:
                    self.finished_at = time.perf_counter()
                if self.on_event is not None:
                    try:
                        self.on_event(self)
                    except Exception:  # noqa: BLE001 - the callback's problem, never the handler's
                        pass
                return

    def wait(self, timeout: float | None = None) -> None:
        """Wait until every page is populated; raise ``CorruptionError`` for a damaged page."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            st = self.stats()
            if st["error"]:
                self.raise_error()
            if st["done"]:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"lazy restore: {st['populated']} of {self.npages} pages after {timeout} s")
            time.sleep(0.002)

    @property
    def done(self) -> bool:
        return self._ctx != 0 and bool(self.stats()["done"])

    def stats(self) -> dict:
        with self._lock:
            return self._stats()

    def _stats(self) -> dict:
        if not self._ctx:
            if self._last is not None:
                return dict(self._last)
            return {"populated": 0, "faults": 0, "fault_pages": 0, "background_pages": 0, "zero_pages": 0,
                    "raced": 0, "done": False, "full_ms": None, "error": 0, "error_page": -1,
                    "error_blob": -1, "errno": 0, "error_pack": -1, "image_ms": None}
        out = np.zeros(14, np.int64)
        self._lib.lz_stats(self._ctx, out.ctypes.data)
        v = out.tolist()
        return {"populated": v[0], "faults": v[1], "fault_pages": v[2], "background_pages": v[3],
                "zero_pages": v[4], "raced": v[5], "done": bool(v[6]),
                "full_ms": round(v[7] / 1e6, 3) if v[6] else None,
                "error": v[8], "error_page": v[9], "error_blob": v[10], "errno": v[11], "error_pack": v[12],
                "image_ms": round(v[13] / 1e6, 3) if v[13] else None}

    def error(self) -> CorruptionError | None:
        """The first page that failed, as the error a read would raise; None if none did."""
        st = self.stats()
        if not st["error"]:
            return None
        page, blob = st["error_page"], st["error_blob"]
        why = _KINDS.get(st["error"], f"failed ({st['error']})")
        if st["error"] == 6 and st["errno"]:
            why += f": {os.strerror(st['errno'])}"
        if st["error"] == _LZE_META:
            why = f"its pack {st['error_pack']} has damaged metadata"
        if st["error"] == _LZE_MAP:
            return CorruptionError(f"checkpoint {self.ckpt}: the page map of checkpoint {st['error_pack']} "
                                   f"is damaged{'; the lazy restore stopped the guest' if self.on_event else ''}",
                                   checkpoint=self.ckpt)
        if st["error"] == _LZE_DIGEST:
            then = "; the lazy restore stopped the guest" if self.on_event else ""
            return CorruptionError(f"checkpoint {self.ckpt}: {why} (a page map is damaged or a blob is "
                                   f"missing){then}", checkpoint=self.ckpt)
        then = "; the lazy restore stopped the guest before it used the page" if self.on_event else ""
        return CorruptionError(f"checkpoint {self.ckpt}, page {page} (gpa {page * PAGE_SIZE:#x}), blob {blob}: "
                               f"{why}{then}",
                               checkpoint=self.ckpt, page=page, blob=blob)

    def raise_error(self) -> None:
        err = self.error()
        if err is not None:
            raise err

    # -- the end -----------------------------------------------------------------------
    def close(self, *, free_later: bool = False) -> None:
        """Stop the handler threads and unregister the memory (call before unmapping it;
        anything still blocked on a missing page is woken and then sees plain anonymous memory).
        ``free_later``: the handler's own memory and SQLite connections are freed by a
        short-lived thread, after this returns (freeing them, with the store file's mappings,
        took 8-17 ms after a 1 GiB fill here, which a restore need not wait for)."""
        ctx = 0
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._ctx:
                self._lib.lz_stop(self._ctx)
            if self._uffd >= 0:
                self._lib.lz_uffd_unregister(self._uffd, self.addr, self.npages * PAGE_SIZE)
                os.close(self._uffd)
                self._uffd = -1
            if self._evfd >= 0:
                os.eventfd_write(self._evfd, 1)          # wake the watcher; it sees _closed
            if self._ctx:
                self._last = self._stats()
                ctx, self._ctx = self._ctx, 0          # stats() answers from _last from now on
        if ctx:
            if free_later:      # nothing but this thread uses ctx any more: its threads are joined
                threading.Thread(target=self._lib.lz_destroy, args=(ctx,), name="lazy-restore-free",
                                 daemon=True).start()
            else:
                self._lib.lz_destroy(ctx)
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join()
        if self._evfd >= 0:
            os.close(self._evfd)
            self._evfd = -1

    def finish(self) -> None:
        """After the fill is done: stop the threads and unregister, so guest memory is plain
        anonymous memory again (no fault goes through userfaultfd any more)."""
        if self.done:
            self.close()


def fill(store, ckpt: int, addr: int, npages: int) -> bool:
    """Materialize checkpoint ``ckpt`` into the fresh anonymous memory at ``addr`` through
    userfaultfd: the handler's two background threads decode every page straight into place
    (UFFDIO_COPY allocates each page already filled: no first-touch fault, no zeroing);
    returns once all are there, memory unregistered. False (nothing done) when userfaultfd
    is not available; ``CorruptionError`` for a damaged page."""
    if probe():
        return False
    try:
        lz = LazyImage(store, ckpt, addr, npages, recent=0)
    except LazyUnavailable:
        return False
    try:
        lz.start(eager=True)
        lz.wait()
    except LazyUnavailable:
        return False        # pages placed so far hold their right content: the caller fills the rest
    finally:
        lz.close(free_later=True)
    return True
