/* The native engine's kernel: one (bidirectional) GRU or LSTM layer over a right-padded
 * batch, each sequence over its own length only (the backward direction starts at its last
 * real step), and the matrix product it is built on. Called through ctypes
 * (app/engine/native_engine.py), so it needs no Python headers and runs without the GIL.
 *
 * One direction of a layer, in the spec's equations (app/spec.py):
 *   X = x @ kernel + input_bias            all steps of a sequence in one product
 *   for each step t: M = h @ recurrent_kernel + recurrent_bias, then the cell:
 *     GRU, reset_after:   z = f(X_z + M_z); r = f(X_r + M_r); hh = g(X_h + r * M_h)
 *     GRU, reset before:  z, r as above;    hh = g(X_h + (r * h) @ recurrent_h + b_h)
 *                         h = z * h + (1 - z) * hh
 *     LSTM:  i = f(X_i + M_i); fg = f(X_f + M_f); o = f(X_o + M_o)
 *            c = fg * c + i * g(X_c + M_c);  h = o * g(c)
 *
 * Matrices multiplied on the right are packed once (pack_columns): blocks of 16 columns,
 * each block's rows contiguous, so a kernel streams one block while its accumulators stay in
 * registers. Rows are multiplied six or four at a time (6 x 16, 4 x 16) or one at a time
 * (1 x 64); where the CPU has AVX-512, with 16-float registers two blocks at a time (6 x 32,
 * 4 x 32) and one row by 128 columns. The hot functions are compiled for AVX-512, AVX2 + FMA
 * and the baseline, and the CPU picks at load time (GCC target_clones); the weights are packed
 * on 64-byte boundaries (native_engine.py), so that no 16-float load spans two cache lines.
 * sigmoid and tanh use a vectorisable exponential (Cephes' expf polynomial, about 1 ulp); the
 * rarer activations call libm.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BLOCK 16

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DISPATCH __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define WIDE_TARGET __attribute__((target("arch=x86-64-v4"), noinline))
#define WIDE_INLINE static inline __attribute__((target("arch=x86-64-v4"), always_inline))
#else
#define DISPATCH
#define WIDE_TARGET __attribute__((noinline))
#define WIDE_INLINE static inline __attribute__((always_inline))
#endif
#define INLINE static inline __attribute__((always_inline))

enum cell { GRU_RESET_AFTER = 0, GRU_RESET_BEFORE = 1, LSTM = 2 };
enum activation { LINEAR = 0, SIGMOID, HARD_SIGMOID, TANH, RELU, SOFTSIGN, SOFTPLUS, ELU };

typedef struct {
    int cell, f, g;
    int units, inputs, batch, steps, directions, threads;
    const int32_t *lengths;          /* (batch,) */
    const float *x;                  /* (batch, steps, inputs) */
    const float *kernel[2];          /* packed (inputs, gates * units) */
    const float *input_bias[2];      /* (gates * units,) */
    const float *recurrent[2];       /* packed (units, gates * units); GRU reset before: (units, 2 units) */
    const float *recurrent_h[2];     /* GRU reset before: packed (units, units); else NULL */
    const float *recurrent_bias[2];  /* (gates * units,) */
    float *out;                      /* (batch, steps, directions * units) */
    float *work;                     /* layer_work_floats() floats */
} layer_args;

int64_t packed_floats(int k, int n) { return (int64_t)((n + BLOCK - 1) / BLOCK) * BLOCK * k; }

void pack_columns(const float *b, int k, int n, float *packed) {
    for (int j0 = 0; j0 < n; j0 += BLOCK)
        for (int p = 0; p < k; ++p)
            for (int q = 0; q < BLOCK; ++q)
                *packed++ = j0 + q < n ? b[(int64_t)p * n + j0 + q] : 0.0f;
}

static int gates_of(int cell) { return cell == LSTM ? 4 : 3; }

/* Scratch of one direction: its projected inputs, then h, c, the step's products, two
 * temporaries of a row, and the order of the rows. */
