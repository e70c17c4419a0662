#!/bin/sh
# Writes store-v2.snap.gz (and store-v2.json, the facts a later version must
# still find in it) with the snapctl of this checkout.  Run from the repo
# root:  sh tests/storage_tests/data/make_store_fixture.sh
# It made the committed files before the store was split into modules
# (issue 15); they are kept as written then -- do not regenerate them
# unless the store format deliberately changes.
set -eu
D=tests/storage_tests/data
S=$(mktemp -d)/store.snap
snapctl() { python -m snapctl --store "$S" "$@"; }
snapctl run --guest stamp --mem 16M --seed 7 --checkpoints 4 --every-steps 3000 >/dev/null
snapctl tag 2 middle
snapctl restore 2 --checkpoints 2 --every-steps 2000 >/dev/null      # a branch: 5, 6 under 2
snapctl prune --keep-last 4 --yes --vacuum >/dev/null                # removes 1, 3 (2 is tagged)
snapctl verify >/dev/null
python - "$S" "$D/store-v2.json" <<'PY'
import hashlib, json, subprocess, sys
import numpy as np
store, out = sys.argv[1], sys.argv[2]
def cli(*a):
    return json.loads(subprocess.check_output([sys.executable, "-m", "snapctl", "--store", store, *a, "--json"]))
from storage import Store, SCHEMA_VERSION
def image_sha(st, ckpt):
    out = np.zeros(st.page_count * 4096, np.uint8)
    st.materialize(ckpt, out)
    return hashlib.sha256(out).hexdigest()
with Store.open(store, readonly=True) as st:
    facts = {"schema_version": SCHEMA_VERSION,
             "checkpoints": [{"id": c.id, "parent": c.parent, "tags": c.tags, "digest": c.digest,
                              "trigger": c.trigger, "step": c.step,
                              "states": {n: hashlib.sha256(st.state(c.id, n)).hexdigest()
                                         for n in st.state_names(c.id)},
                              "image_sha256": image_sha(st, c.id)} for c in st.checkpoints()],
             "show": {str(c.id): cli("show", str(c.id)) for c in st.checkpoints()}}
json.dump(facts, open(out, "w"), indent=1, sort_keys=True)
PY
gzip -9 -n -c "$S" >"$D/store-v2.snap.gz"
rm -rf "$(dirname "$S")"
