/* SHA-256 block compression with the x86 SHA extensions, for one stream or two at once.
 *
 * The decoder hashes every layer twice: HMAC-SHA256 over the ciphertext and SHA-256 over
 * the plaintext, two streams of the same length. One SHA-256 stream is bound by the latency
 * of SHA256RNDS2 (each pair of rounds waits for the one before), so a core runs two
 * independent streams, interleaved round group by round group, in little more time than
 * one. This file owns only the compression function (FIPS 180-4, section 6.2.2); padding,
 * HMAC and the stream bookkeeping live in sha256pair.py.
 *
 * A state is 8 native-endian uint32 words, a..h, in a 32-byte writable buffer. The GIL is
 * released while blocks are compressed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#define HAVE_SHA_NI_BUILD 1
#else
#define HAVE_SHA_NI_BUILD 0
#endif

#if HAVE_SHA_NI_BUILD

#define TARGET __attribute__((target("sha,sse4.1,ssse3")))

/* The 64 round constants, K0..K63 (FIPS 180-4, 4.2.2). */
static const uint32_t ROUND_CONSTANTS[64] __attribute__((aligned(16))) = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
    0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
    0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
    0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
    0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
    0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
    0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2,
};

/* SHA256RNDS2 wants the working variables as {A,B,E,F} and {C,D,G,H} (A in the top lane). */
TARGET static inline void load_state(const uint32_t *state, __m128i *abef, __m128i *cdgh)
{
    __m128i dcba = _mm_loadu_si128((const __m128i *)&state[0]);
    __m128i hgfe = _mm_loadu_si128((const __m128i *)&state[4]);
    __m128i cdab = _mm_shuffle_epi32(dcba, 0xB1);
    __m128i efgh = _mm_shuffle_epi32(hgfe, 0x1B);
    *abef = _mm_alignr_epi8(cdab, efgh, 8);
    *cdgh = _mm_blend_epi16(efgh, cdab, 0xF0);
}

TARGET static inline void store_state(uint32_t *state, __m128i abef, __m128i cdgh)
{
    __m128i feba = _mm_shuffle_epi32(abef, 0x1B);
    __m128i dchg = _mm_shuffle_epi32(cdgh, 0xB1);
    _mm_storeu_si128((__m128i *)&state[0], _mm_blend_epi16(feba, dchg, 0xF0));
    _mm_storeu_si128((__m128i *)&state[4], _mm_alignr_epi8(dchg, feba, 8));
}

/* The message words are big-endian (FIPS 180-4, 3.1). */
#define BYTE_SWAP_WORDS _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL)

/* Four rounds on one state with schedule words w[4g..4g+3]. */
#define FOUR_ROUNDS(abef, cdgh, w, g)                                                      \
    do {                                                                                   \
        __m128i wk = _mm_add_epi32(                                                        \
            (w), _mm_load_si128((const __m128i *)&ROUND_CONSTANTS[4 * (g)]));              \
        (cdgh) = _mm_sha256rnds2_epu32((cdgh), (abef), wk);                                \
        (abef) = _mm_sha256rnds2_epu32((abef), (cdgh), _mm_shuffle_epi32(wk, 0x0E));       \
    } while (0)

/* Schedule words 4g..4g+3 for g >= 4 from the four groups before them (FIPS 180-4, 6.2.2
 * step 1): W[t] = s1(W[t-2]) + W[t-7] + s0(W[t-15]) + W[t-16]. */
#define NEXT_WORDS(w, g)                                                                   \
    _mm_sha256msg2_epu32(                                                                  \
        _mm_add_epi32(_mm_sha256msg1_epu32((w)[((g) - 4) & 3], (w)[((g) - 3) & 3]),        \
                      _mm_alignr_epi8((w)[((g) - 1) & 3], (w)[((g) - 2) & 3], 4)),         \
        (w)[((g) - 1) & 3])

