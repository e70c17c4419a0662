#!/usr/bin/env bash
# Time-travel a real program: when did a variable get its bad value? Read it
# before and after, open that moment in gdb, replay it, and continue from just
# before it. Needs gcc (static glibc) and gdb.
set -euo pipefail
WORK=$(mktemp -d)
export SNAPCTL_STORE=$WORK/prog.db
cd "$WORK"

# A program with a "bug": balance goes negative at some step.
cat > bank.c <<'C'
#include <stdio.h>
#include <unistd.h>
long balance = 100;
static void apply(long amount) { balance += amount; }
static void day(int d) {
    long amount = (d == 5) ? -250 : 20;
    apply(amount);
    char line[64];
    int n = snprintf(line, sizeof line, "day %d: balance %ld\n", d, balance);
    write(1, line, n);
}
int main(void) {
    for (int d = 0; d < 8; d++) day(d);
    return balance < 0;
}
C
gcc -static -g -O0 -o bank bank.c

# 1. Record: a checkpoint after every system call (here: each day's write).
snapctl run --program ./bank --every-syscalls 1 || true   # exits 1: the balance went negative

# 2. When did `balance` change? (virtual address from the ELF symbol table)
snapctl history balance

# 3. Find the first checkpoint where it is negative, and the one before.
BAD=""
for id in $(snapctl list --json | python3 -c 'import json,sys; print(" ".join(str(c["id"]) for c in json.load(sys.stdin)))'); do
    v=$(snapctl read "$id" balance 8 --format raw | python3 -c 'import sys; print(int.from_bytes(sys.stdin.buffer.read(), "little", signed=True))')
    if [ "$v" -lt 0 ]; then BAD=$id; break; fi
done
BEFORE=$(snapctl show "$BAD" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["parent"])')
echo "balance first negative at checkpoint $BAD (parent $BEFORE)"
snapctl read "$BEFORE" balance
snapctl read "$BAD" balance
echo "--- what the program had printed by then:"
snapctl output "$BAD"

# 4. Open that moment in gdb.
snapctl core "$BAD" bank.core
gdb -batch -ex bt -ex 'p balance' ./bank bank.core

# 5. Replay the step that broke it (with the recorded system-call results), then
#    continue the program from just before it: its further output follows.
snapctl replay "$BEFORE" --to "$BAD"
snapctl restore "$BEFORE" || true
