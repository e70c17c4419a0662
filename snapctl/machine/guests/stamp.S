/* stamp: each step n picks p = x mod P and stores n (u64) at the start of page p. */
.include "common.inc"
entry:
    PROLOGUE
step:
    inc rbx
    XORSHIFT
    PICK_PAGE r9
    mov [r10 + rdx], rbx
    END_STEP
