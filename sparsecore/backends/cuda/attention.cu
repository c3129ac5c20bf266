// sparsecore CUDA C: decode attention (dense and sparse split-K decode, merge) and top-k selection.
//
// Buffers (C-contiguous):
//   q[B, Hq, D] value T; query head h reads KV head h / group (group = Hq / Hkv).
//   dense cache (paged == 0): k, v[B, S, Hkv, D] T, `S` = max_len.
//   paged cache (paged == 1): k, v[P, page_size, Hkv, D] T; page_table[B, max_pages] int32.
//   lengths[B] int32.
//   page bounds (Quest metadata): kmin, kmax[B, P, Hkv, D] T, logical pages of `ipage` tokens.
//   index (sparse decode): indices[B, G, k_max] int32, counts[B, G] int32; G = Hkv (shared: one
//   block serves the whole group and reads every selected KV row once) or Hq (per head).
//   mode: 0 dense (every token < length), 1 token indices, 2 page indices of `ipage` tokens.
//   o_part[splits, B, Hq, D] float32 and lse_part[splits, B, Hq] float32: split-K partials.
// Empty attention is out 0, lse -inf (the identity of the merge), so empty splits need no care.
// Non-finite scores (docs/ops.md): NaN or +inf make out and lse NaN; a -inf score weighs exactly 0,
// also while every score so far is -inf (no exp(-inf - -inf)); every selected value enters as
// weight * v, so 0 * NaN stays NaN; all scores -inf: out = that sum (0 or NaN), lse = -inf.
#include "common.cuh"

#define SC_NAN __int_as_float(0x7fc00000)

using sc::i64;

struct KvView {
    const void* k;
    const void* v;
    const int* page_table;
    const int* lengths;
    int paged, S, page_size, max_pages, Hkv, D;
};

template <typename T>
__device__ __forceinline__ i64 kv_row(const KvView& kv, int b, int t, int kvh) {
    if (kv.paged) {
        const int page = kv.page_table[(i64)b * kv.max_pages + t / kv.page_size];
        return (((i64)page * kv.page_size + t % kv.page_size) * kv.Hkv + kvh) * kv.D;
    }
    return (((i64)b * kv.S + t) * kv.Hkv + kvh) * kv.D;
}

// Token of key number `i` of a row, or -1 when it is past the sequence (a partial last page).
__device__ __forceinline__ int key_token(int mode, const int* __restrict__ sel, int ipage, int i, int length) {
    if (mode == 0) return i;
    if (mode == 1) return sel[i];
    const int t = sel[i / ipage] * ipage + i % ipage;
    return t < length ? t : -1;
}

__device__ __forceinline__ int row_keys(int mode, int count, int ipage, int length) {
    return mode == 0 ? length : (mode == 1 ? count : count * ipage);
}

// ---- split-K decode ------------------------------------------------------------------------------
// Grid (splits, rows, B) with rows = Hkv when the block serves a whole GQA group (dense decode and
// shared selections) or Hq (per-head selections). NT threads = NT/32 warps. Lane l holds elements
// [l*VPL, l*VPL + VPL) of D (D <= 32 * VPL), so a K or V row is one coalesced 32 * VPL * sizeof(T)
// read. Each warp runs an online softmax over keys i = split_lo + warp, + NT/32, ... for up to GMAX
// query heads at once (the K and V rows are loaded once for all of them), then the warps' states
// are merged through shared memory and the split's partial (or, with one split, the result) is
// written.
#define SC_KV_PARAMS                                                                                     \
    const void *kv_k, const void *kv_v, const int *kv_page_table, const int *kv_lengths, int kv_paged, int kv_S, \
        int kv_page_size, int kv_max_pages, int kv_Hkv, int kv_D
#define SC_KV_MAKE                                                                                   \
    const KvView kv = {kv_k, kv_v, kv_page_table, kv_lengths, kv_paged, kv_S, kv_page_size, kv_max_pages, \
                       kv_Hkv, kv_D}

// One key into the online softmax of up to GMAX heads: s = q . k (q pre-scaled), rescale, add p * v.
template <int VPL, int GMAX>
__device__ __forceinline__ void online_update(int nh, const float (&qr)[GMAX][VPL], const float (&kr)[VPL],
                                              const float (&vr)[VPL], float (&m)[GMAX], float (&l)[GMAX],
                                              float (&acc)[GMAX][VPL]) {
#pragma unroll
    for (int h = 0; h < GMAX; ++h) {
        if (h < nh) {
            float s = 0.0f;
#pragma unroll
            for (int j = 0; j < VPL; ++j) s = fmaf(qr[h][j], kr[j], s);
            s = sc::warp_sum(s);
            const float mn = fmaxf(m[h], s);  // fmaxf drops a NaN score: it makes p NaN below
            const float corr = mn == -INFINITY ? 1.0f : expf(m[h] - mn);  // m = -inf at first: exp(-inf) = 0
            const float p = s == -INFINITY ? 0.0f : expf(s - mn);       // -inf weighs 0; NaN, +inf: NaN
            l[h] = l[h] * corr + p;
#pragma unroll
            for (int j = 0; j < VPL; ++j) acc[h][j] = fmaf(acc[h][j], corr, p * vr[j]);
            m[h] = mn;
        }
    }
}

