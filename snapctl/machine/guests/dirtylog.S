/* dirtylog: the kernel selftest dirty_log_test's guest. Each step stores the
 * round number the VMM keeps in mailbox.round (u64) at the start of page
 * p = x mod P. The round is read fresh every step. */
.include "common.inc"
entry:
    PROLOGUE
step:
    inc rbx
    XORSHIFT
    PICK_PAGE r9
    mov rax, [rdi + MB_ROUND]
    mov [r10 + rdx], rax
    END_STEP
