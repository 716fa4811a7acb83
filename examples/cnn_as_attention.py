"""A 1-D convolution is self-attention with a restricted receptive field.

The notes claim "CNN is a subset of self-attention". Here is the construction, exactly:

    Take K heads. Head h may look at one key only: the token at the relative offset
    o_h = h - K//2 (query i sees key j = i + o_h, nothing else). Its softmax then has a
    single term, weight 1, so head h outputs v_{i+o_h} = x_{i+o_h} @ Wv_h -- or zeros when
    i + o_h falls outside the sequence (a row with no key gives zeros: zero padding).
    Concatenating the heads and multiplying by Wo = [Wo_0; ...; Wo_{K-1}] gives

        y_i = sum_h x_{i+o_h} @ Wv_h @ Wo_h

    which is a convolution of width K over the sequence with kernel taps Wv_h @ Wo_h
    (C_in x C_out each). With Wv_h = I and Wo_h = weight[h], it is exactly the layer

        y[i, o] = sum_t sum_c x[i + t - K//2, c] * weight[t, c, o]   (+ bias[o])

    i.e. torch.nn.Conv1d(C_in, C_out, K, padding=K//2) for odd K (a cross-correlation), which is
    np.convolve(x[:, c], weight[::-1, c, o], mode="same") summed over input channels c
    (for L >= K; conv1d_numpy slices the full convolution itself, which also covers L < K).
    Even K works too: the taps then cover offsets -K/2 .. K/2 - 1.

What attention adds on top is that the weights over the window are computed from the
content (q . k) instead of being fixed per offset: restrict the heads as above and the
queries and keys no longer matter -- below they are random, to show that.

The restriction is written as a per-head float mask (0 at the head's offset, -inf
elsewhere), built by _head_masks, plus window_size=K//2 where the kernel has it. The mask
is a strided (Toeplitz) view of K * (2L - 1) numbers, never a K x L x L array: the kernel
reads masks in place with their own strides.

Run:  python examples/cnn_as_attention.py
"""

import inspect
import sys

import numpy as np

import selfattn


def _head_masks(K, L, dtype=np.float64):
    """Per-head float masks (K, L, L): 0 where key j = i + (h - K//2), -inf elsewhere.

    Built as a Toeplitz view: mask[h, i, j] = band[h, j - i + L - 1], so it costs K * (2L - 1)
    elements, whatever L. Rows whose key would fall outside 0..L-1 have no 0 at all: fully
    masked, so the kernel gives zeros there (the convolution's zero padding).

    WITH window_size IN THE KERNEL (section 1 of "Structured attention"), _attention_kwargs
    adds window_size=K//2 by itself: every head's key lies within K//2 of the query, so the
    kernel skips every key block outside the band (O(L*K) work instead of O(L^2)) and this
    mask only has to pick the head's offset inside the band. The mask itself cannot go: one
    window_size holds for all heads, and a per-head window would need a negative side.
    """
    band = np.full((K, 2 * L - 1), -np.inf, dtype=dtype)
    for h in range(K):
        offset = h - K // 2                       # j - i for head h
        if -(L - 1) <= offset <= L - 1:
            band[h, offset + L - 1] = 0.0
    itemsize = band.itemsize
    # element (h, i, j) at band[h, (L - 1) - i + j]: start at column L-1, stride -1 along i, +1 along j
    start = band[:, L - 1:]
    return np.lib.stride_tricks.as_strided(start, shape=(K, L, L),
                                           strides=(band.strides[0], -itemsize, itemsize),
                                           writeable=False)


KERNEL_HAS_WINDOW = "window_size" in inspect.signature(selfattn.scaled_dot_product_attention).parameters


def _attention_kwargs(K, L, dtype):
    """The restriction of the heads, as keyword arguments of scaled_dot_product_attention.

    The float mask of _head_masks picks each head's offset; where the installed kernel has
    window_size, window_size=K//2 is passed too (every head's key lies within K//2 of its query),
    so the kernel skips every key block outside the band. The result is the same either way.
    """
    kwargs = {"attn_mask": _head_masks(K, L, dtype)}
    if KERNEL_HAS_WINDOW:
        kwargs["window_size"] = K // 2
    return kwargs


