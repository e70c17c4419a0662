/* idle: writes no data page. A step is a short spin (param1 iterations, 1000 if 0);
 * only the mailbox step counter changes, and it still yields every K steps. */
.include "common.inc"
entry:
    PROLOGUE
    mov r12, [rdi + MB_PARAM1]
    test r12, r12
    jnz step
    mov r12d, 1000
step:
    inc rbx
    mov rcx, r12
1:
    dec rcx
    jnz 1b
    END_STEP
