/*
 * attn_pack.h -- K/V packing and the arrays' storage, written once (a
 * template of attn_kernels.h). What is stored in 16 bits (sa_attn_args.storage)
 * is converted to T here, where it is loaded or packed, and the output is
 * rounded here, where it is written: the rest of the kernels see T only.
 *   load_row:  a row (or column: any stride) of q, k or v -> T;
 *   store_row, store_zero_row: a finished row of out, scaled, -> its storage.
 * A key block is BK keys starting at row j0 of K (or V); its first element is
 * element `off` of `base`, rows ss apart, columns se apart, nvalid of its rows
 * are read (keys no unit of the block's K/V can see are never read). The rest
 * of the block is zero, so the micro-kernels may run over whole vectors.
 *   pack_t:    [ncols][BK], the block transposed: the forward's and the
 *              backward's K^T, the backward's V^T;
 *   pack_rows: [BK][width], the rows, zero-padded to width: the forward's V
 *              (unless read in place), the backward's K.
 */

/* dst[e] = src[e * se] for e < n; src starts at element `off` of `base`,
 * stored as `storage` (16 bits: converted exactly; only the float kernels
 * are given 16-bit storage, so the vector forms are float ones) */
static void FN(load_row)(const void *base, int storage, int64_t off, int64_t se, int64_t n, T *dst)
{
    if (storage == SA_STORE_NATIVE) {
        const T *s = (const T *)base + off;
        for (int64_t e = 0; e < n; e++) dst[e] = s[e * se];
        return;
    }
    const uint16_t *s = (const uint16_t *)base + off;
    if (se == 1 && sizeof(T) == sizeof(float)) {
        if (storage == SA_STORE_BF16)
            vf_from_bf16_row(s, (float *)(void *)dst, n);
        else
            vf_from_f16_row(s, (float *)(void *)dst, n);
        return;
    }
    for (int64_t e = 0; e < n; e++)
        dst[e] = (T)(storage == SA_STORE_BF16 ? sa_bf16_to_f32(s[e * se]) : sa_f16_to_f32(s[e * se]));
}

/* dst[e * se] = src[e] * mul for e < n; dst starts at element `off` of
 * `base`, stored as `storage` (16 bits: rounded to nearest even; src is
 * scaled in place first) */
static void FN(store_row)(void *base, int storage, int64_t off, int64_t se, int64_t n, T *src, T mul)
{
    if (storage == SA_STORE_NATIVE) {
        T *dst = (T *)base + off;
        if (se == 1) {
            int64_t col = 0;
            VT vm = V(set1)(mul);
            for (; col + VW <= n; col += VW) V(store)(dst + col, V(mul)(V(load)(src + col), vm));
            for (; col < n; col++) dst[col] = src[col] * mul;
        } else {
            for (int64_t col = 0; col < n; col++) dst[col * se] = src[col] * mul;
        }
        return;
    }
    uint16_t *dst = (uint16_t *)base + off;
    for (int64_t col = 0; col < n; col++) src[col] *= mul;
    if (storage == SA_STORE_F16 && se == 1 && sizeof(T) == sizeof(float)) {
        vf_to_f16_row((const float *)(const void *)src, dst, n);
        return;
    }
    for (int64_t col = 0; col < n; col++)
        dst[col * se] = storage == SA_STORE_BF16 ? sa_f32_to_bf16((float)src[col]) : sa_f32_to_f16((float)src[col]);
}

/* zeros (a row whose keys are all masked): +0 in every storage */
static void FN(store_zero_row)(void *base, int storage, int64_t off, int64_t se, int64_t n)
{
    if (storage == SA_STORE_NATIVE)
        for (int64_t col = 0; col < n; col++) ((T *)base)[off + col * se] = 0;
    else
        for (int64_t col = 0; col < n; col++) ((uint16_t *)base)[off + col * se] = 0;
}

/* Keys of block j0 below klim (0 .. BK). */
static inline int64_t FN(block_keys)(int64_t klim, int64_t j0)
{
    int64_t n = klim - j0 < BK ? klim - j0 : BK;
    return n < 0 ? 0 : n;
}