static int64_t direction_floats(const layer_args *a) {
    int64_t gu = (int64_t)gates_of(a->cell) * a->units;
    return (int64_t)a->batch * a->steps * gu + (int64_t)a->batch * (gu + 3 * a->units)
           + 4 * (int64_t)a->units + a->batch;
}

int64_t layer_work_floats(const layer_args *a) { return a->directions * direction_floats(a); }

/* ---- matrix product: c[m, n] = a[m, k] @ b + bias, b packed ---- */

/* Eight floats: GCC's vector extension, one AVX register (two SSE ones on the baseline);
 * aligned(4) lets it load from any float. Accumulators are named variables, so they stay in
 * registers (arrays of them were spilled to the stack). */
typedef float v8 __attribute__((vector_size(32), aligned(4)));
#define AT(p) (*(const v8 *)(p))
#define SPLAT(x) ((v8){(x), (x), (x), (x), (x), (x), (x), (x)})

INLINE void store8(float *c, v8 v, int width) {
    if (width >= 8) {
        *(v8 *)c = v;
    } else {
        for (int q = 0; q < width; ++q) c[q] = v[q];
    }
}

/* Six (or four) rows by one block of 16 columns: twelve accumulators, the most that leave
 * AVX2 registers for the block's two vectors and a broadcast. ``rows`` is a constant at each
 * call, so the compiler drops the last two rows' work from the four-row copy. */
INLINE void rows_block(const float *a, int64_t lda, const float *block, int k, const float *bias0,
                       float *c, int64_t ldc, int width, const int rows) {
    v8 c00 = AT(bias0), c01 = AT(bias0 + 8), c10 = c00, c11 = c01, c20 = c00, c21 = c01;
    v8 c30 = c00, c31 = c01, c40 = c00, c41 = c01, c50 = c00, c51 = c01;
    const float *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda;
    const float *a4 = a + 4 * lda, *a5 = a + 5 * lda;
    for (int p = 0; p < k; ++p) {
        const v8 b0 = AT(block + (int64_t)p * BLOCK), b1 = AT(block + (int64_t)p * BLOCK + 8);
        v8 x = SPLAT(a0[p]);
        c00 += x * b0; c01 += x * b1;
        x = SPLAT(a1[p]);
        c10 += x * b0; c11 += x * b1;
        x = SPLAT(a2[p]);
        c20 += x * b0; c21 += x * b1;
        x = SPLAT(a3[p]);
        c30 += x * b0; c31 += x * b1;
        if (rows == 6) {
            x = SPLAT(a4[p]);
            c40 += x * b0; c41 += x * b1;
            x = SPLAT(a5[p]);
            c50 += x * b0; c51 += x * b1;
        }
    }
    const v8 out[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
    for (int r = 0; r < rows; ++r) {
        store8(c + r * ldc, out[r][0], width);
        store8(c + r * ldc + 8, out[r][1], width - 8);
    }
}

/* One row by four blocks (64 columns): eight chains of FMAs, enough to hide their latency. */
INLINE void row64(const float *a, const float *block, int k, const float *bias0, float *c,
                  int width) {
    v8 c0 = AT(bias0), c1 = AT(bias0 + 8), c2 = AT(bias0 + 16), c3 = AT(bias0 + 24);
    v8 c4 = AT(bias0 + 32), c5 = AT(bias0 + 40), c6 = AT(bias0 + 48), c7 = AT(bias0 + 56);
    const int64_t stride = (int64_t)k * BLOCK;
    const float *b0 = block, *b1 = block + stride, *b2 = block + 2 * stride, *b3 = block + 3 * stride;
    for (int p = 0; p < k; ++p) {
        const v8 x = SPLAT(a[p]);
        const int64_t o = (int64_t)p * BLOCK;
        c0 += x * AT(b0 + o); c1 += x * AT(b0 + o + 8);
        c2 += x * AT(b1 + o); c3 += x * AT(b1 + o + 8);
        c4 += x * AT(b2 + o); c5 += x * AT(b2 + o + 8);
        c6 += x * AT(b3 + o); c7 += x * AT(b3 + o + 8);
    }
    const v8 out[8] = {c0, c1, c2, c3, c4, c5, c6, c7};
    for (int i = 0; i < 8; ++i) store8(c + 8 * i, out[i], width - 8 * i);
}

/* One row by one block (the last, narrow blocks). One chain per accumulator, as in the
 * other kernels: every row's sums run in the same order, so a sequence gets the same bits
 * whichever kernel its row falls to (batched == alone, exactly). */
INLINE void row16(const float *a, const float *block, int k, const float *bias0, float *c,
                  int width) {
    v8 c0 = AT(bias0), c1 = AT(bias0 + 8);
    for (int p = 0; p < k; ++p) {
        const v8 x = SPLAT(a[p]);
        c0 += x * AT(block + (int64_t)p * BLOCK);
        c1 += x * AT(block + (int64_t)p * BLOCK + 8);
    }
    store8(c, c0, width);
    store8(c + 8, c1, width - 8);
}

/* ---- AVX-512's kernels: sixteen floats a register, 32 registers ----
 * Compiled for AVX-512 alone (other targets would split each vector through memory) and
 * called only where the CPU has it: six (or four) rows by two blocks, twelve accumulators;
 * one row by eight blocks, eight. Each column's sum runs in the same order as in the kernels
 * above, so every kernel gives a row the same bits. */

typedef float v16 __attribute__((vector_size(64), aligned(4)));
#define AT16(p) (*(const v16 *)(p))
#define SPLAT16(x) ((v16){(x), (x), (x), (x), (x), (x), (x), (x), (x), (x), (x), (x), (x), (x), (x), (x)})

static int wide;  /* whether the CPU runs these kernels: target_clones picks its AVX-512 copies */
__attribute__((constructor)) static void detect_width(void) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    wide = __builtin_cpu_supports("x86-64-v4") != 0;
#endif
}

