// sparsecore CUDA C: helpers shared by every kernel (compiled by NVRTC, no host headers).
//
// Value types: float, __half, __nv_bfloat16. Every kernel accumulates in float32.
// Vector loads: `load_vec<T, V>` reads V consecutive values as one 16/8/4-byte transaction when the
// caller says the address is aligned (host checks pointer and row pitch), and falls back to scalar
// loads otherwise, so odd shapes stay correct.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define SC_WARP 32
#define SC_FULL 0xffffffffu
// Launch bounds: NVRTC 13's ptxas for sm_90 puts an 8-byte stack frame (and 4-8 bytes of spill) on
// a few kernels when __launch_bounds__ is given, and none without it; every launch uses exactly NT
// threads and the register counts stay far below 65536 / NT, so the bound is not needed. The compile
// tier fails on any spill, so a compiler that behaves can turn it back on with -DSC_USE_LAUNCH_BOUNDS.
#ifdef SC_USE_LAUNCH_BOUNDS
#define SC_BOUNDS(nt) __launch_bounds__(nt)
#else
#define SC_BOUNDS(nt)
#endif
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

namespace sc {

typedef long long i64;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Raw 16-bit pattern of a value: ReLU and the keep test work on floats, the store keeps the bits.
template <int BYTES> struct VecType;
template <> struct VecType<2> { typedef unsigned short t; };
template <> struct VecType<4> { typedef unsigned int t; };
template <> struct VecType<8> { typedef uint2 t; };
template <> struct VecType<16> { typedef uint4 t; };

// V consecutive values of p (p[0..V-1], all in bounds) into float registers.
template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, bool aligned, float (&out)[V]) {
    constexpr int BYTES = V * (int)sizeof(T);
    if (BYTES % 16 == 0 && aligned) {  // one or more 16-byte loads (head_dim 256 in float32: two)
#pragma unroll
        for (int c = 0; c < BYTES / 16; ++c) {
            uint4 w = __ldg(reinterpret_cast<const uint4*>(p) + c);
            const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
            for (int i = 0; i < 16 / (int)sizeof(T); ++i) out[c * (16 / (int)sizeof(T)) + i] = to_f(e[i]);
        }
    } else if ((BYTES == 4 || BYTES == 8) && aligned) {
        typedef typename VecType<BYTES == 8 ? 8 : 4>::t W;
        W w = __ldg(reinterpret_cast<const W*>(p));
        const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
        for (int i = 0; i < V; ++i) out[i] = to_f(e[i]);
    } else {
#pragma unroll
        for (int i = 0; i < V; ++i) out[i] = to_f(p[i]);
    }
}

// Up to V values with a bound: lanes at the ragged end of a row read only what exists.
template <typename T, int V>
__device__ __forceinline__ void load_vec_n(const T* __restrict__ p, int n, bool aligned, float (&out)[V]) {
    if (n >= V) {
        load_vec<T, V>(p, aligned, out);
    } else {
#pragma unroll
        for (int i = 0; i < V; ++i) out[i] = i < n ? to_f(p[i]) : 0.0f;
    }
}

template <typename T, int V>
__device__ __forceinline__ void store_vec_n(T* __restrict__ p, int n, const float (&v)[V]) {
#pragma unroll
    for (int i = 0; i < V; ++i)
        if (i < n) p[i] = from_f<T>(v[i]);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(SC_FULL, v, o);
    return v;
}

// Exclusive prefix of `flag` over the block in thread order (.x), and the block total (.y). `scratch` holds
// one int per warp (NT / 32). Two barriers; every thread of the block must call it.
template <int NT>
__device__ __forceinline__ int2 block_prefix(int flag, int* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned ballot = __ballot_sync(SC_FULL, flag);
    int in_warp = __popc(ballot & ((1u << lane) - 1u));
    if (lane == 0) scratch[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, all = 0;
#pragma unroll
    for (int w = 0; w < NT / 32; ++w) {
        int c = scratch[w];
        before += w < warp ? c : 0;
        all += c;
    }
    __syncthreads();  // scratch may be reused by the caller's next call
    return make_int2(before + in_warp, all);  // (exclusive prefix, block total)
}

// float -> uint32 whose unsigned order is the float order; NaN maps to 0 (below -inf), as NumPy's
// argsort of -score puts NaN last.
__device__ __forceinline__ unsigned order_key(float f) {
    if (f != f) return 0u;
    unsigned u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

}  // namespace sc