template <typename T, int NT, int VPL, int GMAX>
__global__ void SC_BOUNDS(NT) decode_split(const T* __restrict__ q, int Hq, SC_KV_PARAMS, int group, int per_head,
                                                   int mode, const int* __restrict__ indices,
                                                   const int* __restrict__ counts, int G, int k_max, int ipage,
                                                   int chunk, float scale, int aligned, float* __restrict__ o_part,
                                                   float* __restrict__ lse_part, T* __restrict__ out,
                                                   float* __restrict__ lse_out) {
    SC_KV_MAKE;
    constexpr int NW = NT / 32;
    __shared__ float sm_m[NW][GMAX], sm_l[NW][GMAX];
    __shared__ float sm_o[NW][GMAX][32 * VPL];
    const int split = blockIdx.x, r = blockIdx.y, b = blockIdx.z, B = gridDim.z, splits = gridDim.x;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int D = kv.D;
    const int kvh = per_head ? r / group : r;
    const int h0 = per_head ? r : r * group;
    const int nh = per_head ? 1 : group;  // <= GMAX (host guarantees)
    const int length = kv.lengths[b];
    const int ir = per_head ? (G == Hq ? r : r / group) : r;  // the index row this block reads
    const int* sel = mode == 0 ? nullptr : indices + ((i64)b * G + ir) * k_max;
    const int n_keys = row_keys(mode, mode == 0 ? 0 : counts[(i64)b * G + ir], ipage, length);
    const int lo = split * chunk, hi = min(n_keys, lo + chunk);
    const int d0 = lane * VPL, dn = min(VPL, D - d0);
    const T* K = static_cast<const T*>(kv.k);
    const T* Vv = static_cast<const T*>(kv.v);

    float qr[GMAX][VPL], acc[GMAX][VPL], m[GMAX], l[GMAX];
#pragma unroll
    for (int h = 0; h < GMAX; ++h) {
        m[h] = -INFINITY;
        l[h] = 0.0f;
#pragma unroll
        for (int i = 0; i < VPL; ++i) { acc[h][i] = 0.0f; qr[h][i] = 0.0f; }
        if (h < nh && dn > 0) {
            sc::load_vec_n<T, VPL>(q + ((i64)b * Hq + h0 + h) * D + d0, dn, aligned, qr[h]);
#pragma unroll
            for (int i = 0; i < VPL; ++i) qr[h][i] *= scale;
        }
    }
    // Two keys per iteration: both K/V row pairs are loaded before either is used, so each warp keeps
    // four row loads in flight (decode is latency-bound at the occupancy the registers allow).
    for (int i = lo + warp; i < hi; i += 2 * NW) {
        const int t1 = key_token(mode, sel, ipage, i, length);  // uniform over the warp
        const int t2 = i + NW < hi ? key_token(mode, sel, ipage, i + NW, length) : -1;
        float k1[VPL], v1[VPL], k2[VPL], v2[VPL];
        if (t1 >= 0) {
            const i64 off = kv_row<T>(kv, b, t1, kvh);
            sc::load_vec_n<T, VPL>(K + off + d0, max(dn, 0), aligned, k1);
            sc::load_vec_n<T, VPL>(Vv + off + d0, max(dn, 0), aligned, v1);
        }
        if (t2 >= 0) {
            const i64 off = kv_row<T>(kv, b, t2, kvh);
            sc::load_vec_n<T, VPL>(K + off + d0, max(dn, 0), aligned, k2);
            sc::load_vec_n<T, VPL>(Vv + off + d0, max(dn, 0), aligned, v2);
        }
        if (t1 >= 0) online_update<VPL, GMAX>(nh, qr, k1, v1, m, l, acc);
        if (t2 >= 0) online_update<VPL, GMAX>(nh, qr, k2, v2, m, l, acc);
    }
    // merge the warps' states
#pragma unroll
    for (int h = 0; h < GMAX; ++h) {
        if (lane == 0) { sm_m[warp][h] = m[h]; sm_l[warp][h] = l[h]; }
#pragma unroll
        for (int j = 0; j < VPL; ++j) sm_o[warp][h][d0 + j] = acc[h][j];
    }
    __syncthreads();
    for (int e = threadIdx.x; e < nh * D; e += NT) {
        const int h = e / D, d = e - h * D;
        float mx = -INFINITY;
#pragma unroll
        for (int w = 0; w < NW; ++w) mx = fmaxf(mx, sm_m[w][h]);
        float ls = 0.0f, os = 0.0f;
#pragma unroll
        for (int w = 0; w < NW; ++w) {
            const float c = mx == -INFINITY ? 1.0f : expf(sm_m[w][h] - mx);
            ls += sm_l[w][h] * c;
            os += sm_o[w][h][d] * c;
        }
        // ls > 0: the softmax; ls == 0 (no key, every score -inf): os (0, or NaN from 0 * v); NaN: NaN
        const float o = ls > 0.0f ? os / ls : (ls == 0.0f ? os : SC_NAN);
        const float lse = ls > 0.0f ? mx + logf(ls) : (ls == 0.0f ? -INFINITY : SC_NAN);
        const i64 bh = (i64)b * Hq + h0 + h;
        if (splits == 1) {
            out[bh * D + d] = sc::from_f<T>(o);
            if (d == 0) lse_out[bh] = lse;
        } else {
            o_part[((i64)split * B * Hq + bh) * D + d] = o;
            if (d == 0) lse_part[(i64)split * B * Hq + bh] = lse;
        }
    }
}

