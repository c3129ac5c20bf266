// sparsecore CUDA C: the activation-sparse FFN ops (pack, unpack, spmm, sddmm, spmm_t, gated_ffn).
//
// Buffers (all C-contiguous, row-major; M rows, K columns, n_t = ceil(K / tile) tiles):
//   x[M, K]                    value T (pack input)
//   values[M, n_t, cap]        value T; cols[M, n_t, cap] int16 offset in tile; counts[M, n_t] int32
//   overflow CSR: indptr[M + 1] P (int or long long), indices[nnz] I, data[nnz] T
//   w[K, N], dy[M, N], w_up[K, D], w_down[K, N], out[M, N] value T
// `has_ovf` = 0 means no overflow CSR: its pointers are then never read (may be any valid pointer).
// `aligned` = 1 means the dense operand's base pointer is 16-byte aligned and its row pitch
// (N * sizeof(T)) a multiple of 16, so V-wide vector loads at multiples of V are aligned.
#include "common.cuh"

using sc::i64;

// ---- pack ---------------------------------------------------------------------------------------
// Grid (M, n_t), NT threads: one (row, tile). The tile is walked in chunks of NT columns; a block
// prefix of the keep flags gives each kept column its rank, so the slots fill in ascending column
// order. Ranks >= cap are counted into ovc[row * n_t + tile] (the overflow written by pack_overflow).
template <typename T, int NT>
__global__ void SC_BOUNDS(NT) pack_tiles(const T* __restrict__ x, int M, int K, float thr, int relu, int tile,
                                                 int cap, T* __restrict__ values, short* __restrict__ cols,
                                                 int* __restrict__ counts, int* __restrict__ ovc) {
    __shared__ int scratch[NT / 32];
    const int row = blockIdx.x, t = blockIdx.y, n_t = gridDim.y;
    const int base = t * tile;
    const int width = min(tile, K - base);
    const T* xr = x + (i64)row * K + base;
    T* vr = values + ((i64)row * n_t + t) * cap;
    short* cr = cols + ((i64)row * n_t + t) * cap;
    int seen = 0;
    for (int c0 = 0; c0 < width; c0 += NT) {
        const int c = c0 + threadIdx.x;
        float a = 0.0f;
        T raw = sc::from_f<T>(0.0f);
        if (c < width) {
            raw = xr[c];
            a = sc::to_f(raw);
            if (relu && !(a >= 0.0f) && a == a) { a = 0.0f; raw = sc::from_f<T>(0.0f); }  // relu keeps NaN
        }
        const int keep = (c < width) && !(fabsf(a) <= thr);  // NaN is kept: nothing is lost silently
        const int2 bp_rank = sc::block_prefix<NT>(keep, scratch);
        const int total = bp_rank.y;
        const int rank = seen + bp_rank.x;
        if (keep && rank < cap) {
            vr[rank] = raw;
            cr[rank] = (short)c;
        }
        seen += total;
    }
    const int filled = min(seen, cap);
    for (int s = filled + threadIdx.x; s < cap; s += NT) {  // padding: offset 0, value 0
        vr[s] = sc::from_f<T>(0.0f);
        cr[s] = 0;
    }
    if (threadIdx.x == 0) {
        counts[(i64)row * n_t + t] = filled;
        ovc[(i64)row * n_t + t] = seen - filled;
    }
}

// One block: exclusive scan of ovc[n] (row-major over (row, tile)) into off[n] (i64) and the CSR
// indptr[M + 1] (indptr[r] = off[r * n_t], indptr[M] = total). n may be large: chunks of NT.
template <typename P, int NT>
__global__ void SC_BOUNDS(NT) pack_scan(const int* __restrict__ ovc, int M, int n_t, P* __restrict__ indptr,
                                                i64* __restrict__ off) {
    __shared__ i64 part[NT];
    const i64 n = (i64)M * n_t;
    i64 carry = 0;
    for (i64 c0 = 0; c0 < n; c0 += NT) {
        const i64 i = c0 + threadIdx.x;
        const i64 v = i < n ? ovc[i] : 0;
        part[threadIdx.x] = v;
        __syncthreads();
        for (int o = 1; o < NT; o <<= 1) {  // Hillis-Steele: one scan per chunk, log2(NT) steps
            i64 add = threadIdx.x >= o ? part[threadIdx.x - o] : 0;
            __syncthreads();
            part[threadIdx.x] += add;
            __syncthreads();
        }
        const i64 excl = carry + part[threadIdx.x] - v;
        if (i < n) {
            off[i] = excl;
            if (i % n_t == 0) indptr[i / n_t] = (P)excl;
        }
        carry += part[NT - 1];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        indptr[M] = (P)carry;
        if (n_t == 0)
            for (int r = 0; r < M; ++r) indptr[r] = 0;
    }
}

