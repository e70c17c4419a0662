/* sparse: each step stores the low 32 bits of n at dword ((x >> 32) & 1023) of
 * page p = x mod P: a few bytes change per written page. */
.include "common.inc"
entry:
    PROLOGUE
step:
    inc rbx
    XORSHIFT
    PICK_PAGE r9
    mov rax, r8
    shr rax, 32
    and eax, 1023
    shl eax, 2
    add rdx, rax
    mov [r10 + rdx], ebx
    END_STEP
