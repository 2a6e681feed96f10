/* Row kernels of the CPU softmax passes, each one pass over a row that stays in the L1 cache,
 * and of additive attention's scores and their gradients (at the end of the file)
 * (seq2seq.native builds this file with the machine's C compiler and calls it through ctypes).
 *
 * torch makes these passes one whole-tensor kernel at a time: a bf16 row is cast to fp32, then
 * walked three or four times more, and on CPUs torch's bf16 element-wise kernels are no faster
 * than its fp32 ones. Here a row of logits (7,000 of them are 14 KB in bf16, 28 KB in fp32) is
 * read once from memory and the rest happens in the cache, with the compiler's vectorised expf
 * (glibc's libmvec).
 *
 * Logits are bf16 (the top 16 bits of an fp32) or fp32, `dtype` says which; every statistic is
 * fp32. Rows are split among `threads` OpenMP threads (torch's: this library is linked
 * against the libgomp torch has already loaded). Each row is computed by one thread in a fixed
 * order, so its results do not depend on the number of threads; only sums over rows (the
 * bias gradient, attention's v gradient) do, as torch's own sums do.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

/* glibc declares its vector expf (libmvec) only under -ffast-math, which would also let the
 * compiler assume no infinities; declared here, the loops below vectorise without it. */
__attribute__((__simd__("notinbranch"))) float expf(float);

enum { FP32 = 0, BF16 = 1 };

static inline float from_bf16(uint16_t bits)
{
    uint32_t word = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &word, sizeof value);
    return value;
}

