/*
 * KVM probe firmware, used by src/accelerator.rs (PROBE_FIRMWARE_CODE holds the assembled bytes).
 *
 * Loaded with -bios as a 64 KiB image: the reset vector at 0xfff0 jumps to offset 0, which builds
 * identity page tables, enters 64-bit long mode, sums 1..1000 and writes 0x2a to the isa-debug-exit
 * port 0xf4, so QEMU exits with status (0x2a << 1) | 1 = 85. Any other outcome (hang, assertion,
 * KVM internal error) means this host's KVM cannot run an ordinary 64-bit guest.
 *
 * Regenerate the bytes:
 *   as --64 -o probe.o probe-firmware.S && objcopy -O binary -j .text probe.o probe.bin
 *   head -c 190 probe.bin | xxd -i
 */
/* KVM probe firmware: real mode -> long mode -> write 0x2a to isa-debug-exit (port 0xf4). */
    .code16
    .org 0
start:
    cli
    xorw %ax, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    /* identity map the first 2 MiB: PML4 at 0x1000, PDPT at 0x2000, PD at 0x3000 */
    movl $0x2003, 0x1000
    movl $0, 0x1004
    movl $0x3003, 0x2000
    movl $0, 0x2004
    movl $0x83, 0x3000
    movl $0, 0x3004
    lgdtl %cs:(gdt_descriptor - start)
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl $0x1000, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax
    movl %eax, %cr0
    ljmpl $0x08, $(0xf0000 + long_mode - start)
    .code64
long_mode:
    /* do some real work in 64-bit mode: sum 1..1000 and check it */
    xorq %rax, %rax
    movq $1000, %rcx
1:  addq %rcx, %rax
    loop 1b
    cmpq $500500, %rax
    jne 2f
    movb $0x2a, %al
    outb %al, $0xf4
    /* QEMU >= 9 may let the vCPU run on after the write before it exits: stop here */
3:  hlt
    jmp 3b
2:  movb $0x01, %al
    outb %al, $0xf4
4:  hlt
    jmp 4b
    .align 8
gdt:
    .quad 0
    .quad 0x00209a0000000000
gdt_end:
gdt_descriptor:
    .word gdt_end - gdt - 1
    .long 0xf0000 + gdt - start
    .org 0xfff0
    .code16
reset:
    ljmp $0xf000, $(start - start)
    .org 0x10000
