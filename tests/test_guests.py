"""The shipped guest machine code is exactly what its readable source assembles to."""

from __future__ import annotations

import shutil

import pytest

from snapctl.machine.guests import GUESTS, build


def test_every_guest_has_source_and_binary():
    srcs = {p.stem for p in build.sources()}
    assert srcs == set(GUESTS), f"guests without source or registry entry: {srcs ^ set(GUESTS)}"
    for g in GUESTS.values():
        assert len(g.code()) > 0


@pytest.mark.skipif(shutil.which("as") is None, reason="GNU as is not installed (apt-get install binutils)")
@pytest.mark.parametrize("name", sorted(GUESTS))
def test_shipped_bytes_match_source(name):
    src = next(p for p in build.sources() if p.stem == name)
    assert GUESTS[name].code() == build.assemble(src), (
        f"{name}.bin is stale: run `python -m snapctl.machine.guests.build`")