def conv1d_as_attention(x, weight, bias=None, *, dtype=None, rng=None):
    """Conv1d of x (..., L, C_in) with weight (K, C_in, C_out), 'same' zero padding, as attention.

    K heads of head dim C_in: Wv = [I, I, ..., I] (C_in, K*C_in), Wo = weight reshaped to
    (K*C_in, C_out); query and key projections are random (they do not matter). Returns
    (..., L, C_out) in `dtype` (default: float64 if x or weight is float64, else float32).
    """
    x = np.asarray(x)
    weight = np.asarray(weight)
    if weight.ndim != 3 or x.ndim < 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"x must be (..., L, C_in) and weight (K, C_in, C_out), got {x.shape} and {weight.shape}")
    K, C_in, C_out = weight.shape
    L = x.shape[-2]
    if dtype is None:
        dtype = np.float64 if np.float64 in (x.dtype, weight.dtype) else np.float32
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(0) if rng is None else rng
    x = x.astype(dtype, copy=False)

    E = 4                                                         # any query/key head dim
    wq = rng.standard_normal((C_in, K * E)).astype(dtype)
    wk = rng.standard_normal((C_in, K * E)).astype(dtype)
    wv = np.tile(np.eye(C_in, dtype=dtype), (1, K))               # head h: v = x
    wo = weight.astype(dtype).reshape(K * C_in, C_out)            # head h's rows: weight[h]

    def heads(t, d):                                              # (..., L, K*d) -> (..., K, L, d)
        return np.swapaxes(t.reshape(t.shape[:-1] + (K, d)), -2, -3)

    q, k, v = heads(x @ wq, E), heads(x @ wk, E), heads(x @ wv, C_in)
    o = selfattn.scaled_dot_product_attention(q, k, v, **_attention_kwargs(K, L, dtype))   # (..., K, L, C_in)
    o = np.swapaxes(o, -2, -3).reshape(x.shape[:-1] + (K * C_in,))                       # concat heads
    y = o @ wo
    return y if bias is None else y + np.asarray(bias, dtype=dtype)


def conv1d_numpy(x, weight, bias=None):
    """The same convolution with np.convolve, per (input, output) channel pair, float64."""
    x = np.asarray(x, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    K, C_in, C_out = weight.shape
    flat = x.reshape((-1,) + x.shape[-2:])
    L = x.shape[-2]
    s = K - 1 - K // 2                  # y[i] = full[i + s] puts tap t on x[i + t - K//2]
    y = np.zeros(flat.shape[:-1] + (C_out,))
    for b in range(flat.shape[0]):
        for c in range(C_in):
            for o in range(C_out):
                # np.convolve flips its kernel: flip it back to get Conv1d's cross-correlation.
                # Its mode="same" is this slice of the full convolution when L >= K; slicing
                # ourselves also covers L < K (where "same" would return K values).
                full = np.convolve(flat[b, :, c], weight[::-1, c, o], mode="full")
                y[b, :, o] += full[s:s + L]
    y = y.reshape(x.shape[:-1] + (C_out,))
    return y if bias is None else y + np.asarray(bias, dtype=np.float64)


def conv1d_loop(x, weight, bias=None):
    """The same convolution as a direct loop over positions and taps (float64)."""
    x = np.asarray(x, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    K = weight.shape[0]
    L = x.shape[-2]
    y = np.zeros(x.shape[:-1] + (weight.shape[2],))
    for i in range(L):
        for t in range(K):
            j = i + t - K // 2
            if 0 <= j < L:
                y[..., i, :] += x[..., j, :] @ weight[t]
    return y if bias is None else y + np.asarray(bias, dtype=np.float64)


def main():
    rng = np.random.default_rng(42)
    print("1-D convolution (width K, 'same' zero padding) == K attention heads, head h restricted to offset h - K//2")
    worst = 0.0
    for K in (1, 3, 5):
        for L in (1, 7, 64):
            x = rng.standard_normal((2, L, 3))            # batch 2, 3 input channels
            w = rng.standard_normal((K, 3, 4))            # 4 output channels
            b = rng.standard_normal(4)
            want = conv1d_numpy(x, w, b)
            d64 = np.max(np.abs(conv1d_as_attention(x, w, b) - want))
            d32 = np.max(np.abs(conv1d_as_attention(x, w, b, dtype=np.float32) - want))
            dloop = np.max(np.abs(conv1d_loop(x, w, b) - want))
            worst = max(worst, d64)
            print(f"  K={K} L={L:3d}: max |attention - np.convolve| = {d64:.2e} (float64), {d32:.2e} (float32);"
                  f" direct loop vs np.convolve {dloop:.2e}")
    print(f"max |difference| (float64) over all cases: {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