/* Round to nearest even, as torch does (NaN kept a NaN). */
static inline uint16_t to_bf16(float value)
{
    uint32_t word;
    memcpy(&word, &value, sizeof word);
    if ((word & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((word >> 16) | 0x40u);
    word += 0x7fffu + ((word >> 16) & 1u);
    return (uint16_t)(word >> 16);
}

/* A row as fp32 into `out` (which may be the row itself when it is fp32). */
static inline void load_row(const void *row, int dtype, float *out, long cols)
{
    if (dtype == FP32) {
        if ((const float *)row != out)
            memcpy(out, row, cols * sizeof(float));
        return;
    }
    const uint16_t *bits = row;
#pragma omp simd
    for (long c = 0; c < cols; c++)
        out[c] = from_bf16(bits[c]);
}

/* fp32 values into a row of `dtype`, rounded once. */
static inline void store_row(const float *values, int dtype, void *row, long cols)
{
    if (dtype == FP32) {
        memcpy(row, values, cols * sizeof(float));
        return;
    }
    uint16_t *bits = row;
#pragma omp simd
    for (long c = 0; c < cols; c++)
        bits[c] = to_bf16(values[c]);
}

static inline float row_max(const float *x, long cols)
{
    float peak = -INFINITY;
#pragma omp simd reduction(max : peak)
    for (long c = 0; c < cols; c++)
        peak = x[c] > peak ? x[c] : peak;
    return peak;
}

/* log_softmax of each row of `x` (`rows` rows `stride` elements apart) into the contiguous
 * fp32 `out`: `x - max - log(sum(exp(x - max)))`, as torch computes it. With `blocked`
 * (`rows` x `cols` bytes, nonzero where blocked; NULL: none), blocked elements are taken as
 * -inf: each row is normalised over the others (beam search's own shortlists). */
void log_softmax_rows(const void *x, int dtype, long stride, long rows, long cols,
                      const uint8_t *blocked, float *out, int threads)
{
    const long size = dtype == BF16 ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long r = 0; r < rows; r++) {
        float *y = out + r * cols;
        load_row((const char *)x + r * stride * size, dtype, y, cols);
        if (blocked) {
            const uint8_t *b = blocked + r * cols;
#pragma omp simd
            for (long c = 0; c < cols; c++)
                y[c] = b[c] ? -INFINITY : y[c];
        }
        const float peak = row_max(y, cols);
        /* expf never sees a value below -80 (-inf where blocked or banned): glibc's vector
         * expf computes a whole vector with the scalar function, underflow handling and
         * all, when one lane is below about -87, which made a mostly blocked row six times
         * slower. A term raised to exp(-80) = 1.8e-35 leaves the sum, at least 1 (the
         * peak's term), unchanged. The raised values go through a buffer: given
         * expf(x > -80 ? x : -80), GCC calls expf on x and selects after the call. The sum
         * is kept in fp64, so that adding it up a block at a time loses nothing. */
        double norm = 0.0;
        float raised[256];
        for (long first = 0; first < cols; first += 256) {
            const long count = cols - first < 256 ? cols - first : 256;
#pragma omp simd
            for (long c = 0; c < count; c++) {
                const float shifted = y[first + c] - peak;
                raised[c] = shifted > -80.0f ? shifted : -80.0f;
            }
#pragma omp simd reduction(+ : norm)
            for (long c = 0; c < count; c++)
                norm += expf(raised[c]);
        }
        const float log_norm = logf((float)norm);
#pragma omp simd
        for (long c = 0; c < cols; c++)
            y[c] = (y[c] - peak) - log_norm;
    }
}

/* Label-smoothed cross-entropy of each row of logits, and its gradient written over them.
 *
 * For row r with target y and smoothing eps over V = cols classes:
 *   loss[r] = lse - (1 - eps) x_y - eps / V sum_c x_c
 *   grad    = softmax(x) - eps / V - (1 - eps) onehot(y)
 * `x` holds `rows` rows `stride` elements apart, in `dtype`; the gradient replaces them in the
 * same dtype. `scratch` holds one fp32 row per thread (threads x cols), `bias_grad` one fp32
 * row per thread too, to which each thread adds the gradients of its rows (the caller sums
 * them, in thread order, when the layer has a bias; NULL otherwise). */
void cross_entropy_rows(void *x, int dtype, long stride, long rows, long cols,
                        const int64_t *target, float smoothing, float *loss,
                        float *scratch, float *bias_grad, int threads)
{
    const long size = dtype == BF16 ? 2 : 4;
    const float spread = smoothing / (float)cols;
#pragma omp parallel num_threads(threads)
    {
        const long thread = omp_get_thread_num();
        float *row = scratch + thread * cols;
        float *bias = bias_grad ? bias_grad + thread * cols : NULL;
#pragma omp for schedule(static)
        for (long r = 0; r < rows; r++) {
            char *at = (char *)x + r * stride * size;
            float *v = dtype == FP32 ? (float *)at : row;
            load_row(at, dtype, v, cols);
            const long y = (long)target[r];
            const float picked = v[y], peak = row_max(v, cols);
            float total = 0.0f, norm = 0.0f;
#pragma omp simd reduction(+ : total, norm)
            for (long c = 0; c < cols; c++) {
                total += v[c];
                v[c] = expf(v[c] - peak);
                norm += v[c];
            }
            loss[r] = (logf(norm) + peak) - (1.0f - smoothing) * picked - spread * total;
#pragma omp simd
            for (long c = 0; c < cols; c++)
                v[c] = v[c] / norm - spread;
            v[y] += smoothing - 1.0f;
            if (bias) {
#pragma omp simd
                for (long c = 0; c < cols; c++)
                    bias[c] += v[c];
            }
            if (dtype == BF16)
                store_row(v, dtype, at, cols);
        }
    }
}

/* Eight fp32 lanes as one value (GCC's and Clang's vector extensions: one AVX register
 * where the CPU has AVX, two SSE or NEON ones elsewhere). */
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

/* exp of each lane, inline: Cephes' expf (the argument reduced by ln 2 in two parts, a
 * degree-6 polynomial, the power of two built in the exponent bits), within 1.2e-7 relative
 * of exp over [-87, 88]; lanes outside are clamped to it, NaN stays NaN. glibc's vector expf
 * is a call per vector that spills the loop's registers: with this one instead, the
 * attention scores below run 1.3-1.5x faster. */
static inline f32x8 exp8(f32x8 x)
{
    const i32x8 below = x < -87.0f, above = x > 88.0f;
    const f32x8 low = (f32x8){0} - 87.0f, high = (f32x8){0} + 88.0f;
    x = (f32x8)(((i32x8)x & ~(below | above)) | ((i32x8)low & below) | ((i32x8)high & above));
    const f32x8 magic = (f32x8){0} + 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    const f32x8 shifted = x * 1.44269504088896341f + magic;
    const f32x8 k = shifted - magic;
    f32x8 r = x - k * 0.693359375f;
    r = r + k * 2.12194440e-4f;
    f32x8 p = (f32x8){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + (r + 1.0f);
    const i32x8 power = ((i32x8)shifted - (i32x8)magic + 127) << 23;
    return p * (f32x8)power;
}

/* Additive (Bahdanau) attention scores without their (n, T, S, A) hidden layer:
 *   out[i, t, s] = 2 sum_a v[a] sigmoid(query[i, t, a] + keys[i, s, a]) - sum_a v[a]
 * which is v^T tanh(W q + U h) for query = 2 W q and keys = 2 U h (seq2seq.models.attention).
 * `query` (n, T, A), `keys` (n, S, A) and `energy` (A) are contiguous, in `dtype`; `out`
 * (n, T, S) is written in `dtype`, rounded once. `scratch` holds (S + 1) * A + A fp32 values
 * per thread: a sentence's keys, converted once for its T queries, then a query and v. The
 * sigmoids' exp is exp8 on whole blocks of 8 and glibc's expf on the tail, as in the backward,
 * so that training differentiates the function it computed. */
void additive_scores(const void *query, const void *keys, const void *energy, int dtype,
                     long n, long queries, long sources, long size, void *out, float *scratch,
                     int threads)
{
    const long bytes = dtype == BF16 ? 2 : 4;
#pragma omp parallel num_threads(threads)
    {
        const long thread = omp_get_thread_num();
        float *k = scratch + thread * (sources + 2) * size;
        float *q = k + sources * size, *v = q + size;
        load_row(energy, dtype, v, size);
        float v_sum = 0.0f;
        for (long a = 0; a < size; a++)
            v_sum += v[a];
#pragma omp for schedule(static)
        for (long i = 0; i < n; i++) {
            load_row((const char *)keys + i * sources * size * bytes, dtype, k,
                     sources * size);
            for (long t = 0; t < queries; t++) {
                const long row = i * queries + t;
                load_row((const char *)query + row * size * bytes, dtype, q, size);
                for (long s = 0; s < sources; s++) {
                    const float *key = k + s * size;
                    f32x8 lanes = {0};
                    long a = 0;
                    for (; a + 8 <= size; a += 8) {
                        f32x8 qa, ka, va;
                        memcpy(&qa, q + a, sizeof qa);
                        memcpy(&ka, key + a, sizeof ka);
                        memcpy(&va, v + a, sizeof va);
                        lanes += va / (1.0f + exp8(-(qa + ka)));
                    }
                    float acc = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
                                + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
#pragma omp simd reduction(+ : acc)
                    for (long b = a; b < size; b++)
                        acc += v[b] / (1.0f + expf(-(q[b] + key[b])));
                    const float score = 2.0f * acc - v_sum;
                    if (dtype == BF16)
                        ((uint16_t *)out)[row * sources + s] = to_bf16(score);
                    else
                        ((float *)out)[row * sources + s] = score;
                }
            }
        }
    }
}

/* The gradients of additive_scores, given `grad` (n, T, S) of the scores in `dtype`: each
 * hidden value is computed again rather than kept from the forward (a step's (n, T, S, A)
 * tensor), and scores whose gradient is zero (masked positions) are skipped.
 *   z = query[i, t] + keys[i, s], h = sigmoid(z), g = grad[i, t, s]:
 *   grad_query[i, t] += 2 g v * h (1 - h)   grad_keys[i, s] += the same
 *   grad_energy += g (2 h - 1)
 * grad_query is written in `dtype`, summed in fp32 and rounded once; grad_keys likewise, or
 * with `add_keys` added to: it is then an fp32 (n, S, A) sum over the steps of a decoder (the
 * keys are the same at every step: seq2seq.models.step_sources). grad_energy holds
 * one fp32 row of A per thread, to which each thread adds (the caller sums them). `scratch`
 * holds (2 S + 3) * A fp32 values per thread. exp is computed as the forward computes it. */
void additive_scores_backward(const void *query, const void *keys, const void *energy,
                              const void *grad, int dtype, long n, long queries, long sources,
                              long size, void *grad_query, void *grad_keys, int add_keys,
                              float *grad_energy, float *scratch, int threads)
{
    const long bytes = dtype == BF16 ? 2 : 4;
#pragma omp parallel num_threads(threads)
    {
        const long thread = omp_get_thread_num();
        float *k = scratch + thread * (2 * sources + 3) * size;
        float *dk = k + sources * size, *q = dk + sources * size, *dq = q + size, *v = dq + size;
        float *dv = grad_energy + thread * size;
        load_row(energy, dtype, v, size);
#pragma omp for schedule(static)
        for (long i = 0; i < n; i++) {
            load_row((const char *)keys + i * sources * size * bytes, dtype, k,
                     sources * size);
            float *dks_all = add_keys ? (float *)grad_keys + i * sources * size : dk;
            if (!add_keys)
                memset(dk, 0, sources * size * sizeof(float));
            for (long t = 0; t < queries; t++) {
                const long row = i * queries + t;
                load_row((const char *)query + row * size * bytes, dtype, q, size);
                memset(dq, 0, size * sizeof(float));
                for (long s = 0; s < sources; s++) {
                    const long at = row * sources + s;
                    const float g = dtype == BF16 ? from_bf16(((const uint16_t *)grad)[at])
                                                  : ((const float *)grad)[at];
                    if (g == 0.0f)
                        continue;
                    float *dks = dks_all + s * size;
                    const float *key = k + s * size;
                    const f32x8 g8 = (f32x8){0} + g, two_g = (f32x8){0} + 2.0f * g;
                    long a = 0;
                    for (; a + 8 <= size; a += 8) {
                        f32x8 qa, ka, va, dqa, dka, dva;
                        memcpy(&qa, q + a, sizeof qa);
                        memcpy(&ka, key + a, sizeof ka);
                        memcpy(&va, v + a, sizeof va);
                        memcpy(&dqa, dq + a, sizeof dqa);
                        memcpy(&dka, dks + a, sizeof dka);
                        memcpy(&dva, dv + a, sizeof dva);
                        const f32x8 h = 1.0f / (1.0f + exp8(-(qa + ka)));
                        const f32x8 d = two_g * va * h * (1.0f - h);
                        dqa += d;
                        dka += d;
                        dva += g8 * (2.0f * h - 1.0f);
                        memcpy(dq + a, &dqa, sizeof dqa);
                        memcpy(dks + a, &dka, sizeof dka);
                        memcpy(dv + a, &dva, sizeof dva);
                    }
#pragma omp simd
                    for (long b = a; b < size; b++) {
                        const float h = 1.0f / (1.0f + expf(-(q[b] + key[b])));
                        const float d = 2.0f * g * v[b] * h * (1.0f - h);
                        dq[b] += d;
                        dks[b] += d;
                        dv[b] += g * (2.0f * h - 1.0f);
                    }
                }
                store_row(dq, dtype, (char *)grad_query + row * size * bytes, size);
            }
            if (!add_keys)
                store_row(dk, dtype, (char *)grad_keys + i * sources * size * bytes,
                          sources * size);
        }
    }
}

/* int8 products (seq2seq.quantize): each row of `x` (`rows` rows `stride` floats apart)
 * quantised symmetrically to -qmax..qmax, `scale[r] = max(max |x_r|, 1e-12) / qmax` and
 * `round(x / scale)` (to nearest even), as int8 (`to_int8`) or as integral floats into the
 * contiguous `out`: torch's six passes (abs, amax, clamp, divide, divide, round) in one read
 * of the row and one write. */
void quantize_rows(const float *x, long stride, long rows, long cols, float qmax, int to_int8,
                   void *out, float *scale, int threads)
{
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long r = 0; r < rows; r++) {
        const float *row = x + r * stride;
        float peak = 0.0f;
#pragma omp simd reduction(max : peak)
        for (long c = 0; c < cols; c++) {
            const float size = fabsf(row[c]);
            peak = size > peak ? size : peak;
        }
        const float s = (peak > 1e-12f ? peak : 1e-12f) / qmax;
        scale[r] = s;
        if (to_int8) {
            int8_t *q = (int8_t *)out + r * cols;
#pragma omp simd
            for (long c = 0; c < cols; c++)
                q[c] = (int8_t)nearbyintf(row[c] / s);
        } else {
            float *q = (float *)out + r * cols;
#pragma omp simd
            for (long c = 0; c < cols; c++)
                q[c] = nearbyintf(row[c] / s);
        }
    }
}

/* The scaling after an int8 product, in one pass: `out[r][c] = acc[r][c] * row_scale[r] *
 * col_scale[c] (+ bias[c])`, from int32 sums (`acc_int32`) or fp32 ones (`out` may then be
 * `acc`), rounded after each operation as torch's `mul_`, `mul_`, `add_` are (no fused
 * multiply-add). */
__attribute__((optimize("fp-contract=off")))
void scale_rows(const void *acc, int acc_int32, long rows, long cols, const float *row_scale,
                const float *col_scale, const float *bias, float *out, int threads)
{
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long r = 0; r < rows; r++) {
        const float s = row_scale[r];
        float *y = out + r * cols;
        if (acc_int32) {
            const int32_t *a = (const int32_t *)acc + r * cols;
#pragma omp simd
            for (long c = 0; c < cols; c++)
                y[c] = ((float)a[c] * s) * col_scale[c];
        } else {
            const float *a = (const float *)acc + r * cols;
#pragma omp simd
            for (long c = 0; c < cols; c++)
                y[c] = (a[c] * s) * col_scale[c];
        }
        if (bias) {
#pragma omp simd
            for (long c = 0; c < cols; c++)
                y[c] += bias[c];
        }
    }
}

