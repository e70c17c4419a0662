/* hotset: like stamp, but when (x >> 56) < param2 the page is x mod param1
 * (the hot set: the first param1 pages); otherwise x mod P. */
.include "common.inc"
entry:
    PROLOGUE
step:
    inc rbx
    XORSHIFT
    mov rcx, r9
    mov rax, r8
    shr rax, 56
    cmp rax, [rdi + MB_PARAM2]
    jae 1f
    mov rcx, [rdi + MB_PARAM1]
1:
    PICK_PAGE rcx
    mov [r10 + rdx], rbx
    END_STEP