TARGET static void compress_one(uint32_t *state, const uint8_t *data, size_t blocks)
{
    __m128i abef, cdgh;
    load_state(state, &abef, &cdgh);
    const __m128i swap = BYTE_SWAP_WORDS;
    for (; blocks; blocks--, data += 64) {
        __m128i abef0 = abef, cdgh0 = cdgh, w[4];
#pragma GCC unroll 16
        for (int g = 0; g < 16; g++) {
            if (g < 4)
                w[g] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(data + 16 * g)), swap);
            else
                w[g & 3] = NEXT_WORDS(w, g);
            FOUR_ROUNDS(abef, cdgh, w[g & 3], g);
        }
        abef = _mm_add_epi32(abef, abef0);
        cdgh = _mm_add_epi32(cdgh, cdgh0);
    }
    store_state(state, abef, cdgh);
}

/* Two independent streams, block by block, their round groups interleaved. */
TARGET static void compress_two(uint32_t *state_a, const uint8_t *data_a, uint32_t *state_b,
                                const uint8_t *data_b, size_t blocks)
{
    __m128i abef_a, cdgh_a, abef_b, cdgh_b;
    load_state(state_a, &abef_a, &cdgh_a);
    load_state(state_b, &abef_b, &cdgh_b);
    const __m128i swap = BYTE_SWAP_WORDS;
    for (; blocks; blocks--, data_a += 64, data_b += 64) {
        __m128i abef_a0 = abef_a, cdgh_a0 = cdgh_a, abef_b0 = abef_b, cdgh_b0 = cdgh_b;
        __m128i wa[4], wb[4];
#pragma GCC unroll 16
        for (int g = 0; g < 16; g++) {
            if (g < 4) {
                wa[g] = _mm_shuffle_epi8(
                    _mm_loadu_si128((const __m128i *)(data_a + 16 * g)), swap);
                wb[g] = _mm_shuffle_epi8(
                    _mm_loadu_si128((const __m128i *)(data_b + 16 * g)), swap);
            } else {
                wa[g & 3] = NEXT_WORDS(wa, g);
                wb[g & 3] = NEXT_WORDS(wb, g);
            }
            FOUR_ROUNDS(abef_a, cdgh_a, wa[g & 3], g);
            FOUR_ROUNDS(abef_b, cdgh_b, wb[g & 3], g);
        }
        abef_a = _mm_add_epi32(abef_a, abef_a0);
        cdgh_a = _mm_add_epi32(cdgh_a, cdgh_a0);
        abef_b = _mm_add_epi32(abef_b, abef_b0);
        cdgh_b = _mm_add_epi32(cdgh_b, cdgh_b0);
    }
    store_state(state_a, abef_a, cdgh_a);
    store_state(state_b, abef_b, cdgh_b);
}

static int cpu_has_sha_ni(void)
{
    unsigned int eax, ebx, ecx, edx;
    if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx))
        return 0;
    if (!(ecx & bit_SSSE3) || !(ecx & bit_SSE4_1))
        return 0;
#ifdef __AVX__
    /* Built with -mavx or later: the compiler encodes these SSE intrinsics with VEX, which
     * needs AVX and an OS that saves the YMM state (OSXSAVE, XCR0 bits 1 and 2). */
    if (!(ecx & bit_AVX) || !(ecx & bit_OSXSAVE))
        return 0;
    unsigned int xcr0_low, xcr0_high;
    __asm__ volatile("xgetbv" : "=a"(xcr0_low), "=d"(xcr0_high) : "c"(0));
    (void)xcr0_high;
    if ((xcr0_low & 6) != 6)
        return 0;
#endif
    if (__get_cpuid_max(0, NULL) < 7)
        return 0;
    __cpuid_count(7, 0, eax, ebx, ecx, edx);
    return (ebx & bit_SHA) != 0;
}

#endif /* HAVE_SHA_NI_BUILD */

static int usable = 0;

/* A writable 32-byte state and a read-only run of whole 64-byte blocks. */
static int get_state(PyObject *obj, Py_buffer *view)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (view->len != 32) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "a SHA-256 state is 32 bytes");
        return -1;
    }
    return 0;
}

