#!/usr/bin/env bash
# Time-travel debugging walkthrough: find when a guest address changed, look
# at it before and after, restore just before the change and replay it.
set -euo pipefail
export SNAPCTL_STORE=${SNAPCTL_STORE:-$(mktemp -d)/tt.db}

# 1. Record: the stamp guest, a sync checkpoint every 20000 steps.
snapctl run --guest stamp --mem 16M --checkpoints 8 --every-steps 20000

# 2. Pick an address and ask when its page changed.
ADDR=0x2a3000
snapctl history "$ADDR"
CHANGED=$(snapctl history "$ADDR" --json | python3 -c 'import json,sys; c=json.load(sys.stdin)["checkpoints"]; print(c[-1] if c else "")')
if [ -z "$CHANGED" ]; then echo "page never changed; pick another ADDR"; exit 0; fi
BEFORE=$(snapctl show "$CHANGED" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["parent"])')
echo "page at $ADDR last changed in checkpoint $CHANGED (parent $BEFORE)"

# 3. Look at it before and after.
snapctl read "$BEFORE" "$ADDR" 16
snapctl read "$CHANGED" "$ADDR" 16

# 4. Go back to just before the change, name it, and check the run is deterministic.
snapctl tag "$BEFORE" before-change
snapctl replay before-change --to "$CHANGED"

# 5. Branch from there and step forward in small increments.
snapctl restore before-change --steps 5000
snapctl list