// Grid (B * Hq), NT threads: merge the splits' partials by their log-sum-exp.
template <typename T, int NT>
__global__ void SC_BOUNDS(NT) decode_merge(const float* __restrict__ o_part, const float* __restrict__ lse_part,
                                                   int splits, i64 BH, int D, T* __restrict__ out,
                                                   float* __restrict__ lse_out) {
    const i64 bh = blockIdx.x;
    float mx = -INFINITY;
    bool nan = false;
    for (int s = 0; s < splits; ++s) {
        const float x = lse_part[s * BH + bh];
        nan |= x != x;
        mx = fmaxf(mx, x);
    }
    // an empty split (lse -inf) weighs exactly 0 but enters as 0 * o (NaN stays NaN); a NaN split: NaN
    float den = 0.0f;
    for (int s = 0; s < splits; ++s) {
        const float x = lse_part[s * BH + bh];
        den += x == -INFINITY ? 0.0f : expf(x - mx);
    }
    for (int d = threadIdx.x; d < D; d += NT) {
        float o = 0.0f;
        for (int s = 0; s < splits; ++s) {
            const float x = lse_part[s * BH + bh];
            o += (x == -INFINITY ? 0.0f : expf(x - mx)) * o_part[(s * BH + bh) * D + d];
        }
        out[bh * D + d] = sc::from_f<T>(nan ? SC_NAN : (den > 0.0f ? o / den : o));
    }
    if (threadIdx.x == 0) lse_out[bh] = nan ? SC_NAN : (den > 0.0f ? mx + logf(den) : -INFINITY);
}

// ---- merge_attention: elementwise over rows of D --------------------------------------------------
// Grid-stride over rows * D elements. L is float or double (lse dtype); the output lse is float32.
template <typename T, typename L>
__global__ void merge_attention(const T* __restrict__ o1, const L* __restrict__ lse1, const T* __restrict__ o2,
                                const L* __restrict__ lse2, i64 rows, int D, T* __restrict__ out,
                                float* __restrict__ lse_out) {
    const int Dm = D > 0 ? D : 1;  // D == 0 still writes every row's lse
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < rows * Dm; i += (i64)gridDim.x * blockDim.x) {
        const i64 r = i / Dm;
        const double l1 = (double)lse1[r], l2 = (double)lse2[r];
        double lse;
        if (l1 != l1 || l2 != l2) {
            lse = SC_NAN;
        } else if (l1 == INFINITY || l2 == INFINITY) {
            lse = INFINITY;
        } else if (l1 == -INFINITY && l2 == -INFINITY) {
            lse = -INFINITY;
        } else {
            // log-add-exp in double so lse agrees with the reference's to float32 rounding
            const double mx = fmax(l1, l2);
            lse = mx + log(exp(l1 - mx) + exp(l2 - mx));
        }
        // a side with lse -inf weighs exactly 0 but enters as 0 * o (NaN stays NaN); NaN, +inf: NaN
        const double w1 = l1 == -INFINITY ? 0.0 : exp(l1 - lse);
        const double w2 = l2 == -INFINITY ? 0.0 : exp(l2 - lse);
        if (D > 0) out[i] = sc::from_f<T>((float)(sc::to_f(o1[i]) * w1 + sc::to_f(o2[i]) * w2));
        if (i % Dm == 0) lse_out[r] = (float)lse;
    }
}