static int get_blocks(PyObject *obj, Py_buffer *view)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (view->len % 64) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "SHA-256 compresses whole 64-byte blocks");
        return -1;
    }
    return 0;
}

static PyObject *not_usable(void)
{
    PyErr_SetString(PyExc_RuntimeError,
                    "SHA extensions unavailable (not an x86-64 build, or not on this CPU)");
    return NULL;
}

PyDoc_STRVAR(compress_doc,
             "compress(state, blocks): fold whole 64-byte blocks into a 32-byte state.");

static PyObject *py_compress(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *state_obj, *data_obj;
    Py_buffer state, data;
    if (!PyArg_ParseTuple(args, "OO:compress", &state_obj, &data_obj))
        return NULL;
    if (!usable)
        return not_usable();
    if (get_state(state_obj, &state) < 0)
        return NULL;
    if (get_blocks(data_obj, &data) < 0) {
        PyBuffer_Release(&state);
        return NULL;
    }
#if HAVE_SHA_NI_BUILD
    Py_BEGIN_ALLOW_THREADS
    compress_one((uint32_t *)state.buf, (const uint8_t *)data.buf, (size_t)data.len / 64);
    Py_END_ALLOW_THREADS
#endif
    PyBuffer_Release(&data);
    PyBuffer_Release(&state);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(compress_pair_doc,
             "compress_pair(state_a, blocks_a, state_b, blocks_b): compress two streams of "
             "the same number of whole blocks at once.");

static PyObject *py_compress_pair(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *objs[4];
    Py_buffer state_a, data_a, state_b, data_b;
    if (!PyArg_ParseTuple(args, "OOOO:compress_pair", &objs[0], &objs[1], &objs[2], &objs[3]))
        return NULL;
    if (!usable)
        return not_usable();
    if (get_state(objs[0], &state_a) < 0)
        return NULL;
    if (get_blocks(objs[1], &data_a) < 0)
        goto release_state_a;
    if (get_state(objs[2], &state_b) < 0)
        goto release_data_a;
    if (get_blocks(objs[3], &data_b) < 0)
        goto release_state_b;
    if (data_a.len != data_b.len) {
        PyErr_SetString(PyExc_ValueError, "compress_pair needs blocks of the same length");
        goto release_all;
    }
    if ((char *)state_a.buf < (char *)state_b.buf + 32 &&
        (char *)state_b.buf < (char *)state_a.buf + 32) {
        PyErr_SetString(PyExc_ValueError, "compress_pair needs two separate states");
        goto release_all;
    }
#if HAVE_SHA_NI_BUILD
    Py_BEGIN_ALLOW_THREADS
    compress_two((uint32_t *)state_a.buf, (const uint8_t *)data_a.buf, (uint32_t *)state_b.buf,
                 (const uint8_t *)data_b.buf, (size_t)data_a.len / 64);
    Py_END_ALLOW_THREADS
#endif
    PyBuffer_Release(&data_b);
    PyBuffer_Release(&state_b);
    PyBuffer_Release(&data_a);
    PyBuffer_Release(&state_a);
    Py_RETURN_NONE;
release_all:
    PyBuffer_Release(&data_b);
release_state_b:
    PyBuffer_Release(&state_b);
release_data_a:
    PyBuffer_Release(&data_a);
release_state_a:
    PyBuffer_Release(&state_a);
    return NULL;
}

static PyMethodDef methods[] = {
    {"compress", py_compress, METH_VARARGS, compress_doc},
    {"compress_pair", py_compress_pair, METH_VARARGS, compress_pair_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "decoder._sha256pair",
    "SHA-256 block compression with the x86 SHA extensions, one stream or two at once.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__sha256pair(void)
{
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL)
        return NULL;
#if HAVE_SHA_NI_BUILD
    usable = cpu_has_sha_ni();
#endif
    if (PyModule_AddIntConstant(module, "USABLE", usable) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