/* dst[c * BK + jj] = src[jj * ss + c * se] for jj < nvalid, c < ncols; 0 for
 * nvalid <= jj < BK. VW x VW register transposes where rows are contiguous,
 * then the leftover keys / columns one by one (c outer: contiguous writes). */
static void FN(pack_t)(const void *base, int storage, int64_t off, int64_t ss, int64_t se, int64_t nvalid,
                       int64_t ncols, T *dst)
{
    if (storage != SA_STORE_NATIVE) {   /* 16 bits: each row converted (contiguous reads), then spread down */
        T row[64];
        for (int64_t jj = 0; jj < nvalid; jj++)
            for (int64_t c0 = 0; c0 < ncols; c0 += 64) {
                int64_t cw = ncols - c0 < 64 ? ncols - c0 : 64;
                FN(load_row)(base, storage, off + jj * ss + c0 * se, se, cw, row);
                for (int64_t c = 0; c < cw; c++) dst[(c0 + c) * BK + jj] = row[c];
            }
        for (int64_t c = 0; c < ncols; c++)
            for (int64_t jj = nvalid; jj < BK; jj++) dst[c * BK + jj] = 0;
        return;
    }
    const T *src = (const T *)base + off;
    int64_t jv = 0, cv = 0;
    if (se == 1) {
        jv = nvalid / VW * VW;
        cv = ncols / VW * VW;
        for (int64_t jj = 0; jj < jv; jj += VW)
            for (int64_t c = 0; c < cv; c += VW) V(transpose)(src + jj * ss + c, ss, dst + c * BK + jj, BK);
    }
    for (int64_t c = 0; c < ncols; c++) {
        const T *col = src + c * se;
        T *d = dst + c * BK;
        for (int64_t jj = c < cv ? jv : 0; jj < nvalid; jj++) d[jj] = col[jj * ss];
        for (int64_t jj = nvalid; jj < BK; jj++) d[jj] = 0;
    }
}

#if STORE16
/* quantized K/V (sa_kv_read: int8, float8), widened where they are packed:
 * key jj's values (exact, sa_kv_elem) times its scale sc[jj * scs]. K^T into
 * [ncols][BK] (transposed: pack_t's layout), V into rows [BK][width]
 * (pack_rows'); 0 past nvalid. */
static void FN(pack_scaled)(const void *base, int rd, int64_t off, int64_t ss, int64_t se, const float *sc,
                            int64_t scs, int64_t nvalid, int64_t ncols, int64_t width, int transposed, T *dst)
{
    for (int64_t jj = 0; jj < BK; jj++) {
        T f = jj < nvalid ? (T)sc[jj * scs] : 0;
        for (int64_t c = 0; c < (transposed ? ncols : width); c++) {
            T x = jj < nvalid && c < ncols ? f * (T)sa_kv_elem(base, off + jj * ss + c * se, rd) : 0;
            if (transposed)
                dst[c * BK + jj] = x;
            else
                dst[jj * width + c] = x;
        }
    }
}
#endif

/* dst[jj * width + c] = src[jj * ss + c * se] for jj < nvalid, c < ncols; 0
 * elsewhere in [BK][width]. */
static void FN(pack_rows)(const void *base, int storage, int64_t off, int64_t ss, int64_t se, int64_t nvalid,
                          int64_t ncols, int64_t width, T *dst)
{
    for (int64_t jj = 0; jj < BK; jj++) {
        T *row = dst + jj * width;
        int64_t c = 0;
        if (jj < nvalid && storage != SA_STORE_NATIVE) {
            FN(load_row)(base, storage, off + jj * ss, se, ncols, row);
            c = ncols;
        } else if (jj < nvalid) {
            const T *s = (const T *)base + off + jj * ss;
            if (se == 1)
                for (; c < ncols; c++) row[c] = s[c];
            else
                for (; c < ncols; c++) row[c] = s[c * se];
        }
        for (; c < width; c++) row[c] = 0;
    }
}