// Grid (M, n_t): re-walks only tiles that overflowed and writes their ranks >= cap to the CSR.
template <typename T, typename I, int NT>
__global__ void SC_BOUNDS(NT) pack_overflow(const T* __restrict__ x, int M, int K, float thr, int relu,
                                                    int tile, int cap, const int* __restrict__ ovc,
                                                    const i64* __restrict__ off, I* __restrict__ indices,
                                                    T* __restrict__ data) {
    __shared__ int scratch[NT / 32];
    const int row = blockIdx.x, t = blockIdx.y, n_t = gridDim.y;
    if (ovc[(i64)row * n_t + t] == 0) return;  // uniform over the block
    const i64 o = off[(i64)row * n_t + t];
    const int base = t * tile;
    const int width = min(tile, K - base);
    const T* xr = x + (i64)row * K + base;
    int seen = 0;
    for (int c0 = 0; c0 < width; c0 += NT) {
        const int c = c0 + threadIdx.x;
        float a = 0.0f;
        T raw = sc::from_f<T>(0.0f);
        if (c < width) {
            raw = xr[c];
            a = sc::to_f(raw);
            if (relu && !(a >= 0.0f) && a == a) { a = 0.0f; raw = sc::from_f<T>(0.0f); }
        }
        const int keep = (c < width) && !(fabsf(a) <= thr);
        const int2 bp_rank = sc::block_prefix<NT>(keep, scratch);
        const int total = bp_rank.y;
        const int rank = seen + bp_rank.x;
        if (keep && rank >= cap) {
            indices[o + rank - cap] = (I)(base + c);
            data[o + rank - cap] = raw;
        }
        seen += total;
    }
}

// ---- unpack -------------------------------------------------------------------------------------
// Grid (M): zero the row, then scatter its slots and overflow entries (disjoint positions).
template <typename T, typename P, typename I, int NT>
__global__ void SC_BOUNDS(NT) unpack(const T* __restrict__ values, const short* __restrict__ cols,
                                             const int* __restrict__ counts, int K, int n_t, int tile, int cap,
                                             int has_ovf, const P* __restrict__ indptr, const I* __restrict__ indices,
                                             const T* __restrict__ data, T* __restrict__ out) {
    const int row = blockIdx.x;
    T* orow = out + (i64)row * K;
    for (int c = threadIdx.x; c < K; c += NT) orow[c] = sc::from_f<T>(0.0f);
    __syncthreads();
    for (int i = threadIdx.x; i < n_t * cap; i += NT) {
        const int t = i / cap, s = i - t * cap;
        const i64 e = ((i64)row * n_t + t) * cap + s;
        if (s < counts[(i64)row * n_t + t]) orow[t * tile + cols[e]] = values[e];
    }
    if (has_ovf)
        for (i64 e = indptr[row] + threadIdx.x; e < (i64)indptr[row + 1]; e += NT) orow[indices[e]] = data[e];
}

// ---- spmm: out[M, N] = A @ W --------------------------------------------------------------------
// Grid (M, ceil(N / (NT * V))): each thread owns V consecutive output columns in float registers and
// gathers the W rows of its row's entries (a 16-byte load per entry and thread; the warp's loads of
// one W row are consecutive, so coalesced). Entry (col, value) reads are the same address across
// the block: broadcast from L1.
template <typename T, int V>
__device__ __forceinline__ void axpy_row(float (&acc)[V], float a, const T* __restrict__ wrow, int n0, int nv,
                                         bool aligned) {
    float w[V];
    sc::load_vec_n<T, V>(wrow + n0, nv, aligned, w);
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = fmaf(a, w[i], acc[i]);
}

