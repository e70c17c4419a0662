"""Lazy restore: the guest runs while its memory is still being restored.

``load_machine(store, k, lazy=True)`` builds the VM as an eager restore does,
then, instead of materializing checkpoint k, registers guest RAM with
userfaultfd and starts :class:`storage.lazy.LazyImage` on it (the C fault
handler and the background fill, no GIL needed). Who serves which fault,
and why the dirty log stays exact, is in docs/architecture.md ("Lazy
restore").

* The system area (page tables, GDT, code, mailboxes, stacks: 512 pages) is
  populated before the vCPUs start: every vCPU needs it at once, and the
  VMM's own Python code reads and writes the mailboxes, so a damaged page
  there is an error before anything runs.
* When the background fill is done, the watcher unregisters guest RAM: from
  then on it is plain anonymous memory.
* When a page fails its checks, the watcher stops the machine
  (``Machine.fail``) with the page's ``CorruptionError``.
"""

from __future__ import annotations

from storage.lazy import LazyImage, LazyUnavailable, probe

from ..machine import layout as L

__all__ = ["LazyUnavailable", "probe", "serve_lazily"]


def serve_lazily(store, ckpt: int, machine, *, background: bool = True, system_first: bool = True,
                 index=None) -> LazyImage:
    """Serve checkpoint ``ckpt`` into ``machine``'s (untouched) guest RAM from now on.
    ``background=False``: no background fill; ``system_first=False``: the system area
    lazily too -- every page then comes from a fault, page tables included (tests);
    ``index``: the checkpoint's ``store.page_index``, if already read."""
    mem = machine.memory

    def on_event(lz: LazyImage) -> None:
        err = lz.error()
        if err is not None:
            machine.fail(err)
        else:
            lz.finish()

    lz = LazyImage(store, ckpt, mem.host_addr, mem.npages,
                   eager=(0, L.SYSTEM_SIZE // L.PAGE if system_first else 0), on_event=on_event,
                   index=index)
    mem.close_hooks.append(lz.close)
    machine.lazy = lz
    lz.start(background)
    return lz