/* The GRU equations at feature c of a row, from its gate shares `g` and hidden products `u`
 * (3 H each, torch's r, z, n order) and the previous state: the new state, and the reset and
 * update gates and the candidate through the pointers. tanh is 2 sigmoid(2x) - 1 with the
 * vector expf (glibc's vector tanhf is newer than some C libraries this builds against). */
static inline float gru_cell(const float *g, const float *u, float prev, long c, long size,
                             float *reset, float *update, float *candidate)
{
    *reset = 1.0f / (1.0f + expf(-(g[c] + u[c])));
    *update = 1.0f / (1.0f + expf(-(g[size + c] + u[size + c])));
    const float pre = g[2 * size + c] + *reset * u[2 * size + c];
    *candidate = 2.0f / (1.0f + expf(-2.0f * pre)) - 1.0f;
    return *candidate + *update * (prev - *candidate);
}

/* One step of a GRU's update in inference (seq2seq.models.cells.cell_update), in one pass
 * over each row instead of nine whole-tensor kernels: from the gates' input share `gates` and
 * hidden share `hidden` (`rows` rows of 3 x `size`, torch's order r, z, n) and the previous
 * state `h`, the new state into the contiguous `out`:
 *   r, z = sigmoid(gates_rz + hidden_rz);  n = tanh(gates_n + r hidden_n);  n + z (h - n).
 * tanh(x) is computed as 2 sigmoid(2x) - 1 (with the vector expf; glibc's vector tanhf is
 * newer than some C libraries this builds against): within 1.2e-7 of it. */