template <typename T, typename P, typename I, int NT, int V>
__global__ void SC_BOUNDS(NT) spmm_ell(const T* __restrict__ values, const short* __restrict__ cols,
                                               const int* __restrict__ counts, int n_t, int tile, int cap, int has_ovf,
                                               const P* __restrict__ indptr, const I* __restrict__ indices,
                                               const T* __restrict__ data, const T* __restrict__ w, int N, int aligned,
                                               T* __restrict__ out) {
    const int row = blockIdx.x;
    const int n0 = (blockIdx.y * NT + threadIdx.x) * V;
    const int nv = min(V, N - n0);
    float acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = 0.0f;
    if (nv > 0) {
        for (int t = 0; t < n_t; ++t) {
            const i64 rt = (i64)row * n_t + t;
            const int cnt = counts[rt];
            for (int s = 0; s < cnt; ++s) {
                const i64 e = rt * cap + s;
                axpy_row<T, V>(acc, sc::to_f(values[e]), w + (i64)(t * tile + cols[e]) * N, n0, nv, aligned);
            }
        }
        if (has_ovf)
            for (i64 e = indptr[row]; e < (i64)indptr[row + 1]; ++e)
                axpy_row<T, V>(acc, sc::to_f(data[e]), w + (i64)indices[e] * N, n0, nv, aligned);
        sc::store_vec_n<T, V>(out + (i64)row * N + n0, nv, acc);
    }
}

template <typename T, typename P, typename I, int NT, int V>
__global__ void SC_BOUNDS(NT) spmm_csr(const P* __restrict__ indptr, const I* __restrict__ indices,
                                               const T* __restrict__ data, const T* __restrict__ w, int N, int aligned,
                                               T* __restrict__ out) {
    const int row = blockIdx.x;
    const int n0 = (blockIdx.y * NT + threadIdx.x) * V;
    const int nv = min(V, N - n0);
    if (nv <= 0) return;
    float acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = 0.0f;
    for (i64 e = indptr[row]; e < (i64)indptr[row + 1]; ++e)
        axpy_row<T, V>(acc, sc::to_f(data[e]), w + (i64)indices[e] * N, n0, nv, aligned);
    sc::store_vec_n<T, V>(out + (i64)row * N + n0, nv, acc);
}

// ---- sddmm: value(m, k) = x[m] . w[k] at the pattern's entries -----------------------------------
// One warp per entry: lanes stride D with V-wide loads, a shuffle reduction, lane 0 stores.
template <typename T, int V>
__device__ __forceinline__ float warp_dot(const T* __restrict__ a, const T* __restrict__ b, int D, bool aligned) {
    float s = 0.0f;
    const int lane = threadIdx.x & 31;
    for (int d = lane * V; d < D; d += 32 * V) {
        float av[V], bv[V];
        const int n = min(V, D - d);
        sc::load_vec_n<T, V>(a + d, n, aligned, av);
        sc::load_vec_n<T, V>(b + d, n, aligned, bv);
#pragma unroll
        for (int i = 0; i < V; ++i) s = fmaf(av[i], bv[i], s);
    }
    return sc::warp_sum(s);
}

// Grid (M, n_t): every slot of (row, tile) is written: the dot for filled slots, 0 for padding.
template <typename T, int NT, int V>
__global__ void SC_BOUNDS(NT) sddmm_ell(const T* __restrict__ x, const T* __restrict__ w, int D, int aligned,
                                                const short* __restrict__ cols, const int* __restrict__ counts,
                                                int tile, int cap, T* __restrict__ values) {
    const int row = blockIdx.x, t = blockIdx.y, n_t = gridDim.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const i64 rt = (i64)row * n_t + t;
    const int cnt = counts[rt];
    for (int s = warp; s < cap; s += NT / 32) {
        float v = 0.0f;
        if (s < cnt) v = warp_dot<T, V>(x + (i64)row * D, w + (i64)(t * tile + cols[rt * cap + s]) * D, D, aligned);
        if (lane == 0) values[rt * cap + s] = sc::from_f<T>(v);
    }
}

// Grid (M): the warps of the block share the row's CSR entries.
template <typename T, typename P, typename I, int NT, int V>
__global__ void SC_BOUNDS(NT) sddmm_csr(const T* __restrict__ x, const T* __restrict__ w, int D, int aligned,
                                                const P* __restrict__ indptr, const I* __restrict__ indices,
                                                T* __restrict__ data) {
    const int row = blockIdx.x;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (i64 e = indptr[row] + warp; e < (i64)indptr[row + 1]; e += NT / 32) {
        const float v = warp_dot<T, V>(x + (i64)row * D, w + (i64)indices[e] * D, D, aligned);
        if (lane == 0) data[e] = sc::from_f<T>(v);
    }
}