// ---- page_bounds -----------------------------------------------------------------------------------
// Quest metadata: kmin/kmax[b, j, h, i] = min/max of K[b, t, h, i] over the valid tokens t of logical
// page j (j * ipage <= t < min((j + 1) * ipage, lengths[b])). Grid (X, B), NT threads: block x walks
// pages first[b] + x, + X, ... with its threads over the Hkv * D contiguous values of a token row
// (coalesced, dense and paged), tokens in order. X comes from shapes only (enough blocks to fill
// the GPU), so an update of one page per sequence costs B * X mostly idle blocks, not B * P. The
// stored T value is kept (no float round trip), so the result is bit-exact; a NaN key makes the
// bound NaN (as NumPy's min/max); of -0.0 and 0.0 the first seen is kept. first[b] = start[b] / ipage
// with has_start, else 0. Pages at or past ceil(lengths[b] / ipage) are set to 0 when zero_rest (a
// fresh buffer: no separate memset) and left alone otherwise.
template <typename T, int NT>
__global__ void SC_BOUNDS(NT) page_bounds(SC_KV_PARAMS, int ipage, int P, int has_start,
                                                  const int* __restrict__ start, int zero_rest,
                                                  T* __restrict__ kmin, T* __restrict__ kmax) {
    SC_KV_MAKE;
    const int b = blockIdx.y;
    const int length = kv.lengths[b];
    const int n_pages = min((length + ipage - 1) / ipage, P);
    const int first = has_start ? start[b] / ipage : 0;
    const int last = zero_rest ? P : n_pages;
    const int HD = kv.Hkv * kv.D;
    const T* K = static_cast<const T*>(kv.k);
    for (int j = first + blockIdx.x; j < last; j += gridDim.x) {
        const i64 obase = ((i64)b * P + j) * HD;
        if (j >= n_pages) {
            for (int e = threadIdx.x; e < HD; e += NT) {
                kmin[obase + e] = sc::from_f<T>(0.0f);
                kmax[obase + e] = sc::from_f<T>(0.0f);
            }
            continue;
        }
        const int t0 = j * ipage, t1 = min(length, t0 + ipage);
        for (int e = threadIdx.x; e < HD; e += NT) {
            const T x0 = K[kv_row<T>(kv, b, t0, 0) + e];
            T lo = x0, hi = x0;
            float flo = sc::to_f(x0), fhi = flo;
            for (int t = t0 + 1; t < t1; ++t) {
                const T x = K[kv_row<T>(kv, b, t, 0) + e];
                const float f = sc::to_f(x);
                // a NaN bound stays NaN; a NaN key becomes the bound
                if (flo == flo && (f < flo || f != f)) { lo = x; flo = f; }
                if (fhi == fhi && (f > fhi || f != f)) { hi = x; fhi = f; }
            }
            kmin[obase + e] = lo;
            kmax[obase + e] = hi;
        }
    }
}

// ---- select_topk ---------------------------------------------------------------------------------
// max(x, y) that is NaN when either is, as np.maximum (fmaxf drops a NaN).
__device__ __forceinline__ float nan_max(float x, float y) { return (x > y || x != x) ? x : y; }