WIDE_INLINE void store16(float *c, v16 v, int width) {
    if (width >= 16) {
        *(v16 *)c = v;
    } else {
        for (int q = 0; q < width; ++q) c[q] = v[q];
    }
}

/* ``rows`` (6 or 4) rows by the two blocks at ``block`` and ``block + stride``. */
WIDE_TARGET static void rows_pair(const float *a, int64_t lda, const float *block, int64_t stride,
                                  int k, const float *bias0, float *c, int64_t ldc, int width,
                                  int rows) {
    v16 c00 = AT16(bias0), c10 = c00, c20 = c00, c30 = c00, c40 = c00, c50 = c00;
    v16 c01 = AT16(bias0 + 16), c11 = c01, c21 = c01, c31 = c01, c41 = c01, c51 = c01;
    const float *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda;
    const float *a4 = a + 4 * lda, *a5 = a + 5 * lda;
    if (rows == 4) a4 = a5 = a0;  /* computed, not stored */
    for (int p = 0; p < k; ++p) {
        const v16 b0 = AT16(block + (int64_t)p * BLOCK), b1 = AT16(block + stride + (int64_t)p * BLOCK);
        v16 x = SPLAT16(a0[p]);
        c00 += x * b0; c01 += x * b1;
        x = SPLAT16(a1[p]);
        c10 += x * b0; c11 += x * b1;
        x = SPLAT16(a2[p]);
        c20 += x * b0; c21 += x * b1;
        x = SPLAT16(a3[p]);
        c30 += x * b0; c31 += x * b1;
        x = SPLAT16(a4[p]);
        c40 += x * b0; c41 += x * b1;
        x = SPLAT16(a5[p]);
        c50 += x * b0; c51 += x * b1;
    }
    const v16 out[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
    for (int r = 0; r < rows; ++r) {
        store16(c + r * ldc, out[r][0], width);
        store16(c + r * ldc + 16, out[r][1], width - 16);
    }
}

/* One row by the eight blocks from ``block`` (128 columns). */
WIDE_TARGET static void row128(const float *a, const float *block, int k, const float *bias0,
                               float *c, int width) {
    v16 c0 = AT16(bias0), c1 = AT16(bias0 + 16), c2 = AT16(bias0 + 32), c3 = AT16(bias0 + 48);
    v16 c4 = AT16(bias0 + 64), c5 = AT16(bias0 + 80), c6 = AT16(bias0 + 96), c7 = AT16(bias0 + 112);
    const int64_t stride = (int64_t)k * BLOCK;
    for (int p = 0; p < k; ++p) {
        const v16 x = SPLAT16(a[p]);
        const float *b = block + (int64_t)p * BLOCK;
        c0 += x * AT16(b); c1 += x * AT16(b + stride);
        c2 += x * AT16(b + 2 * stride); c3 += x * AT16(b + 3 * stride);
        c4 += x * AT16(b + 4 * stride); c5 += x * AT16(b + 5 * stride);
        c6 += x * AT16(b + 6 * stride); c7 += x * AT16(b + 7 * stride);
    }
    const v16 out[8] = {c0, c1, c2, c3, c4, c5, c6, c7};
    for (int i = 0; i < 8; ++i) store16(c + 16 * i, out[i], width - 16 * i);
}

/* The bias of columns j0..j0+count*BLOCK (zeros past n), so that no kernel reads past it. */
INLINE int bias_blocks(const float *bias, int j0, int count, int n, float *out) {
    const int width = n - j0 < count * BLOCK ? n - j0 : count * BLOCK;
    for (int q = 0; q < count * BLOCK; ++q) out[q] = bias && q < width ? bias[j0 + q] : 0.0f;
    return width;
}

/* Six (then four) rows at a time, a block (or, on AVX-512, two) at a time: the blocks stay
 * in L1 while the rows stream; then each remaining row 64 (or 128) columns at a time. */
INLINE void product(const float *a, int64_t lda, int m, const float *packed, int k, int n,
                    const float *bias, float *c, int64_t ldc) {
    const int blocks = (n + BLOCK - 1) / BLOCK, sixes = m / 6 * 6;
    const int whole = sixes + (m - sixes >= 4 ? 4 : 0);
    const int64_t stride = (int64_t)BLOCK * k;
    float biases[8 * BLOCK];
    for (int j = 0; j < blocks && whole > 0; ) {
        const int pair = wide && j + 2 <= blocks;
        const int width = bias_blocks(bias, j * BLOCK, pair ? 2 : 1, n, biases);
        const float *block = packed + j * stride;
        for (int r = 0; r < whole; r += 6) {
            const int rows = r < sixes ? 6 : 4;
            float *cr = c + r * ldc + j * BLOCK;
            if (pair)
                rows_pair(a + r * lda, lda, block, stride, k, biases, cr, ldc, width, rows);
            else if (rows == 6)
                rows_block(a + r * lda, lda, block, k, biases, cr, ldc, width, 6);
            else
                rows_block(a + r * lda, lda, block, k, biases, cr, ldc, width, 4);
        }
        j += pair ? 2 : 1;
    }
    for (int j = 0; j < blocks && whole < m; ) {
        const int group = wide && j + 8 <= blocks ? 8 : j + 4 <= blocks ? 4 : 1;
        const int width = bias_blocks(bias, j * BLOCK, group, n, biases);
        for (int r = whole; r < m; ++r) {
            const float *ar = a + r * lda, *block = packed + j * stride;
            float *cr = c + r * ldc + j * BLOCK;
            if (group == 8)
                row128(ar, block, k, biases, cr, width);
            else if (group == 4)
                row64(ar, block, k, biases, cr, width);
            else
                row16(ar, block, k, biases, cr, width);
        }
        j += group;
    }
}

DISPATCH void matmul(const float *a, int m, const float *packed, int k, int n, const float *bias,
                     float *c) {
    product(a, k, m, packed, k, n, bias, c, n);
}

/* ---- activations, in place over n floats ---- */

INLINE float exp_poly(float x) {
    x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;  /* 2^n stays a normal float */
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    x = x - n * 0.693359375f + n * 2.12194440e-4f;
    const float z = x * x;
    float y = 1.9875691500e-4f;
    y = y * x + 1.3981999507e-3f;
    y = y * x + 8.3334519073e-3f;
    y = y * x + 4.1665795894e-2f;
    y = y * x + 1.6666665459e-1f;
    y = y * x + 5.0000001201e-1f;
    y = y * z + x + 1.0f;
    union { int32_t i; float f; } scale = { .i = ((int32_t)n + 127) << 23 };
    return y * scale.f;
}

INLINE void activate(int kind, float *v, int n) {
    switch (kind) {
    case SIGMOID:
        for (int i = 0; i < n; ++i) v[i] = 1.0f / (1.0f + exp_poly(-v[i]));
        break;
    case HARD_SIGMOID:
        for (int i = 0; i < n; ++i) {
            const float y = 0.2f * v[i] + 0.5f;
            v[i] = y < 0.0f ? 0.0f : y > 1.0f ? 1.0f : y;
        }
        break;
    case TANH:
        for (int i = 0; i < n; ++i) v[i] = 1.0f - 2.0f / (exp_poly(2.0f * v[i]) + 1.0f);
        break;
    case RELU:
        for (int i = 0; i < n; ++i) v[i] = v[i] > 0.0f ? v[i] : 0.0f;
        break;
    case SOFTSIGN:
        for (int i = 0; i < n; ++i) v[i] = v[i] / (1.0f + fabsf(v[i]));
        break;
    case SOFTPLUS:
        for (int i = 0; i < n; ++i)
            v[i] = v[i] > 0 ? v[i] + log1pf(expf(-v[i])) : log1pf(expf(v[i]));
        break;
    case ELU:
        for (int i = 0; i < n; ++i) v[i] = v[i] > 0 ? v[i] : expm1f(v[i]);
        break;
    default:
        break;
    }
}

/* ---- one step of one row: the cell's equations ---- */

INLINE void add(float *dst, const float *a, const float *b, int n) {
    for (int i = 0; i < n; ++i) dst[i] = a[i] + b[i];
}

/* x: the row's projected inputs; m: its recurrent product; h (and c) updated in place. */
INLINE void gru_after(const layer_args *a, const float *x, const float *m, float *h, float *t) {
    const int u = a->units;
    float *zr = t, *hh = t + 2 * u;
    add(zr, x, m, 2 * u);
    activate(a->f, zr, 2 * u);
    for (int i = 0; i < u; ++i) hh[i] = x[2 * u + i] + zr[u + i] * m[2 * u + i];
    activate(a->g, hh, u);
    for (int i = 0; i < u; ++i) h[i] = zr[i] * h[i] + (1.0f - zr[i]) * hh[i];
}

INLINE void lstm(const layer_args *a, const float *x, const float *m, float *h, float *c, float *t) {
    const int u = a->units;
    add(t, x, m, 4 * u);
    activate(a->f, t, 2 * u);          /* i, f */
    activate(a->g, t + 2 * u, u);      /* c candidate */
    activate(a->f, t + 3 * u, u);      /* o */
    for (int i = 0; i < u; ++i) c[i] = t[u + i] * c[i] + t[i] * t[2 * u + i];
    for (int i = 0; i < u; ++i) t[2 * u + i] = c[i];
    activate(a->g, t + 2 * u, u);
    for (int i = 0; i < u; ++i) h[i] = t[3 * u + i] * t[2 * u + i];
}

/* ---- one direction over the whole batch ---- */

DISPATCH void run_direction(const layer_args *a, int d) {
    const int u = a->units, gu = gates_of(a->cell) * u, n_in = a->inputs;
    const int batch = a->batch, steps = a->steps, width = a->directions * u;
    float *proj = a->work + d * direction_floats(a);
    float *h = proj + (int64_t)batch * steps * gu, *c = h + (int64_t)batch * u;
    float *m = c + (int64_t)batch * u, *rh = m + (int64_t)batch * gu;
    float *t = rh + (int64_t)batch * u;
    int *order = (int *)(t + 4 * u);
    const int reverse = d == 1;

    /* Each sequence's own steps through the input kernel, in one product per sequence. */
    for (int b = 0; b < batch; ++b)
        product(a->x + (int64_t)b * steps * n_in, n_in, a->lengths[b], a->kernel[d], n_in, gu,
                a->input_bias[d], proj + (int64_t)b * steps * gu, gu);
    /* Rows by length, longest first: the rows still running at step s are a prefix. */
    for (int b = 0; b < batch; ++b) {
        int i = b;
        for (; i > 0 && a->lengths[order[i - 1]] < a->lengths[b]; --i) order[i] = order[i - 1];
        order[i] = b;
    }
    memset(h, 0, sizeof(float) * batch * u);
    memset(c, 0, sizeof(float) * batch * u);
    int running = batch;
    for (int s = 0; s < steps; ++s) {
        while (running > 0 && a->lengths[order[running - 1]] <= s) --running;
        if (running == 0) break;
        if (a->cell == GRU_RESET_BEFORE)
            product(h, u, running, a->recurrent[d], u, 2 * u, a->recurrent_bias[d], m, gu);
        else
            product(h, u, running, a->recurrent[d], u, gu, a->recurrent_bias[d], m, gu);
        for (int i = 0; i < running; ++i) {
            const int b = order[i], len = a->lengths[b], step = reverse ? len - 1 - s : s;
            const float *x = proj + ((int64_t)b * steps + step) * gu;
            float *hi = h + (int64_t)i * u, *mi = m + (int64_t)i * gu;
            if (a->cell == LSTM) {
                lstm(a, x, mi, hi, c + (int64_t)i * u, t);
            } else if (a->cell == GRU_RESET_AFTER) {
                gru_after(a, x, mi, hi, t);
            } else {
                add(t, x, mi, 2 * u);
                activate(a->f, t, 2 * u);
                for (int k = 0; k < u; ++k) rh[k] = t[u + k] * hi[k];
                product(rh, u, 1, a->recurrent_h[d], u, u, a->recurrent_bias[d] + 2 * u, mi + 2 * u, gu);
                for (int k = 0; k < u; ++k) t[2 * u + k] = x[2 * u + k] + mi[2 * u + k];
                activate(a->g, t + 2 * u, u);
                for (int k = 0; k < u; ++k) hi[k] = t[k] * hi[k] + (1.0f - t[k]) * t[2 * u + k];
            }
            memcpy(a->out + ((int64_t)b * steps + step) * width + d * u, hi, sizeof(float) * u);
        }
    }
    /* Steps past a sequence's length hold zeros, as ONNX's sequence_lens leaves them. */
    for (int b = 0; b < batch; ++b)
        for (int s = a->lengths[b]; s < steps; ++s)
            memset(a->out + ((int64_t)b * steps + s) * width + d * u, 0, sizeof(float) * u);
}

/* ---- the second direction on a partner thread ----
 * One thread, started on first use and kept: handing it a direction costs a wake-up, far less
 * than creating a thread per layer. It serves one call at a time; a call that finds it busy
 * runs both directions itself. Each side spins a while before it sleeps: waking a sleeping
 * thread on a virtual machine costs as much as a short direction, and the next layer's
 * direction comes within microseconds of the last one's end (docs/benchmark.md). A direction
 * the partner has not claimed by the time the caller's own is done is taken back: on a
 * virtual machine whose cores sat idle, its wake-up can take longer than that (the caller
 * then asks for no partner on short calls: native_engine.py). */

#define SPIN_NS 150000

static pthread_mutex_t partner_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t partner_wake = PTHREAD_COND_INITIALIZER, partner_done = PTHREAD_COND_INITIALIZER;
static const layer_args *partner_job;  /* offered, not yet claimed (by the partner or back) */
static int partner_started, partner_busy, partner_finished;

static int64_t monotonic_ns(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
}

INLINE void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* The offered job, taken: by the partner, or back by the caller (NULL: nothing offered). */
static const layer_args *claim_job(void) {
    return __atomic_exchange_n(&partner_job, NULL, __ATOMIC_ACQ_REL);
}

/* The job claimed by the partner, once one comes within SPIN_NS; else NULL. */
static const layer_args *spin_for_job(void) {
    const int64_t until = monotonic_ns() + SPIN_NS;
    for (unsigned i = 1;; ++i) {
        if (__atomic_load_n(&partner_job, __ATOMIC_ACQUIRE) != NULL) {
            const layer_args *a = claim_job();
            if (a != NULL) return a;
        }
        if (i % 64 == 0 && monotonic_ns() > until) return NULL;
        relax();
    }
}

static void *partner_loop(void *unused) {
    (void)unused;
    for (;;) {
        const layer_args *a = spin_for_job();
        if (a == NULL) {
            pthread_mutex_lock(&partner_lock);
            while (__atomic_load_n(&partner_job, __ATOMIC_ACQUIRE) == NULL)
                pthread_cond_wait(&partner_wake, &partner_lock);
            pthread_mutex_unlock(&partner_lock);
            a = claim_job();
            if (a == NULL) continue;  /* taken back while we woke: spin for the next layer's */
        }
        run_direction(a, 1);
        pthread_mutex_lock(&partner_lock);
        __atomic_store_n(&partner_finished, 1, __ATOMIC_RELEASE);
        pthread_cond_signal(&partner_done);
        pthread_mutex_unlock(&partner_lock);
    }
    return NULL;
}

/* A forked child has no partner thread: it starts its own on first use. */
static void partner_forget(void) {
    pthread_mutex_init(&partner_lock, NULL);
    pthread_cond_init(&partner_wake, NULL);
    pthread_cond_init(&partner_done, NULL);
    partner_job = NULL;
    partner_started = partner_busy = partner_finished = 0;
}

/* Hands the partner ``a``'s backward direction; 0 when it is busy or cannot start. */
static int partner_take(const layer_args *a) {
    pthread_mutex_lock(&partner_lock);
    int taken = 0;
    if (!partner_busy) {
        if (!partner_started) {
            pthread_t thread;
            partner_started = pthread_create(&thread, NULL, partner_loop, NULL) == 0;
            if (partner_started) {
                pthread_detach(thread);
                pthread_atfork(NULL, NULL, partner_forget);
            }
        }
        if (partner_started) {
            partner_busy = taken = 1;
            __atomic_store_n(&partner_finished, 0, __ATOMIC_RELAXED);
            __atomic_store_n(&partner_job, a, __ATOMIC_RELEASE);
            pthread_cond_signal(&partner_wake);
        }
    }
    pthread_mutex_unlock(&partner_lock);
    return taken;
}

/* Done with the partner: its direction taken back if it never claimed it (then 0), else
 * waited for (then 1), spinning up to as long as the caller's own direction took (its own
 * wake-up from a sleep can cost more) and at least SPIN_NS before sleeping. */
static int partner_done_with(int64_t own_ns) {
    const int claimed = claim_job() == NULL;
    const int64_t until = monotonic_ns() + (own_ns > SPIN_NS ? own_ns : SPIN_NS);
    for (unsigned i = 1; claimed && !__atomic_load_n(&partner_finished, __ATOMIC_ACQUIRE); ++i) {
        if (i % 64 == 0 && monotonic_ns() > until) break;
        relax();
    }
    pthread_mutex_lock(&partner_lock);
    while (claimed && !__atomic_load_n(&partner_finished, __ATOMIC_ACQUIRE))
        pthread_cond_wait(&partner_done, &partner_lock);
    partner_busy = 0;
    pthread_mutex_unlock(&partner_lock);
    return claimed;
}

/* Both directions; side by side when asked to and the partner is free. */
int recurrent_layer(const layer_args *a) {
    if (a->directions == 2 && a->threads > 1 && partner_take(a)) {
        const int64_t start = monotonic_ns();
        run_direction(a, 0);
        if (!partner_done_with(monotonic_ns() - start)) run_direction(a, 1);
        return 0;
    }
    for (int d = 0; d < a->directions; ++d) run_direction(a, d);
    return 0;
}