// ---- spmm_t: out[K, N] = A.T @ dy ----------------------------------------------------------------
// Grid (M, ceil(N / (NT * V))): each thread loads its V columns of dy[row] once and adds v * dy into
// the float32 accumulator acc[K, N] (zeroed by the launcher) with atomics; rows of A that share a
// column meet in L2. A cast kernel writes the value-typed result when T is not float.
template <typename T, typename P, typename I, int NT, int V>
__global__ void SC_BOUNDS(NT) spmm_t_ell(const T* __restrict__ values, const short* __restrict__ cols,
                                                 const int* __restrict__ counts, int n_t, int tile, int cap,
                                                 int has_ovf, const P* __restrict__ indptr,
                                                 const I* __restrict__ indices, const T* __restrict__ data,
                                                 const T* __restrict__ dy, int N, int aligned, float* __restrict__ acc) {
    const int row = blockIdx.x;
    const int n0 = (blockIdx.y * NT + threadIdx.x) * V;
    const int nv = min(V, N - n0);
    if (nv <= 0) return;
    float g[V];
    sc::load_vec_n<T, V>(dy + (i64)row * N + n0, nv, aligned, g);
    for (int t = 0; t < n_t; ++t) {
        const i64 rt = (i64)row * n_t + t;
        const int cnt = counts[rt];
        for (int s = 0; s < cnt; ++s) {
            const float a = sc::to_f(values[rt * cap + s]);
            float* dst = acc + (i64)(t * tile + cols[rt * cap + s]) * N + n0;
#pragma unroll
            for (int i = 0; i < V; ++i)
                if (i < nv) atomicAdd(dst + i, a * g[i]);
        }
    }
    if (has_ovf)
        for (i64 e = indptr[row]; e < (i64)indptr[row + 1]; ++e) {
            const float a = sc::to_f(data[e]);
            float* dst = acc + (i64)indices[e] * N + n0;
#pragma unroll
            for (int i = 0; i < V; ++i)
                if (i < nv) atomicAdd(dst + i, a * g[i]);
        }
}

template <typename T, typename P, typename I, int NT, int V>
__global__ void SC_BOUNDS(NT) spmm_t_csr(const P* __restrict__ indptr, const I* __restrict__ indices,
                                                 const T* __restrict__ data, const T* __restrict__ dy, int N,
                                                 int aligned, float* __restrict__ acc) {
    const int row = blockIdx.x;
    const int n0 = (blockIdx.y * NT + threadIdx.x) * V;
    const int nv = min(V, N - n0);
    if (nv <= 0) return;
    float g[V];
    sc::load_vec_n<T, V>(dy + (i64)row * N + n0, nv, aligned, g);
    for (i64 e = indptr[row]; e < (i64)indptr[row + 1]; ++e) {
        const float a = sc::to_f(data[e]);
        float* dst = acc + (i64)indices[e] * N + n0;
#pragma unroll
        for (int i = 0; i < V; ++i)
            if (i < nv) atomicAdd(dst + i, a * g[i]);
    }
}

// Grid-stride helpers (1-D): zero a float32 buffer; cast float32 -> T.
__global__ void fill_zero_f32(float* __restrict__ p, i64 n) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) p[i] = 0.0f;
}

template <typename T>
__global__ void cast_from_f32(const float* __restrict__ src, i64 n, T* __restrict__ dst) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        dst[i] = sc::from_f<T>(src[i]);
}

// ---- gated_ffn: out[m] = sum_j gate[m, j] * (x[m] . w_up[j]) * w_down[j] -------------------------
// Grid (M, ceil(N / (NT * V))), NT threads. Entries are taken in batches of up to BATCH: the warps
// compute the up-projection dots of the batch (one warp per entry, shuffle reduction) into shared
// memory, then every thread adds h * w_down[j] to its V output columns held in registers. Only the
// gate's non-zero columns of w_up and w_down are ever read.
template <int BATCH>
struct GatedStage {
    int col[BATCH];
    float gate[BATCH];
    float h[BATCH];
};

template <typename T, int NT, int V, int BATCH>
__device__ __forceinline__ void gated_batch(GatedStage<BATCH>& st, int nb, const T* __restrict__ xr,
                                            const T* __restrict__ w_up, int D, int aligned_d,
                                            const T* __restrict__ w_down, int N, int n0, int nv, int aligned_n,
                                            float (&acc)[V]) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();  // st.col / st.gate written by the caller
    for (int e = warp; e < nb; e += NT / 32) {
        const float dot = warp_dot<T, 16 / sizeof(T)>(xr, w_up + (i64)st.col[e] * D, D, aligned_d);
        if (lane == 0) st.h[e] = st.gate[e] * dot;
    }
    __syncthreads();
    if (nv > 0)
        for (int e = 0; e < nb; ++e) axpy_row<T, V>(acc, st.h[e], w_down + (i64)st.col[e] * N, n0, nv, aligned_n);
    __syncthreads();  // the stage is refilled next
}