// Scores of every unit (token or page) for each selection row g: scores[B, G, n_units] float32.
// Exact (quest == 0): q . k summed over the heads of the row. Quest (quest == 1, unit = `ipage`
// tokens): sum_i max(q_i * min_i, q_i * max_i) over the page's valid tokens, summed over the heads;
// with has_bounds, min/max are read from bmin/bmax[B, bP, Hkv, D] (page_bounds: 2 rows a page
// instead of `ipage`), which hold exactly the values the keys give, so the scores are the same.
// Grid (ceil(n_units / NW), G, B), NT threads: one warp per unit, lanes over D.
template <typename T, int NT, int VPL>
__global__ void SC_BOUNDS(NT) topk_scores(const T* __restrict__ q, int Hq, SC_KV_PARAMS, int group, int per_head,
                                                  int quest, int ipage, int n_units, int has_bounds,
                                                  const T* __restrict__ bmin, const T* __restrict__ bmax,
                                                  int bP, int aligned, float* __restrict__ scores) {
    SC_KV_MAKE;
    constexpr int NW = NT / 32;
    const int g = blockIdx.y, b = blockIdx.z, G = gridDim.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int u = blockIdx.x * NW + warp;
    if (u >= n_units) return;  // whole warp
    const int D = kv.D;
    const int kvh = per_head ? g / group : g;
    const int h0 = per_head ? g : g * group;
    const int nh = per_head ? 1 : group;
    const int length = kv.lengths[b];
    const int d0 = lane * VPL, dn = max(min(VPL, D - d0), 0);
    const T* K = static_cast<const T*>(kv.k);
    float s = -INFINITY;  // units past the sequence: never candidates (the select kernel skips them)
    const int n_valid = quest ? (length + ipage - 1) / ipage : length;
    if (u < n_valid) {
        float kr[VPL], lo[VPL], hi[VPL];
        if (!quest) {
            sc::load_vec_n<T, VPL>(K + kv_row<T>(kv, b, u, kvh) + d0, dn, aligned, kr);
        } else if (has_bounds) {
            const i64 off = (((i64)b * bP + u) * kv.Hkv + kvh) * D + d0;
            sc::load_vec_n<T, VPL>(bmin + off, dn, aligned, lo);
            sc::load_vec_n<T, VPL>(bmax + off, dn, aligned, hi);
        } else {
#pragma unroll
            for (int j = 0; j < VPL; ++j) { lo[j] = INFINITY; hi[j] = -INFINITY; }
            const int t1 = min(length, (u + 1) * ipage);
            for (int t = u * ipage; t < t1; ++t) {
                sc::load_vec_n<T, VPL>(K + kv_row<T>(kv, b, t, kvh) + d0, dn, aligned, kr);
#pragma unroll
                for (int j = 0; j < VPL; ++j) {  // NaN propagates, as NumPy's min/max and page_bounds
                    if (lo[j] == lo[j] && (kr[j] < lo[j] || kr[j] != kr[j])) lo[j] = kr[j];
                    if (hi[j] == hi[j] && (kr[j] > hi[j] || kr[j] != kr[j])) hi[j] = kr[j];
                }
            }
        }
        float part = 0.0f;
        for (int h = 0; h < nh; ++h) {  // q rows re-read per unit: L1 hits
            float qv[VPL];
#pragma unroll
            for (int j = 0; j < VPL; ++j) qv[j] = 0.0f;
            if (dn > 0) sc::load_vec_n<T, VPL>(q + ((i64)b * Hq + h0 + h) * D + d0, dn, aligned, qv);
#pragma unroll
            for (int j = 0; j < VPL; ++j) {
                if (j < dn) part += quest ? nan_max(qv[j] * lo[j], qv[j] * hi[j]) : qv[j] * kr[j];
            }
        }
        s = sc::warp_sum(part);
    }
    if (lane == 0) scores[((i64)b * G + g) * n_units + u] = s;
}

// topk_scores over the int8 copy of the keys (KeyCodes: codes[B, S, Hkv, D] int8 in token order,
// kscales[B, S, Hkv] float32): token t stands for codes[b, t, kvh] * kscales[b, t, kvh], so the
// score is kscales[b, t, kvh] * (q . codes[b, t, kvh]) summed over the row's heads; a NaN scale (a
// non-finite key) gives NaN. Same grid and layout as topk_scores (exact, tokens only).
template <typename T, int NT, int VPL>
__global__ void SC_BOUNDS(NT) topk_scores_int8(const T* __restrict__ q, int Hq, const signed char* __restrict__ codes,
                                                       const float* __restrict__ kscales,
                                                       const int* __restrict__ lengths, int S, int Hkv, int D,
                                                       int group, int per_head, int n_units, int aligned,
                                                       float* __restrict__ scores) {
    constexpr int NW = NT / 32;
    const int g = blockIdx.y, b = blockIdx.z, G = gridDim.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int u = blockIdx.x * NW + warp;
    if (u >= n_units) return;  // whole warp
    const int kvh = per_head ? g / group : g;
    const int h0 = per_head ? g : g * group;
    const int nh = per_head ? 1 : group;
    const int d0 = lane * VPL, dn = max(min(VPL, D - d0), 0);
    float s = -INFINITY;  // tokens past the sequence: never candidates (the select kernel skips them)
    if (u < lengths[b]) {
        const i64 row = ((i64)b * S + u) * Hkv + kvh;
        const signed char* c = codes + row * D + d0;
        float kr[VPL];
#pragma unroll
        for (int j = 0; j < VPL; ++j) kr[j] = j < dn ? (float)c[j] : 0.0f;
        float part = 0.0f;
        for (int h = 0; h < nh; ++h) {
            float qv[VPL];
#pragma unroll
            for (int j = 0; j < VPL; ++j) qv[j] = 0.0f;
            if (dn > 0) sc::load_vec_n<T, VPL>(q + ((i64)b * Hq + h0 + h) * D + d0, dn, aligned, qv);
#pragma unroll
            for (int j = 0; j < VPL; ++j) part += qv[j] * kr[j];
        }
        s = sc::warp_sum(part) * kscales[row];
    }
    if (lane == 0) scores[((i64)b * G + g) * n_units + u] = s;
}

