/* LD_PRELOAD library that makes this process see an AVX2-only x86 CPU (no AVX-512, no VNNI of any width,
 * no AVX-512/AMX BF16 or INT8): CPUID is made to fault (Linux ARCH_SET_CPUID, needs the `cpuid_fault` CPU flag)
 * and the SIGSEGV handler answers it with the real values minus those feature bits. Every library that asks
 * CPUID (oneDNN inside OpenVINO and PyTorch, MKL, ONNX Runtime's MLAS, FBGEMM) then dispatches its AVX2 kernels.
 * Build: gcc -O2 -shared -fPIC -o /tmp/cpuid_avx2.so bench/cpuid_avx2.c   (bench/bench_int8_isa.py does it) */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

static void on_segv(int sig, siginfo_t *info, void *context) {
    ucontext_t *uc = (ucontext_t *)context;
    greg_t *r = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)r[REG_RIP];
    (void)info;
    if (ip[0] != 0x0f || ip[1] != 0xa2) { /* a real fault: die as usual */
        signal(sig, SIG_DFL);
        return;
    }
    unsigned leaf = (unsigned)r[REG_RAX], sub = (unsigned)r[REG_RCX], a, b, c, d;
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
    __cpuid_count(leaf, sub, a, b, c, d);
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
    if (leaf == 7 && sub == 0) {
        b &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31));
        c &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14)); /* vbmi, vbmi2, vnni, bitalg, vpopcntdq */
        d &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25)); /* amx, fp16 */
    } else if (leaf == 7 && sub == 1) {
        a &= ~((1u << 4) | (1u << 5) | (1u << 21) | (1u << 23)); /* avx_vnni, avx512_bf16, amx_fp16, avx_ifma */
        d &= ~((1u << 4) | (1u << 5) | (1u << 10) | (1u << 19)); /* avx_vnni_int8, avx_ne_convert, vnni_int16, avx10 */
    } else if (leaf == 0xd && sub == 0) {
        a &= ~((1u << 5) | (1u << 6) | (1u << 7) | (1u << 17) | (1u << 18)); /* opmask/zmm and tile state */
    }
    r[REG_RAX] = a, r[REG_RBX] = b, r[REG_RCX] = c, r[REG_RDX] = d;
    r[REG_RIP] += 2;
}

__attribute__((constructor)) static void start(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_segv;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGSEGV, &action, 0);
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
}
