/* CRC-32 (zlib's) for the PBM ring's slot checksums: slicing-by-8 tables everywhere, and on x86-64
 * CPUs with PCLMULQDQ the carry-less-multiply folding of Gopal et al., "Fast CRC Computation for
 * Generic Polynomials Using PCLMULQDQ Instruction" (Intel, 2009), about 10x the table speed, with
 * 256-bit lanes (VPCLMULQDQ) where the CPU has them (AMD Zen 3+, Intel Ice Lake+), twice that, and
 * 512-bit ones with AVX-512 (Intel Ice Lake+, AMD Zen 4+): 4 KiB in 98 ns against 167 ns with 256-bit
 * lanes on the 2-core AMD EPYC VM (setting PBM_CRC32_NO_AVX512 before the module loads keeps the
 * 256-bit path, for comparison and for the tests of both). Why
 * not link zlib: its headers are not on every machine that can build this, and zlib's own CRC is
 * the table kind (2 us per 4 KiB record here, more than the rest of a push). */
#include "_pbm_crc32.h"

#include <stdlib.h>
#include <string.h>

#define POLY 0xEDB88320u

static uint32_t table[8][256];
static int use_pclmul, use_vpclmul, use_vpclmul512;

static uint32_t crc32_table(uint32_t c, const unsigned char *p, size_t n) {
    /* c is the raw register (already inverted). 8 bytes per step, one table per byte position. */
    while (n && ((uintptr_t)p & 7)) {
        c = table[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= c;  /* little-endian: the low byte is the first one */
        c = table[7][w & 0xFF] ^ table[6][(w >> 8) & 0xFF] ^ table[5][(w >> 16) & 0xFF] ^
            table[4][(w >> 24) & 0xFF] ^ table[3][(w >> 32) & 0xFF] ^ table[2][(w >> 40) & 0xFF] ^
            table[1][(w >> 48) & 0xFF] ^ table[0][w >> 56];
        p += 8;
        n -= 8;
    }
    while (n--)
        c = table[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

/* The fold constants for the reflected polynomial (x^k mod P, bit-reflected, 33 bits), from the
 * paper's appendix: k1 = x^(4*128+32), k2 = x^(4*128-32) fold 512 bits; k3 = x^(128+32),
 * k4 = x^(128-32) fold 128; k5 = x^64 reduces 96 to 64 bits; then Barrett with P' and mu.
 * K1_1024 = x^(1024+32), K2_1024 = x^(1024-32): the same rule for folding 1024 bits (4 x 256). */
#define K1 0x154442bd4ull
#define K2 0x1c6e41596ull
#define K1_1024 0x1e88ef372ull
#define K2_1024 0x14a7fe880ull
#define K1_2048 0x11542778aull  /* x^(2048+32), x^(2048-32): folding 2048 bits (4 x 512) */
#define K2_2048 0x1322d1430ull
#define K3 0x1751997d0ull
#define K4 0x0ccaa009eull
#define K5 0x163cd6124ull
#define P_PRIME 0x1db710641ull
#define MU 0x1f7011641ull

__attribute__((target("pclmul,sse4.1")))
static inline __m128i fold(__m128i acc, __m128i k, __m128i next) {
    /* acc * x^(distance) mod P, as two 64x64 carry-less products, xored into the next block */
    __m128i lo = _mm_clmulepi64_si128(acc, k, 0x00);
    __m128i hi = _mm_clmulepi64_si128(acc, k, 0x11);
    return _mm_xor_si128(_mm_xor_si128(lo, hi), next);
}

/* Folds the rest (a multiple of 16 bytes) into x0, then reduces 128 bits to the 32-bit register. */
__attribute__((target("pclmul,sse4.1")))
static uint32_t fold_tail(__m128i x0, const unsigned char *p, size_t n) {
    const __m128i k34 = _mm_set_epi64x((long long)K4, (long long)K3);
    while (n >= 16) {
        x0 = fold(x0, k34, _mm_loadu_si128((const __m128i *)p));
        p += 16;
        n -= 16;
    }
    /* 128 -> 96 bits: the low 64 bits times k4, added to the high 64 bits */
    const __m128i mask32 = _mm_setr_epi32(-1, 0, -1, 0);
    __m128i t = _mm_clmulepi64_si128(x0, k34, 0x10);
    x0 = _mm_xor_si128(_mm_srli_si128(x0, 8), t);
    /* 96 -> 64 bits: the low 32 bits times k5, added to the rest */
    const __m128i k5 = _mm_set_epi64x(0, (long long)K5);
    t = _mm_srli_si128(x0, 4);
    x0 = _mm_clmulepi64_si128(_mm_and_si128(x0, mask32), k5, 0x00);
    x0 = _mm_xor_si128(x0, t);
    /* Barrett reduction 64 -> 32 bits */
    const __m128i pm = _mm_set_epi64x((long long)MU, (long long)P_PRIME);
    t = _mm_clmulepi64_si128(_mm_and_si128(x0, mask32), pm, 0x10);
    t = _mm_clmulepi64_si128(_mm_and_si128(t, mask32), pm, 0x00);
    x0 = _mm_xor_si128(x0, t);
    return (uint32_t)_mm_extract_epi32(x0, 1);
}

/* n >= 64 and a multiple of 16; c is the raw register; returns the raw register. */
__attribute__((target("pclmul,sse4.1")))
static uint32_t crc32_pclmul(uint32_t c, const unsigned char *p, size_t n) {
    __m128i x0 = _mm_loadu_si128((const __m128i *)p);
    __m128i x1 = _mm_loadu_si128((const __m128i *)(p + 16));
    __m128i x2 = _mm_loadu_si128((const __m128i *)(p + 32));
    __m128i x3 = _mm_loadu_si128((const __m128i *)(p + 48));
    x0 = _mm_xor_si128(x0, _mm_cvtsi32_si128((int)c));
    p += 64;
    n -= 64;
    const __m128i k12 = _mm_set_epi64x((long long)K2, (long long)K1);
    while (n >= 64) {  /* four independent lanes, each folded 512 bits ahead */
        x0 = fold(x0, k12, _mm_loadu_si128((const __m128i *)p));
        x1 = fold(x1, k12, _mm_loadu_si128((const __m128i *)(p + 16)));
        x2 = fold(x2, k12, _mm_loadu_si128((const __m128i *)(p + 32)));
        x3 = fold(x3, k12, _mm_loadu_si128((const __m128i *)(p + 48)));
        p += 64;
        n -= 64;
    }
    const __m128i k34 = _mm_set_epi64x((long long)K4, (long long)K3);
    x0 = fold(x0, k34, x1);  /* the four lanes into one, 128 bits at a time */
    x0 = fold(x0, k34, x2);
    x0 = fold(x0, k34, x3);
    return fold_tail(x0, p, n);
}

__attribute__((target("avx2,vpclmulqdq,pclmul,sse4.1")))
static inline __m256i fold256(__m256i acc, __m256i k, __m256i next) {
    __m256i lo = _mm256_clmulepi64_epi128(acc, k, 0x00);
    __m256i hi = _mm256_clmulepi64_epi128(acc, k, 0x11);
    return _mm256_xor_si256(_mm256_xor_si256(lo, hi), next);
}

/* The same with eight 128-bit lanes in four 256-bit registers, 128 bytes per step; n >= 256. */
__attribute__((target("avx2,vpclmulqdq,pclmul,sse4.1")))
static uint32_t crc32_vpclmul(uint32_t c, const unsigned char *p, size_t n) {
    __m256i y0 = _mm256_loadu_si256((const __m256i *)p);
    __m256i y1 = _mm256_loadu_si256((const __m256i *)(p + 32));
    __m256i y2 = _mm256_loadu_si256((const __m256i *)(p + 64));
    __m256i y3 = _mm256_loadu_si256((const __m256i *)(p + 96));
    y0 = _mm256_xor_si256(y0, _mm256_setr_epi32((int)c, 0, 0, 0, 0, 0, 0, 0));
    p += 128;
    n -= 128;
    const __m256i k = _mm256_set_epi64x((long long)K2_1024, (long long)K1_1024, (long long)K2_1024,
                                        (long long)K1_1024);
    while (n >= 128) {  /* each 128-bit lane folded 1024 bits ahead */
        y0 = fold256(y0, k, _mm256_loadu_si256((const __m256i *)p));
        y1 = fold256(y1, k, _mm256_loadu_si256((const __m256i *)(p + 32)));
        y2 = fold256(y2, k, _mm256_loadu_si256((const __m256i *)(p + 64)));
        y3 = fold256(y3, k, _mm256_loadu_si256((const __m256i *)(p + 96)));
        p += 128;
        n -= 128;
    }
    /* the eight lanes, in memory order, into one */
    const __m128i k34 = _mm_set_epi64x((long long)K4, (long long)K3);
    __m128i lanes[8] = {_mm256_castsi256_si128(y0), _mm256_extracti128_si256(y0, 1), _mm256_castsi256_si128(y1),
                        _mm256_extracti128_si256(y1, 1), _mm256_castsi256_si128(y2), _mm256_extracti128_si256(y2, 1),
                        _mm256_castsi256_si128(y3), _mm256_extracti128_si256(y3, 1)};
    __m128i x0 = lanes[0];
    for (int i = 1; i < 8; i++)
        x0 = fold(x0, k34, lanes[i]);
    return fold_tail(x0, p, n);
}

__attribute__((target("avx512f,vpclmulqdq,pclmul,sse4.1")))
static inline __m512i fold512(__m512i acc, __m512i k, __m512i next) {
    __m512i lo = _mm512_clmulepi64_epi128(acc, k, 0x00);
    __m512i hi = _mm512_clmulepi64_epi128(acc, k, 0x11);
    return _mm512_ternarylogic_epi64(lo, hi, next, 0x96);  /* lo ^ hi ^ next */
}

/* Sixteen 128-bit lanes in four 512-bit registers, 256 bytes per step (AVX-512: Intel Ice Lake+, AMD
 * Zen 4+); n >= 512. The registers are then folded into one another 512 bits apart, its four lanes
 * 128 bits apart. */
__attribute__((target("avx512f,vpclmulqdq,pclmul,sse4.1")))
static uint32_t crc32_vpclmul512(uint32_t c, const unsigned char *p, size_t n) {
    __m512i z0 = _mm512_loadu_si512((const void *)p);
    __m512i z1 = _mm512_loadu_si512((const void *)(p + 64));
    __m512i z2 = _mm512_loadu_si512((const void *)(p + 128));
    __m512i z3 = _mm512_loadu_si512((const void *)(p + 192));
    z0 = _mm512_xor_si512(z0, _mm512_castsi128_si512(_mm_cvtsi32_si128((int)c)));
    p += 256;
    n -= 256;
    const __m512i k = _mm512_set_epi64((long long)K2_2048, (long long)K1_2048, (long long)K2_2048,
                                       (long long)K1_2048, (long long)K2_2048, (long long)K1_2048,
                                       (long long)K2_2048, (long long)K1_2048);
    while (n >= 256) {  /* each 128-bit lane folded 2048 bits ahead */
        z0 = fold512(z0, k, _mm512_loadu_si512((const void *)p));
        z1 = fold512(z1, k, _mm512_loadu_si512((const void *)(p + 64)));
        z2 = fold512(z2, k, _mm512_loadu_si512((const void *)(p + 128)));
        z3 = fold512(z3, k, _mm512_loadu_si512((const void *)(p + 192)));
        p += 256;
        n -= 256;
    }
    const __m512i k12 = _mm512_set_epi64((long long)K2, (long long)K1, (long long)K2, (long long)K1, (long long)K2,
                                         (long long)K1, (long long)K2, (long long)K1);
    z1 = fold512(z0, k12, z1);  /* the registers, 512 bits apart, into the last */
    z2 = fold512(z1, k12, z2);
    z3 = fold512(z2, k12, z3);
    const __m128i k34 = _mm_set_epi64x((long long)K4, (long long)K3);
    __m128i x0 = _mm512_castsi512_si128(z3);
    x0 = fold(x0, k34, _mm512_extracti32x4_epi32(z3, 1));
    x0 = fold(x0, k34, _mm512_extracti32x4_epi32(z3, 2));
    x0 = fold(x0, k34, _mm512_extracti32x4_epi32(z3, 3));
    return fold_tail(x0, p, n);
}
#endif

void pbm_crc32_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (POLY & (0u - (c & 1)));
        table[0][i] = c;
    }
    for (int t = 1; t < 8; t++)
        for (int i = 0; i < 256; i++)
            table[t][i] = (table[t - 1][i] >> 8) ^ table[0][table[t - 1][i] & 0xFF];
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    use_pclmul = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
    use_vpclmul = use_pclmul && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("vpclmulqdq");
    use_vpclmul512 = use_vpclmul && __builtin_cpu_supports("avx512f") && !getenv("PBM_CRC32_NO_AVX512");
#endif
}

const char *pbm_crc32_impl(void) {
    return use_vpclmul512 ? "vpclmul512" : use_vpclmul ? "vpclmul" : use_pclmul ? "pclmul" : "table";
}

uint32_t pbm_crc32(uint32_t crc, const void *data, size_t len) {
    const unsigned char *p = data;
    uint32_t c = ~crc;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (use_pclmul && len >= 64) {
        size_t bulk = len & ~(size_t)15;
        c = use_vpclmul512 && bulk >= 512 ? crc32_vpclmul512(c, p, bulk)
            : use_vpclmul && bulk >= 256  ? crc32_vpclmul(c, p, bulk)
                                          : crc32_pclmul(c, p, bulk);
        p += bulk;
        len -= bulk;
    }
#endif
    return ~crc32_table(c, p, len);
}

uint32_t pbm_crc32_portable(uint32_t crc, const void *data, size_t len) {
    return ~crc32_table(~crc, data, len);
}