// int8 ranking with rescore: after topk_select chose the row's pool (pool[B, G, pool_max], the
// `rescore` best by the int8 score, forced units included), the row's scores become NaN (ranked
// below every score) except the pool's non-forced units, which get their exact score from the keys
// (q . k summed over the row's heads); topk_select of these keeps the k best of the pool. Grid (G,
// B), NT threads: one row, a thread per pool entry.
template <typename T, int NT>
__global__ void SC_BOUNDS(NT) rescore_pool(const T* __restrict__ q, int Hq, SC_KV_PARAMS, int group, int per_head,
                                                   int sink, int window, const int* __restrict__ pool,
                                                   const int* __restrict__ pool_counts, int pool_max, int n_units,
                                                   float* __restrict__ scores) {
    SC_KV_MAKE;
    const int g = blockIdx.x, b = blockIdx.y, G = gridDim.x;
    const i64 row = (i64)b * G + g;
    float* sr = scores + row * n_units;
    for (int t = threadIdx.x; t < n_units; t += NT) sr[t] = SC_NAN;
    __syncthreads();
    const int D = kv.D;
    const int kvh = per_head ? g / group : g;
    const int h0 = per_head ? g : g * group;
    const int nh = per_head ? 1 : group;
    const int length = kv.lengths[b];
    const T* K = static_cast<const T*>(kv.k);
    const int n = pool_counts[row];
    for (int e = threadIdx.x; e < n; e += NT) {
        const int t = pool[row * pool_max + e];
        if (t < sink || (window > 0 && t >= length - window)) continue;
        const i64 off = kv_row<T>(kv, b, t, kvh);
        float tot = 0.0f;
        for (int h = 0; h < nh; ++h) {
            const T* qr = q + ((i64)b * Hq + h0 + h) * D;
            float a = 0.0f;
            for (int d = 0; d < D; ++d) a += sc::to_f(qr[d]) * sc::to_f(K[off + d]);
            tot += a;
        }
        sr[t] = tot;
    }
}

// Is unit u (token, or page of ipage tokens) of a sequence of `length` tokens forced (sink/window)?
__device__ __forceinline__ bool is_forced(int u, int quest, int ipage, int length, int sink, int window) {
    if (!quest) return u < sink || (window > 0 && u >= length - window);
    const int first = u * ipage, last = min((u + 1) * ipage, length) - 1;
    return first < sink || (window > 0 && last >= max(length - window, 0));
}