void gru_update(const float *gates, long gates_stride, const float *hidden, long hidden_stride,
                const float *h, long h_stride, long rows, long size, float *out, int threads)
{
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long r = 0; r < rows; r++) {
        const float *g = gates + r * gates_stride, *u = hidden + r * hidden_stride;
        const float *prev = h + r * h_stride;
        float *y = out + r * size;
#pragma omp simd
        for (long c = 0; c < size; c++) {
            float reset, update, candidate;
            y[c] = gru_cell(g, u, prev[c], c, size, &reset, &update, &candidate);
        }
    }
}

/* A row of `dtype` as fp32: the row itself when it is fp32, else converted into `buffer`. */
static inline const float *fp32_row(const void *row, int dtype, float *buffer, long cols)
{
    if (dtype == FP32)
        return row;
    load_row(row, dtype, buffer, cols);
    return buffer;
}

/* A GRU step's update in training (seq2seq.models.cells._GRUUpdate), one pass per row:
 *   r, z = sigmoid(gates[:, :2H] + hidden[:, :2H])
 *   n = tanh(gates[:, 2H:] + r hidden[:, 2H:]),   out = n + z (h - n)
 * keeping `rz` (B, 2H) and `n` (B, H) for the backward. gates, hidden and h are rows of
 * `dtype` (`*_stride` elements apart), the outputs contiguous in `dtype`: computed in fp32,
 * each rounded once. tanh is 2 sigmoid(2x) - 1, as gru_update (decoding) computes it.
 * `scratch` holds 11 H fp32 values per thread (bf16 rows converted). */
