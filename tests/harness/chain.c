/* Runs _fused.c's nearswap_chain_range on arrays read from a file, so that a
 * cross-compiled build can be checked under an emulator.
 *
 *     chain DTYPE ROUND_STAGES N CHUNK INPUT OUTPUT T0 [T1 ...]
 *
 * DTYPE is _fused.c's code (0 float32, 1 float16, 2 bfloat16); one stage per T.
 * INPUT holds the base and then each secondary, N elements each; OUTPUT gets N
 * elements. The range is run in pieces of CHUNK elements, as the Python side
 * splits it between threads.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

void nearswap_chain_range(const void *base, const void *const *secondaries, const float *t,
                          int stages, int dtype, int round_stages, void *out,
                          int64_t start, int64_t stop);

int main(int argc, char **argv) {
    if (argc < 8) {
        fprintf(stderr, "usage: %s DTYPE ROUND_STAGES N CHUNK INPUT OUTPUT T0 [T1 ...]\n", argv[0]);
        return 2;
    }
    int dtype = atoi(argv[1]), round_stages = atoi(argv[2]), stages = argc - 7;
    int64_t n = atoll(argv[3]), chunk = atoll(argv[4]);
    size_t size = dtype == 0 ? 4 : 2, bytes = (size_t)n * size;
    float t[64];
    const void *secondaries[64];
    if (stages > 64 || chunk < 1) return 2;
    for (int k = 0; k < stages; k++) t[k] = strtof(argv[7 + k], NULL);

    char *data = malloc(bytes * (stages + 1)), *out = malloc(bytes ? bytes : 1);
    FILE *in = fopen(argv[5], "rb");
    if (!data || !out || !in || fread(data, 1, bytes * (stages + 1), in) != bytes * (stages + 1)) {
        fprintf(stderr, "cannot read %s\n", argv[5]);
        return 1;
    }
    fclose(in);
    for (int k = 0; k < stages; k++) secondaries[k] = data + bytes * (k + 1);
    for (int64_t start = 0; start < n; start += chunk) {
        int64_t stop = n - start < chunk ? n : start + chunk;
        nearswap_chain_range(data, secondaries, t, stages, dtype, round_stages, out, start, stop);
    }
    FILE *result = fopen(argv[6], "wb");
    if (!result || fwrite(out, 1, bytes, result) != bytes || fclose(result) != 0) {
        fprintf(stderr, "cannot write %s\n", argv[6]);
        return 1;
    }
    free(data);
    free(out);
    return 0;
}
