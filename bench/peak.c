/* One core's single-precision FMA peak in GFLOP/s: twelve independent chains (enough to hide
 * the FMA latency on two FMA pipes), 8 floats each (one AVX register; two SSE ones without). */
#include <stdio.h>
#include <time.h>

typedef float v8 __attribute__((vector_size(32)));

int main(void) {
    v8 x, y;
    for (int i = 0; i < 8; ++i) { x[i] = 0.999f; y[i] = 1e-4f; }
    v8 a0 = x, a1 = x, a2 = x, a3 = x, a4 = x, a5 = x, a6 = x, a7 = x, a8 = x, a9 = x, a10 = x, a11 = x;
    const long n = 50000000;
    struct timespec t0, t1;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
    for (long i = 0; i < n; ++i) {
        a0 = a0 * x + y; a1 = a1 * x + y; a2 = a2 * x + y; a3 = a3 * x + y;
        a4 = a4 * x + y; a5 = a5 * x + y; a6 = a6 * x + y; a7 = a7 * x + y;
        a8 = a8 * x + y; a9 = a9 * x + y; a10 = a10 * x + y; a11 = a11 * x + y;
        /* the chains stay in registers and are not folded away */
        __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4), "+x"(a5),
                         "+x"(a6), "+x"(a7), "+x"(a8), "+x"(a9), "+x"(a10), "+x"(a11));
    }
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1);
    const double seconds = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
    const v8 sum = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11;
    printf("%.2f\n", n * 12.0 * 8 * 2 / seconds / 1e9 + 0 * sum[0]);
    return 0;
}
