/* fill: each step picks p = x mod P, then fills the whole page with the next
 * 512 xorshift values (u64 each). */
.include "common.inc"
entry:
    PROLOGUE
step:
    inc rbx
    XORSHIFT
    PICK_PAGE r9
    lea rsi, [r10 + rdx]
    mov ecx, 512
1:
    XORSHIFT
    mov [rsi], r8
    add rsi, 8
    dec ecx
    jnz 1b
    END_STEP
