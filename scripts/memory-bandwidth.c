// Read bandwidth of this machine: THREADS threads each sum their share of a SIZE_MB
// buffer with 32-byte loads, best of REPS passes. The ceiling for a batch-1 scan,
// which reads every gallery byte once per probe.
//
//   gcc -O2 -mavx2 -pthread scripts/memory-bandwidth.c -o /tmp/membw && /tmp/membw [SIZE_MB] [THREADS]
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static char *buf;
static size_t per_thread;

static void *reader(void *arg) {
    const __m256i *p = (const __m256i *)(buf + (size_t)arg * per_thread);
    size_t n = per_thread / 32;
    __m256i acc0 = _mm256_setzero_si256(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    for (size_t i = 0; i + 4 <= n; i += 4) {
        acc0 = _mm256_add_epi64(acc0, _mm256_load_si256(p + i));
        acc1 = _mm256_add_epi64(acc1, _mm256_load_si256(p + i + 1));
        acc2 = _mm256_add_epi64(acc2, _mm256_load_si256(p + i + 2));
        acc3 = _mm256_add_epi64(acc3, _mm256_load_si256(p + i + 3));
    }
    __m256i s = _mm256_add_epi64(_mm256_add_epi64(acc0, acc1), _mm256_add_epi64(acc2, acc3));
    long long out[4];
    _mm256_storeu_si256((__m256i *)out, s);
    return (void *)(out[0] + out[1] + out[2] + out[3]);
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    size_t mb = argc > 1 ? strtoul(argv[1], 0, 10) : 1024;
    int threads = argc > 2 ? atoi(argv[2]) : 2;
    size_t size = mb << 20;
    per_thread = size / threads / 128 * 128;
    buf = aligned_alloc(4096, size);
    memset(buf, 1, size);
    double best = 1e9;
    for (int rep = 0; rep < 10; rep++) {
        pthread_t t[64];
        double t0 = now();
        for (long i = 0; i < threads; i++) pthread_create(&t[i], 0, reader, (void *)i);
        for (int i = 0; i < threads; i++) pthread_join(t[i], 0);
        double dt = now() - t0;
        if (dt < best) best = dt;
    }
    printf("read %zu MB with %d threads: %.1f GB/s (best of 10)\n", mb, threads,
           (double)per_thread * threads / best / 1e9);
    return 0;
}