// Grid (G, B), NT threads: one selection row. Exact top-k of the non-forced candidates by a 4-pass
// radix select (8 bits a pass, shared histogram) for the k-th largest key, then an ordered block
// compaction that writes the forced units, the keys above the threshold and the first ties at it,
// in ascending unit order. counts = n_forced + min(k, n_candidates); the rest of the row is -1.
template <int NT>
__global__ void SC_BOUNDS(NT) topk_select(const float* __restrict__ scores, int n_units,
                                                  const int* __restrict__ lengths, int quest, int ipage, int k,
                                                  int sink, int window, int k_max, int* __restrict__ indices,
                                                  int* __restrict__ counts) {
    __shared__ unsigned hist[256];
    __shared__ int scratch[NT / 32];
    __shared__ unsigned s_prefix;
    __shared__ int s_need;
    const int g = blockIdx.x, b = blockIdx.y, G = gridDim.x;
    const i64 row = (i64)b * G + g;
    const float* sr = scores + row * n_units;
    int* out = indices + row * k_max;
    const int length = lengths[b];
    const int n_valid = min(n_units, quest ? (length + ipage - 1) / ipage : length);
    // number of non-forced candidates
    int n_cand = 0;
    for (int c0 = 0; c0 < n_valid; c0 += NT) {
        const int u = c0 + threadIdx.x;
        const int tot =
            sc::block_prefix<NT>(u < n_valid && !is_forced(u, quest, ipage, length, sink, window), scratch).y;
        n_cand += tot;
    }
    const int take = min(k, n_cand);
    // radix select: the take-th largest key among candidates (prefix narrows 8 bits a pass)
    unsigned prefix = 0u;
    int need = take;  // how many still to find at or below the current prefix
    if (take > 0) {
        for (int pass = 0; pass < 4; ++pass) {
            const int shift = 24 - 8 * pass;
            const unsigned hmask = pass == 0 ? 0u : (0xffffffffu << (shift + 8));
            for (int i = threadIdx.x; i < 256; i += NT) hist[i] = 0u;
            __syncthreads();
            for (int u = threadIdx.x; u < n_valid; u += NT) {
                if (is_forced(u, quest, ipage, length, sink, window)) continue;
                const unsigned key = sc::order_key(sr[u]);
                if ((key & hmask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
            }
            __syncthreads();
            if (threadIdx.x == 0) {
                int acc = 0, bin = 255;
                for (; bin > 0; --bin) {  // from the top: the bin where the running count reaches need
                    if (acc + (int)hist[bin] >= need) break;
                    acc += (int)hist[bin];
                }
                s_prefix = prefix | ((unsigned)bin << shift);
                s_need = need - acc;
            }
            __syncthreads();
            prefix = s_prefix;
            need = s_need;
            __syncthreads();
        }
    }
    // prefix is the threshold key; take every candidate above it and the first `need` equal to it
    int written = 0, ties = 0;
    for (int c0 = 0; c0 < n_valid; c0 += NT) {
        const int u = c0 + threadIdx.x;
        int pick = 0, tie = 0;
        if (u < n_valid) {
            if (is_forced(u, quest, ipage, length, sink, window)) {
                pick = 1;
            } else if (take > 0) {
                const unsigned key = sc::order_key(sr[u]);
                pick = key > prefix;
                tie = key == prefix;
            }
        }
        const int2 bp_tie_rank = sc::block_prefix<NT>(tie, scratch);
        const int tie_total = bp_tie_rank.y;
        const int tie_rank = ties + bp_tie_rank.x;
        if (tie && tie_rank < need) pick = 1;
        ties += tie_total;
        const int2 bp_pos = sc::block_prefix<NT>(pick, scratch);
        const int total = bp_pos.y;
        const int pos = written + bp_pos.x;
        if (pick && pos < k_max) out[pos] = u;
        written += total;
    }
    for (int j = written + threadIdx.x; j < k_max; j += NT) out[j] = -1;
    if (threadIdx.x == 0) counts[row] = min(written, k_max);
}

// The max (take_max) or the sum of v over the block, through red[NT]; every thread gets it (NaN never
// wins a max: the callers pass none). A barrier per level and two more; every thread of the block must call it.
template <int NT>
__device__ __forceinline__ float block_reduce(float v, bool take_max, float* red) {
    red[threadIdx.x] = v;
    __syncthreads();
    for (int stride = NT / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) {
            const float o = red[threadIdx.x + stride];
            red[threadIdx.x] = take_max ? (o > red[threadIdx.x] ? o : red[threadIdx.x]) : red[threadIdx.x] + o;
        }
        __syncthreads();
    }
    const float r = red[0];
    __syncthreads();
    return r;
}

// ---- mass ranking of every key (select_topk with candidates covering every key) ----------------------
// Grid (G, B), NT threads: one selection row. mass[b, g, t] for t < lengths[b] = the mean over the row's
// query heads (the group's when shared, query head g alone otherwise) of each head's softmax of
// scale * ph[b, h, t] over every key of the sequence (ph[B, Hq, n_units]: topk_scores with per_head = 1,
// each head's own q . k), as the reference's softmax_mass: a NaN score carries no mass, a head whose
// maximum is +inf gives its mass to its +inf keys in equal shares, a head with every score -inf gives
// none. float32 (masses under float32's smallest tie at 0, taken in position order); topk_select then
// keeps the forced units and the k of highest mass.
template <int NT>
__global__ void SC_BOUNDS(NT) mass_of_every_key(const float* __restrict__ ph, int n_units,
                                                        const int* __restrict__ lengths, int group, int shared,
                                                        float scale, float* __restrict__ mass) {
    __shared__ float red[NT];
    const int g = blockIdx.x, b = blockIdx.y, G = gridDim.x;
    const int hq = shared ? G * group : G;
    const int nh = shared ? group : 1, h0 = shared ? g * group : g;
    const int length = min(lengths[b], n_units);
    float* out = mass + ((i64)b * G + g) * n_units;
    for (int t = threadIdx.x; t < length; t += NT) out[t] = 0.0f;
    for (int i = 0; i < nh; ++i) {
        const float* row = ph + ((i64)b * hq + h0 + i) * n_units;
        float m = -INFINITY;
        for (int t = threadIdx.x; t < length; t += NT) {
            const float v = scale * row[t];
            if (v > m) m = v;  // NaN never is
        }
        m = block_reduce<NT>(m, true, red);
        if (m == -INFINITY) continue;  // the same for every thread: no key of this head is known to matter
        float z = 0.0f;
        for (int t = threadIdx.x; t < length; t += NT) {
            const float v = scale * row[t];
            if (m == INFINITY) z += v == INFINITY ? 1.0f : 0.0f;
            else if (v == v) z += expf(v - m);
        }
        z = block_reduce<NT>(z, false, red);
        const float inv = 1.0f / (z * (float)nh);
        for (int t = threadIdx.x; t < length; t += NT) {
            const float v = scale * row[t];
            const float p = m == INFINITY ? (v == INFINITY ? 1.0f : 0.0f) : (v == v ? expf(v - m) : 0.0f);
            out[t] += p * inv;
        }
    }
}

// ---- the adaptive budget (select_topk with top_p) ------------------------------------------------------
// Grid (G, B), NT threads: one selection row, after topk_select chose the forced units and the k
// non-forced units of highest mass[b, g, u] (mass_of_every_key): keep of those the fewest, in
// descending mass, that bring the row's kept mass (the forced units' to start) to top_p, at least
// k_min (the reference's top_p_count), in place: indices stay ascending, padded with -1, counts is
// updated. The row's non-forced entries (n_sort, a power of two >= k) are sorted by descending mass
// (bitonic; ties by position) and summed in float32 on one thread. The sort runs in shared memory
// when ws_m is null (n_sort and the row's entries at most CAP), else in the row's slices of the
// global workspaces ws_m, ws_p [B * G, n_sort] and ws_keep [B * G, k_max] (any size; slower).
template <int NT, int CAP>
__global__ void SC_BOUNDS(NT) top_p_cut(const float* __restrict__ mass, int n_units, const int* __restrict__ lengths,
                                                int sink, int window, float top_p, int k_min, int n_sort, int k_max,
                                                int* __restrict__ indices, int* __restrict__ counts,
                                                float* ws_m, int* ws_p, int* ws_keep) {
    __shared__ float sm_shared[CAP];
    __shared__ int sp_shared[CAP];
    __shared__ int keep_shared[CAP];
    __shared__ int scratch[NT / 32];
    __shared__ float red[NT];
    __shared__ int s_n;
    const int g = blockIdx.x, b = blockIdx.y, G = gridDim.x;
    const i64 row = (i64)b * G + g;
    const float* mr = mass + row * n_units;
    int* out = indices + row * k_max;
    const int length = lengths[b];
    const int n_sel = counts[row];
    const bool global = ws_m != nullptr;
    float* sm = global ? ws_m + row * n_sort : sm_shared;
    int* sp = global ? ws_p + row * n_sort : sp_shared;
    int* keep = global ? ws_keep + row * k_max : keep_shared;
    // the forced entries' mass; the non-forced entries (mass, place in the row) packed in front
    float fm = 0.0f;
    int n_free = 0;
    for (int e0 = 0; e0 < n_sel; e0 += NT) {
        const int e = e0 + threadIdx.x;
        int forced = 0, free = 0, u = -1;
        if (e < n_sel) {
            u = out[e];
            forced = is_forced(u, 0, 1, length, sink, window);
            free = !forced;
            if (forced) fm += mr[u];
            keep[e] = forced;
        }
        const int2 pos = sc::block_prefix<NT>(free, scratch);
        if (free) {
            sm[n_free + pos.x] = mr[u];
            sp[n_free + pos.x] = e;
        }
        n_free += pos.y;
    }
    for (int i = n_free + threadIdx.x; i < n_sort; i += NT) {  // padding sorts last
        sm[i] = -INFINITY;
        sp[i] = n_sort + i;
    }
    fm = block_reduce<NT>(fm, false, red);
    // bitonic sort of n_sort entries: descending mass, ties by ascending place
    for (int size = 2; size <= n_sort; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = threadIdx.x; i < n_sort; i += NT) {
                const int j = i ^ stride;
                if (j > i) {
                    const bool descending = (i & size) == 0;
                    const float mi = sm[i], mj = sm[j];
                    const bool before = mi > mj || (mi == mj && sp[i] < sp[j]);
                    if (before != descending) {
                        sm[i] = mj;
                        sm[j] = mi;
                        const int t = sp[i];
                        sp[i] = sp[j];
                        sp[j] = t;
                    }
                }
            }
            __syncthreads();
        }
    }
    // how many: the fewest whose running sum reaches top_p, clamped to [k_min, n_free]
    if (threadIdx.x == 0) {
        int need = n_free;
        if (fm >= top_p) {
            need = 0;
        } else {
            float cum = fm;
            for (int i = 0; i < n_free; ++i) {
                cum += sm[i];
                if (cum >= top_p) {
                    need = i + 1;
                    break;
                }
            }
        }
        s_n = min(max(need, k_min), n_free);
    }
    __syncthreads();
    const int n = s_n;
    for (int i = threadIdx.x; i < n; i += NT) keep[sp[i]] = 1;
    __syncthreads();
    // compact the kept entries in place (ascending, as they were): reads before writes, chunk by chunk
    int written = 0;
    for (int e0 = 0; e0 < n_sel; e0 += NT) {
        const int e = e0 + threadIdx.x;
        const int kept = e < n_sel ? keep[e] : 0;
        const int u = e < n_sel ? out[e] : -1;
        const int2 pos = sc::block_prefix<NT>(kept, scratch);
        if (kept) out[written + pos.x] = u;
        written += pos.y;
        __syncthreads();
    }
    for (int j = written + threadIdx.x; j < k_max; j += NT) out[j] = -1;
    if (threadIdx.x == 0) counts[row] = written;
}
