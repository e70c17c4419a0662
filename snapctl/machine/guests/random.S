/* random: each step writes x (u64) into a uniformly random page p = x mod P,
 * at qword ((x >> 32) & 511) of that page. */
.include "common.inc"
entry:
    PROLOGUE
step:
    inc rbx
    XORSHIFT
    PICK_PAGE r9
    mov rax, r8
    shr rax, 32
    and eax, 511
    shl eax, 3
    add rdx, rax
    mov [r10 + rdx], r8
    END_STEP
