/* sweep: step n writes n (u64) at the start of page (n-1) mod P: sequential passes. */
.include "common.inc"
entry:
    PROLOGUE
step:
    inc rbx
    mov rax, r12
    shl rax, 12
    mov [r10 + rax], rbx
    inc r12
    cmp r12, r9
    jb 1f
    xor r12d, r12d
1:
    END_STEP
