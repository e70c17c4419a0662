"""The store's SQLite connections and its transactions, one object.

Two connections: a write connection (held by one checkpoint writer or
maintenance call at a time) and a read connection, so the main thread can
read committed checkpoints while a worker thread writes the next one.  The
store, the checkpoint writer, verify and prune all take their transactions
here: one implementation of BEGIN/COMMIT/ROLLBACK, the writer's lock
(storage.lock) and the background WAL copy.
"""

from __future__ import annotations

import sqlite3
import threading
import weakref
from contextlib import contextmanager

from . import lock, schema
from .errors import CorruptionError, StoreError

#: The WAL is copied back into the main file (in the background) after
#: this many commits, or sooner once they stored WAL_CHECKPOINT_BYTES: small
#: checkpoints then share one copy instead of each paying for its own
#: before the next may begin (see WalCheckpointer).  32, not 8: a writer
#: that is behind begins the next checkpoint right after a commit, so it
#: waits for every copy (and its fsync of the main file); with ~160-page
#: checkpoints that wait averaged 1.5-2.5 ms a checkpoint on a loaded host
#: at 8 and 0.5-0.7 ms at 32.  The WAL still holds at most 4 MiB of commits.
WAL_CHECKPOINT_COMMITS = 32
WAL_CHECKPOINT_BYTES = 4 << 20


@contextmanager
def sqlite_errors(filename: str):
    """Turn SQLite's exceptions into the store's: damage inside SQLite's own
    b-tree pages ("database disk image is malformed") is a CorruptionError,
    anything else SQLite raises (locked, I/O error) a StoreError."""
    try:
        yield
    except sqlite3.Error as exc:
        msg = str(exc)
        if isinstance(exc, sqlite3.DatabaseError) and (
                "malformed" in msg or "not a database" in msg or "corrupt" in msg
                or not isinstance(exc, (sqlite3.OperationalError, sqlite3.DataError))):
            raise CorruptionError(f"{filename}: database damaged ({msg})") from exc
        raise StoreError(f"{filename}: {msg}") from exc


