/*
 * attn_pack.h -- K/V packing, written once (a template of attn_kernels.h).
 * A key block is BK keys starting at row j0 of K (or V); `src` points at
 * row j0, rows ss apart, columns se apart, nvalid of its rows are read (keys
 * no unit of the block's K/V can see are never read). The rest of the block
 * is zero, so the micro-kernels may run over whole vectors.
 *   pack_t:    [ncols][BK], the block transposed: the forward's and the
 *              backward's K^T, the backward's V^T;
 *   pack_rows: [BK][width], the rows, zero-padded to width: the forward's V
 *              (unless read in place), the backward's K.
 */

/* Keys of block j0 below klim (0 .. BK). */
static inline int64_t FN(block_keys)(int64_t klim, int64_t j0)
{
    int64_t n = klim - j0 < BK ? klim - j0 : BK;
    return n < 0 ? 0 : n;
}

/* dst[c * BK + jj] = src[jj * ss + c * se] for jj < nvalid, c < ncols; 0 for
 * nvalid <= jj < BK. VW x VW register transposes where rows are contiguous,
 * then the leftover keys / columns one by one (c outer: contiguous writes). */
static void FN(pack_t)(const T *src, int64_t ss, int64_t se, int64_t nvalid, int64_t ncols, T *dst)
{
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

/* dst[jj * width + c] = src[jj * ss + c * se] for jj < nvalid, c < ncols; 0
 * elsewhere in [BK][width]. */
static void FN(pack_rows)(const T *src, int64_t ss, int64_t se, int64_t nvalid, int64_t ncols, int64_t width, T *dst)
{
    for (int64_t jj = 0; jj < BK; jj++) {
        T *row = dst + jj * width;
        int64_t c = 0;
        if (jj < nvalid) {
            const T *s = src + jj * ss;
            if (se == 1)
                for (; c < ncols; c++) row[c] = s[c];
            else
                for (; c < ncols; c++) row[c] = s[c * se];
        }
        for (; c < width; c++) row[c] = 0;
    }
}
