/* Per-group quantization search in one pass over memory (the torch version in quantize._search makes ~20
 * passes per candidate and ratio). Semantics follow quantize._absmax / _int_asym / _search exactly, in float32,
 * except that each group's error is summed in double (torch sums float32 in another order), so two
 * (candidate, ratio) pairs whose errors tie to within float32 rounding may be chosen differently.
 *
 * absmax_search: candidates c = 0..n_cand-1, each a sorted value set vals[c][0..n_vals[c]-1]; per group
 *   scale = (amax / vmax[c]) * ratio, safe = scale > 0 ? scale : 1, y = x / safe, the nearest value
 *   (ties to the lower one, values beyond the ends saturate), q = value * scale.
 * int_asym_search: min-max scale over 2^bits levels with a zero point (quantize._int_asym).
 * Error = sum over the group of (q - x)^2 [* weight]; strictly lower wins (earlier candidate, then larger
 * ratio, on ties). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline int nearest(float y, const float *mids, int n_mids) {
    /* torch.bucketize(y, mids, right=False): the number of mids strictly below y; counted without branches
     * (a binary search mispredicts on every other step, and the value sets have at most 15 mids) */
    int idx = 0;
    for (int m = 0; m < n_mids; m++) idx += mids[m] < y;
    return idx;
}

void absmax_search(const float *x, int64_t n_groups, int g, int n_groups_per_row, const float *vals,
                   const int *n_vals, const float *vmax, int n_cand, const float *ratios, int n_ratio,
                   const float *weight, float *out, int8_t *ids) {
    int max_vals = 0;
    for (int c = 0; c < n_cand; c++) if (n_vals[c] > max_vals) max_vals = n_vals[c];
    float *mids = (float *)malloc(sizeof(float) * n_cand * max_vals);
    for (int c = 0; c < n_cand; c++)
        for (int i = 0; i + 1 < n_vals[c]; i++)
            mids[c * max_vals + i] = (vals[c * max_vals + i + 1] + vals[c * max_vals + i]) / 2.0f;
#pragma omp parallel for schedule(static)
    for (int64_t gi = 0; gi < n_groups; gi++) {
        const float *xg = x + gi * g;
        const float *wg = weight ? weight + (gi % n_groups_per_row) * g : NULL;
        float *og = out + gi * g;
        float amax = 0.0f;
        for (int e = 0; e < g; e++) { float a = fabsf(xg[e]); if (a > amax) amax = a; }
        double best = INFINITY;
        int best_c = 0;
        float best_scale = 0.0f;
        for (int c = 0; c < n_cand; c++) {
            const float *v = vals + c * max_vals, *md = mids + c * max_vals;
            float base = amax / vmax[c];
            for (int r = 0; r < n_ratio; r++) {
                float scale = ratios[r] != 1.0f ? base * ratios[r] : base;
                float safe = scale > 0.0f ? scale : 1.0f;
                double err = 0.0;
                for (int e = 0; e < g; e++) {
                    float q = v[nearest(xg[e] / safe, md, n_vals[c] - 1)] * scale;
                    float d = q - xg[e];
                    double d2 = (double)(d * d);
                    err += wg ? d2 * (double)wg[e] : d2;
                }
                if (err < best) { best = err; best_c = c; best_scale = scale; }
            }
        }
        const float *v = vals + best_c * max_vals, *md = mids + best_c * max_vals;
        float safe = best_scale > 0.0f ? best_scale : 1.0f;
        for (int e = 0; e < g; e++) og[e] = v[nearest(xg[e] / safe, md, n_vals[best_c] - 1)] * best_scale;
        if (ids) ids[gi] = (int8_t)best_c;
    }
    free(mids);
}

static inline float int_asym_one(float x, float scale, float safe, float zero, float qmax) {
    float q = nearbyintf(x / safe) + zero;
    q = q < 0.0f ? 0.0f : (q > qmax ? qmax : q);
    return (q - zero) * scale;
}

void int_asym_search(const float *x, int64_t n_groups, int g, int n_groups_per_row, int bits,
                     const float *ratios, int n_ratio, const float *weight, float *out) {
    float qmax = (float)((1 << bits) - 1);
#pragma omp parallel for schedule(static)
    for (int64_t gi = 0; gi < n_groups; gi++) {
        const float *xg = x + gi * g;
        const float *wg = weight ? weight + (gi % n_groups_per_row) * g : NULL;
        float *og = out + gi * g;
        float lo0 = xg[0], hi0 = xg[0];
        for (int e = 1; e < g; e++) { if (xg[e] < lo0) lo0 = xg[e]; if (xg[e] > hi0) hi0 = xg[e]; }
        double best = INFINITY;
        float bs = 0.0f, bsafe = 1.0f, bz = 0.0f;
        for (int r = 0; r < n_ratio; r++) {
            float lo = lo0, hi = hi0;
            if (ratios[r] != 1.0f) { lo = lo0 * ratios[r]; hi = hi0 * ratios[r]; }
            float scale = (hi - lo) / qmax;
            float safe = scale > 0.0f ? scale : 1.0f;
            float zero = nearbyintf(-lo / safe);
            zero = zero < 0.0f ? 0.0f : (zero > qmax ? qmax : zero);
            double err = 0.0;
            for (int e = 0; e < g; e++) {
                float q = scale > 0.0f ? int_asym_one(xg[e], scale, safe, zero, qmax) : xg[e];
                float d = q - xg[e];
                double d2 = (double)(d * d);
                err += wg ? d2 * (double)wg[e] : d2;
            }
            if (err < best) { best = err; bs = scale; bsafe = safe; bz = zero; }
        }
        for (int e = 0; e < g; e++) og[e] = bs > 0.0f ? int_asym_one(xg[e], bs, bsafe, bz, qmax) : xg[e];
    }
}