class Connections:
    """The read and write connections of one open store and the
    transactions on them.  ``wconn`` None: opened read-only."""

    def __init__(self, path: str, wconn: sqlite3.Connection | None, rconn: sqlite3.Connection,
                 synchronous: str = "FULL", lock_key: tuple | None = None) -> None:
        self.filename = path
        self.synchronous = synchronous
        self._lock_key = lock_key            # storage.lock: this process's hold on the file
        self._wconn = wconn
        self._rconn = rconn
        self._wlock = threading.RLock()
        self._rlock = threading.RLock()
        self._closed = False
        self._wal = None
        self._wal_commits = self._wal_bytes = 0    # since the last WAL copy was started
        self._tree: tuple | None = None              # (key, id -> parent): see checked_parents
        if wconn is not None:
            # SQLite's automatic WAL checkpoint runs inside COMMIT and copies
            # the whole checkpoint a second time (into the main file) before
            # the writer gets control back: measured 0.3 s -> 0.14 s commit
            # for 50k pages without it.  A background thread does that copy.
            wconn.execute("PRAGMA wal_autocheckpoint=0")
            self._wal = WalCheckpointer(path, synchronous)
            self._wal.start()
            # Connections dropped without close() must not leak the thread.
            weakref.finalize(self, self._wal.stop)

    @property
    def readonly(self) -> bool:
        return self._wconn is None

    def check_writable(self) -> None:
        if self._wconn is None:
            raise StoreError(f"{self.filename}: store is open read-only")

    def check_open(self) -> None:
        if self._closed:
            raise StoreError(f"{self.filename}: store is closed")

    def claim(self) -> None:
        """This process becomes the store's one writer (storage.lock)."""
        if self._lock_key is not None:
            lock.claim(self._lock_key, self.filename)

    def close(self) -> None:
        if self._closed:
            return
        with self._wlock, self._rlock:
            self._closed = True
            self._rconn.close()
            if self._wal is not None:
                self._wal.stop()
            if self._wconn is not None:
                # Leave a self-contained file after writing. Only then: TRUNCATE
                # waits out an active writer, so a reader in another process
                # (`snapctl list` during a run) would stall for seconds on close.
                if self._wconn.total_changes:
                    try:
                        self._wconn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                    except sqlite3.Error:
                        pass
                self._wconn.close()
            if self._lock_key is not None:
                lock.detach(self._lock_key)      # after every connection is closed

    # --- transactions --------------------------------------------------------

    @contextmanager
    def read(self):
        """A read transaction on the read connection: one consistent snapshot
        for multi-statement reads even while another process prunes."""
        with self._rlock, sqlite_errors(self.filename):
            self.check_open()
            conn = self._rconn
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    def begin_write(self) -> sqlite3.Connection:
        """Take the write lock and begin a write transaction (BEGIN IMMEDIATE
        takes SQLite's write lock up front, so no upgrade deadlock later);
        returns the write connection.  Pair with :meth:`end_write`."""
        self.check_writable()
        self._wlock.acquire()
        try:
            with sqlite_errors(self.filename):
                self.check_open()
                self.claim()
                self._wal.wait_idle()
                self._wconn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._wlock.release()
            raise
        return self._wconn

    def commit(self, nbytes: int = 0) -> None:
        """COMMIT the write transaction (about ``nbytes`` stored)."""
        self._wconn.execute("COMMIT")
        self._wal_committed(nbytes)

    def _tree_key(self, conn) -> tuple:
        return conn.total_changes, conn.execute("PRAGMA data_version").fetchone()[0]

    def checked_parents(self, conn, load) -> dict:
        """id -> parent of every checkpoint, checked (``load``:
        storage.tree.parents, which reads and checks it), for a writer inside
        its write transaction on the write connection.
        Reading and checking the whole tree per checkpoint made every commit
        O(checkpoints) (0.2 ms a call at 300 checkpoints, ~1 ms at 1000); so the tree is
        kept from the last call and reused while nothing else changed the
        store since: no statement on this connection but the writer's own
        committed checkpoint (``total_changes``, which also counts rolled-back
        and maintenance statements) and no commit by any other connection or
        process (``PRAGMA data_version``).  Otherwise read and checked again."""
        key = self._tree_key(conn)
        if self._tree is not None and self._tree[0] == key:
            return self._tree[1]
        self._tree = None
        ps = load(conn)
        self._tree = (key, ps)
        return ps

    def committed_checkpoint(self, conn, ckpt: int, parent: int | None) -> None:
        """After the COMMIT of a checkpoint whose transaction began with
        :meth:`checked_parents`: the kept tree gains it."""
        if self._tree is not None:
            ps = self._tree[1]
            ps[ckpt] = parent
            self._tree = (self._tree_key(conn), ps)

    def rollback(self) -> None:
        """ROLLBACK, unless SQLite already did (a failed COMMIT can end the
        transaction itself)."""
        if self._wconn.in_transaction:
            self._wconn.execute("ROLLBACK")

    def end_write(self) -> None:
        """Release the write lock taken by :meth:`begin_write`."""
        self._wlock.release()

    @contextmanager
    def write(self):
        """A write transaction: committed when the block ends, rolled back
        when it raises."""
        conn = self.begin_write()
        try:
            with sqlite_errors(self.filename):
                try:
                    yield conn
                except BaseException:
                    self.rollback()
                    raise
                self.commit()
        finally:
            self.end_write()

    @contextmanager
    def exclusive(self):
        """The write connection outside any transaction (VACUUM), under the write lock."""
        self.check_writable()
        with self._wlock, sqlite_errors(self.filename):
            self.check_open()
            self.claim()
            yield self._wconn

    def wal_status(self) -> dict:
        """The background WAL copy's counters: copies started since the store was opened,
        commits since the last one, and whether the last copy was stopped short."""
        if self._wal is None:
            return {"copies_started": 0, "commits_since_copy": 0, "incomplete": False}
        return {"copies_started": self._wal.copies_started, "commits_since_copy": self._wal_commits,
                "incomplete": self._wal.incomplete}

    def _wal_committed(self, nbytes: int = 0) -> None:
        """After a COMMIT that stored about ``nbytes``: start the background
        copy of the WAL into the main file every WAL_CHECKPOINT_COMMITS
        commits, or once they stored WAL_CHECKPOINT_BYTES -- but after every
        commit while the last copy could not finish (a reader's snapshot
        held it back), and always with synchronous=NORMAL, where that copy
        is what makes commits durable."""
        self._wal_commits += 1
        self._wal_bytes += nbytes
        if self._wal_commits >= WAL_CHECKPOINT_COMMITS or self._wal_bytes >= WAL_CHECKPOINT_BYTES \
                or self._wal.incomplete or self.synchronous == "NORMAL":
            self._wal_commits = self._wal_bytes = 0
            self._wal.poke()


class WalCheckpointer(threading.Thread):
    """Copies committed WAL frames into the main file off the writer's path
    (PASSIVE: never blocks readers or the writer).  Its own connection, its
    own thread.

    SQLite only rewinds the WAL to its start when a write transaction begins
    after *every* frame has been copied back.  If the next checkpoint began
    while this copy was still running, the WAL would never rewind and grow
    without bound (it did: 67 GB under a continuous `snapctl run`).  So
    writers call ``wait_idle()`` before BEGIN: the copy of checkpoint N
    overlaps the guest running until checkpoint N+1, not N+1's write.  It is
    started every WAL_CHECKPOINT_COMMITS commits, or sooner once they stored
    WAL_CHECKPOINT_BYTES (one copy for many small checkpoints), so the WAL
    holds at most that many commits' frames plus one checkpoint's."""

    def __init__(self, path: str, synchronous: str) -> None:
        super().__init__(name="snapctl-wal-checkpoint", daemon=True)
        self._conn = schema.connect(path, readonly=False, synchronous=synchronous)
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._stopping = False
        self.incomplete = False     # the last copy left frames behind
        self.copies_started = 0     # pokes since the store was opened (wal_status)

    def poke(self) -> None:
        self.copies_started += 1
        self._idle.clear()
        self._wake.set()

    def copy(self) -> tuple:
        """One PASSIVE copy of the WAL into the main file: (busy, log frames, copied frames)."""
        return self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

    def wait_idle(self) -> None:
        if self.is_alive():
            self._idle.wait()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()

    def run(self) -> None:
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._stopping:
                    return
                try:
                    busy, log, copied = self.copy()
                    # a reader's snapshot can stop the copy short of the end
                    self.incomplete = bool(busy) or log != copied
                except (sqlite3.Error, TypeError, ValueError):
                    self.incomplete = True
                if not self._wake.is_set():
                    self._idle.set()
        finally:
            self._idle.set()
            self._conn.close()