void gru_train_forward(const void *gates, long gates_stride, const void *hidden,
                       long hidden_stride, const void *h, long h_stride, int dtype, long rows,
                       long size, void *out, void *rz, void *candidates, float *scratch,
                       int threads)
{
    const long bytes = dtype == BF16 ? 2 : 4;
#pragma omp parallel num_threads(threads)
    {
        float *buffer = scratch + omp_get_thread_num() * 11 * size;
#pragma omp for schedule(static)
        for (long r = 0; r < rows; r++) {
            const float *g = fp32_row((const char *)gates + r * gates_stride * bytes, dtype,
                                      buffer, 3 * size);
            const float *u = fp32_row((const char *)hidden + r * hidden_stride * bytes, dtype,
                                      buffer + 3 * size, 3 * size);
            const float *prev = fp32_row((const char *)h + r * h_stride * bytes, dtype,
                                         buffer + 6 * size, size);
            float *y = dtype == FP32 ? (float *)out + r * size : buffer + 7 * size;
            float *shares = dtype == FP32 ? (float *)rz + r * 2 * size : buffer + 8 * size;
            float *n = dtype == FP32 ? (float *)candidates + r * size : buffer + 10 * size;
#pragma omp simd
            for (long c = 0; c < size; c++)
                y[c] = gru_cell(g, u, prev[c], c, size, shares + c, shares + size + c, n + c);
            if (dtype == BF16) {
                store_row(y, dtype, (char *)out + r * size * bytes, size);
                store_row(shares, dtype, (char *)rz + r * 2 * size * bytes, 2 * size);
                store_row(n, dtype, (char *)candidates + r * size * bytes, size);
            }
        }
    }
}