// The CSR entries lo..hi of one row (a CSR operand, or a TiledELL's overflow), staged BATCH at a time.
template <typename T, typename I, int NT, int V, int BATCH>
__device__ __forceinline__ void gated_csr_row(GatedStage<BATCH>& st, i64 lo, i64 hi, const I* __restrict__ indices,
                                              const T* __restrict__ data, const T* __restrict__ xr,
                                              const T* __restrict__ w_up, int D, int aligned_d,
                                              const T* __restrict__ w_down, int N, int n0, int nv, int aligned_n,
                                              float (&acc)[V]) {
    for (i64 e0 = lo; e0 < hi; e0 += BATCH) {
        const int nb = (int)min((i64)BATCH, hi - e0);
        if (threadIdx.x < nb) {
            st.col[threadIdx.x] = (int)indices[e0 + threadIdx.x];
            st.gate[threadIdx.x] = sc::to_f(data[e0 + threadIdx.x]);
        }
        gated_batch<T, NT, V, BATCH>(st, nb, xr, w_up, D, aligned_d, w_down, N, n0, nv, aligned_n, acc);
    }
}

template <typename T, typename P, typename I, int NT, int V>
__global__ void SC_BOUNDS(NT) gated_ell(const T* __restrict__ x, int D, int aligned_d,
                                                const T* __restrict__ values, const short* __restrict__ cols,
                                                const int* __restrict__ counts, int n_t, int tile, int cap,
                                                int has_ovf, const P* __restrict__ indptr,
                                                const I* __restrict__ indices, const T* __restrict__ data,
                                                const T* __restrict__ w_up, const T* __restrict__ w_down, int N,
                                                int aligned_n, T* __restrict__ out) {
    constexpr int BATCH = 32;
    __shared__ GatedStage<BATCH> st;
    const int row = blockIdx.x;
    const int n0 = (blockIdx.y * NT + threadIdx.x) * V;
    const int nv = min(V, N - n0);
    const T* xr = x + (i64)row * D;
    float acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = 0.0f;
    for (int t = 0; t < n_t; ++t) {
        const i64 rt = (i64)row * n_t + t;
        const int cnt = counts[rt];  // same value for every thread: the branches below are uniform
        for (int s0 = 0; s0 < cnt; s0 += BATCH) {
            const int nb = min(BATCH, cnt - s0);
            if (threadIdx.x < nb) {
                st.col[threadIdx.x] = t * tile + cols[rt * cap + s0 + threadIdx.x];
                st.gate[threadIdx.x] = sc::to_f(values[rt * cap + s0 + threadIdx.x]);
            }
            gated_batch<T, NT, V, BATCH>(st, nb, xr, w_up, D, aligned_d, w_down, N, n0, nv, aligned_n, acc);
        }
    }
    if (has_ovf)
        gated_csr_row<T, I, NT, V, BATCH>(st, indptr[row], indptr[row + 1], indices, data, xr, w_up, D,
                                             aligned_d, w_down, N, n0, nv, aligned_n, acc);
    if (nv > 0) sc::store_vec_n<T, V>(out + (i64)row * N + n0, nv, acc);
}

template <typename T, typename P, typename I, int NT, int V>
__global__ void SC_BOUNDS(NT) gated_csr(const T* __restrict__ x, int D, int aligned_d,
                                                const P* __restrict__ indptr, const I* __restrict__ indices,
                                                const T* __restrict__ data, const T* __restrict__ w_up,
                                                const T* __restrict__ w_down, int N, int aligned_n,
                                                T* __restrict__ out) {
    constexpr int BATCH = 32;
    __shared__ GatedStage<BATCH> st;
    const int row = blockIdx.x;
    const int n0 = (blockIdx.y * NT + threadIdx.x) * V;
    const int nv = min(V, N - n0);
    const T* xr = x + (i64)row * D;
    float acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = 0.0f;
    gated_csr_row<T, I, NT, V, BATCH>(st, indptr[row], indptr[row + 1], indices, data, xr, w_up, D, aligned_d,
                                         w_down, N, n0, nv, aligned_n, acc);
    if (nv > 0) sc::store_vec_n<T, V>(out + (i64)row * N + n0, nv, acc);
}