/* The gradients of gru_train_forward given `grad` (B, H) of its output, from what it kept
 * (`rz`, `n`, contiguous) and its inputs `hidden` and `h` (rows `*_stride` apart), all in
 * `dtype`; into contiguous `grad_gates` (B, 3H), `grad_hidden` (B, 3H) and `grad_h` (B, H):
 *   grad_h = g z,   d_pre = g (1 - z)(1 - n^2),   d_r = d_pre hidden_n r (1 - r),
 *   d_z = g (h - n) z (1 - z),   grad_gates = [d_r, d_z, d_pre],
 *   grad_hidden = [d_r, d_z, d_pre r]
 * computed in fp32, each rounded once. `scratch` holds 13 H fp32 values per thread. */
void gru_train_backward(const void *grad, const void *rz, const void *candidates,
                        const void *hidden, long hidden_stride, const void *h, long h_stride,
                        int dtype, long rows, long size, void *grad_gates, void *grad_hidden,
                        void *grad_h, float *scratch, int threads)
{
    const long bytes = dtype == BF16 ? 2 : 4;
#pragma omp parallel num_threads(threads)
    {
        float *buffer = scratch + omp_get_thread_num() * 13 * size;
#pragma omp for schedule(static)
        for (long r = 0; r < rows; r++) {
            const float *g = fp32_row((const char *)grad + r * size * bytes, dtype, buffer,
                                      size);
            const float *shares = fp32_row((const char *)rz + r * 2 * size * bytes, dtype,
                                           buffer + size, 2 * size);
            const float *n = fp32_row((const char *)candidates + r * size * bytes, dtype,
                                      buffer + 3 * size, size);
            const float *hn = fp32_row((const char *)hidden
                                       + (r * hidden_stride + 2 * size) * bytes, dtype,
                                       buffer + 4 * size, size);
            const float *prev = fp32_row((const char *)h + r * h_stride * bytes, dtype,
                                         buffer + 5 * size, size);
            float *dg = dtype == FP32 ? (float *)grad_gates + r * 3 * size : buffer + 6 * size;
            float *du = dtype == FP32 ? (float *)grad_hidden + r * 3 * size : buffer + 9 * size;
            float *dh = dtype == FP32 ? (float *)grad_h + r * size : buffer + 12 * size;
#pragma omp simd
            for (long c = 0; c < size; c++) {
                const float reset = shares[c], update = shares[size + c], cand = n[c];
                const float d_pre = g[c] * (1.0f - update) * (1.0f - cand * cand);
                const float d_r = d_pre * hn[c] * reset * (1.0f - reset);
                const float d_z = g[c] * (prev[c] - cand) * update * (1.0f - update);
                dh[c] = g[c] * update;
                dg[c] = du[c] = d_r;
                dg[size + c] = du[size + c] = d_z;
                dg[2 * size + c] = d_pre;
                du[2 * size + c] = d_pre * reset;
            }
            if (dtype == BF16) {
                store_row(dg, dtype, (char *)grad_gates + r * 3 * size * bytes, 3 * size);
                store_row(du, dtype, (char *)grad_hidden + r * 3 * size * bytes, 3 * size);
                store_row(dh, dtype, (char *)grad_h + r * size * bytes, size);
            }
        }
    }
}

/* tanh of `count` contiguous fp32 values into `out` (which may be `x`), computed as
 * sign(x) (1 - 2 / (exp(2 |x|) + 1)) with the vector expf: within 1.6e-7 of tanh, odd as
 * tanh is, and exactly +-1 where exp overflows. */
void tanh_values(const float *x, long count, float *out, int threads)
{
    const long block = 4096;  /* values per share of the threads' work */
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long start = 0; start < count; start += block) {
        const long end = start + block < count ? start + block : count;
#pragma omp simd
        for (long i = start; i < end; i++)
            out[i] = copysignf(1.0f - 2.0f / (expf(2.0f * fabsf(x[i])) + 1.0f), x[i]);
    }
}
