"""selfattn inside Hugging Face ``transformers``: ``attn_implementation="selfattn"``.

    import selfattn.transformers
    selfattn.transformers.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="selfattn")

:func:`register` adds selfattn's fused attention to transformers' ``AttentionInterface`` (the
attention of every layer) and a mask builder to its ``AttentionMaskInterface``. Each layer's
attention then runs through :mod:`selfattn.torch` (fused forward and backward, CPU tensors,
float32 / float64 / float16 / bfloat16): grouped-query heads are read without repeating K and V,
``softcap`` and gpt-oss's attention sinks (``s_aux``: ``sinks=``, with their gradient) in the kernel. Positions and everything else stay transformers' own; the cache too,
unless :func:`new_cache` gives ``generate()`` one over :class:`selfattn.KVCache` (preallocated,
written in place), or with ``paged=True`` over :class:`selfattn.PagedKVCache` (blocks of a pool,
attended from the pages).

Masks become structure. The mask builder is transformers' SDPA one (a boolean ``(batch, 1, L, S)``
mask, or none where ``is_causal`` says all), and then recognises what the mask is made of: causal
(with the query offset of a KV cache), a sliding window, key padding. When the structure, given to
the kernel as ``is_causal``, ``window_size``, ``alignment`` and ``key_lengths``, gives back exactly
that mask (checked element by element, once per forward and mask type, not per layer), every layer
runs on the structure and the kernel skips the masked blocks:

* causal, with or without a KV cache (``alignment="bottom_right"``; a static cache's empty slots
  past the queries are ``key_lengths``), a sliding window (``window_size=(w - 1, 0)``);
* right padding (encoders, training batches): ``key_lengths``;
* left padding (batched generation), without a gradient: queries, keys and values read backwards
  (NumPy views with negative strides, no copy), where the padding comes last and is ``key_lengths``
  (never read) and causality is ``window_size=(0, w - 1 or None)``; with a gradient (torch tensors
  have no negative strides), causal / window structure as above and the padding as a
  ``(batch, 1, 1, S)`` key mask, broadcast over the queries and read in place;
* an encoder's padding that is not a suffix: the mask's first row, a ``(batch, 1, 1, S)`` view.

Any other mask (packed sequences, image-token blocks, chunked attention, a 4-D mask given by the
caller) is read in place as it is, never expanded.

Not imported by ``import selfattn`` (transformers and torch are optional):
``import selfattn.transformers``. Supported: transformers >= 4.57 (older is an ImportError naming
the versions); the integration tests pass with 4.57.6, 5.0.0, 5.10.4 and 5.25.0 (torch 2.13,
sentence-transformers 6.3 with 5.25.0). Encoders such as BERT reach ``AttentionInterface`` from
transformers 5.0 on (4.57's BERT has its own attention classes: transformers raises
``KeyError: 'selfattn'`` when such a model is loaded with it). generate()'s cache argument is
``cache=`` in recent transformers, ``past_key_values=`` before the rename.
"""

from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as _np
import torch as _torch

from ._api import scaled_dot_product_attention as _np_sdpa
from .kvcache import KVCache as _KVCache
from .kvcache import _check_size
from .paged import CacheFullError as _CacheFullError
from .paged import PagedKVCache as _PagedKVCache
from .quant import FLOAT8 as _FLOAT8
from .torch import _as_numpy, _to_torch, _torch_seed
from .torch import scaled_dot_product_attention as _torch_sdpa

__all__ = ["register", "attention_forward", "mask_builder", "Structure", "new_cache", "NAME", "MIN_VERSION"]

NAME = "selfattn"
MIN_VERSION = (4, 57)     # the oldest the integration tests pass with (4.57.6; 4.56 lacks the cache layers' API)
_ATTR = "_selfattn_structure"      # the Structure a mask built by mask_builder carries


def _version_tuple(v: str) -> Tuple[int, ...]:
    out = []
    for part in v.split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


class Structure(NamedTuple):
    """What a boolean ``(B, 1, L, S)`` mask is, as selfattn's arguments: ``is_causal``, ``options``
    (``window_size``, ``alignment``, ``key_lengths``) and ``attn_mask`` (None, or a ``(B, 1, 1, S)``
    key mask). Together they select exactly the mask's True entries.

    ``flipped``, for left padding: the same mask on queries and keys read backwards (NumPy views with
    negative strides: no copy), where the padding is at the end (``key_lengths``, never read) and
    causality is a window ``(0, right)``; used where no gradient is wanted (torch tensors have no
    negative strides)."""
    is_causal: bool
    options: Dict[str, Any]
    attn_mask: Optional[Any]
    flipped: Optional["Structure"] = None


def implied_mask(structure: Structure, B: int, L: int, S: int) -> Any:
    """The ``(B, 1, L, S)`` boolean mask selfattn applies for `structure` (its documented semantics:
    query row i sits at p = i, or p = i + S_b - L with ``alignment="bottom_right"``, S_b = key_lengths[b]
    or S; keys j >= S_b are masked; causal keeps j <= p, a window (left, right) p - left <= j <= p + right;
    a boolean attn_mask is and-ed in)."""
    opts = structure.options
    kl = opts.get("key_lengths")
    s_b = _torch.full((B,), S, dtype=_torch.long) if kl is None else \
        _torch.as_tensor(_np.broadcast_to(_np.asarray(kl, dtype=_np.int64), (B,)).copy())
    i = _torch.arange(L)
    j = _torch.arange(S)
    p = i[None, :] + (s_b[:, None] - L if opts.get("alignment") == "bottom_right" else 0)   # (B, L)
    p = p[:, :, None]
    m = (j[None, None, :] < s_b[:, None, None]).expand(B, L, S)
    if structure.is_causal:
        m = m & (j <= p)
    left, right = opts.get("window_size", (None, None))
    if left is not None:
        m = m & (j >= p - left)
    if right is not None:
        m = m & (j <= p + right)
    if structure.attn_mask is not None:
        m = m & structure.attn_mask[:, 0]
    return m[:, None]


def _suffix_lengths(pad: Any) -> Optional[Any]:
    """pad (B, S) bool, True = a masked key: the valid lengths n_b when every row masks exactly its
    keys j >= n_b (right padding), else None."""
    n = (~pad).sum(-1)
    if bool(((_torch.arange(pad.shape[-1])[None, :] >= n[:, None]) == pad).all()):
        return n.numpy().astype(_np.int64)
    return None


def recognise(mask: Any, offset: Optional[int], local_size: Optional[int] = None) -> Optional[Structure]:
    """The Structure of a boolean (B, 1, L, S) mask built by transformers, or None.

    offset = q_offset - kv_offset, the position of query row 0 in key columns (the number of keys
    before the queries); local_size the sliding window (transformers' ``kv > q - w``). The structure
    is proposed from these and the mask's key padding, then checked: ``implied_mask`` of it equals
    `mask` everywhere, or None is returned (and the mask is read as it is)."""
    if not isinstance(mask, _torch.Tensor) or mask.dtype != _torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        return None
    B, _, L, S = mask.shape
    if B == 0 or L == 0 or S == 0:
        return None
    keys = mask.any(dim=2, keepdim=True)            # (B, 1, 1, S): keys some query sees
    candidates = []
    if offset is not None and 0 <= offset and offset + L <= S:
        # causal, the queries after `offset` keys; a window of local_size keys ending at the query
        options: Dict[str, Any] = {}
        if offset == 0:
            options["alignment"] = "top_left"
        else:
            options["alignment"] = "bottom_right"
            if offset + L < S:
                options["key_lengths"] = offset + L      # a static cache's empty slots
        if local_size is not None:
            options["window_size"] = (int(local_size) - 1, 0)
        plain = Structure(True, options, None)
        visible = implied_mask(plain, 1, L, S)[0, 0].any(0)            # (S,) keys the structure lets in
        pad = ~keys[:, 0, 0] & visible
        if not bool(pad.any()):
            candidates.append(plain)
        else:
            n = _suffix_lengths(pad | ~visible) if offset == 0 else None
            if n is not None:
                candidates.append(Structure(True, dict(options, key_lengths=n), None))
            candidates.append(Structure(True, options, keys))
    if local_size is None:
        # bidirectional (encoders): the same keys for every query
        pad = ~keys[:, 0, 0]
        n = _suffix_lengths(pad)
        if n is not None:
            candidates.append(Structure(False, {} if bool((n == S).all()) else {"key_lengths": n}, None))
        candidates.append(Structure(False, {}, mask[:, :, :1, :]))
    for st in candidates:
        if bool((implied_mask(st, B, L, S) == mask).all()):
            if st.is_causal and st.attn_mask is not None and offset is not None and offset + L == S:
                st = st._replace(flipped=_flipped(mask, keys, local_size))
            return st
    return None


def _flipped(mask: Any, keys: Any, local_size: Optional[int]) -> Optional[Structure]:
    """Causal attention of the last L queries over S keys, left-padded: reversed on both axes, query
    row i' = L-1-i sees key j' = S-1-j when j' >= i' (and j' <= i' + w - 1 in a window of w), and
    the keys before the padding's end come last: key_lengths = S - (first valid key). Checked as the
    rest: the reversed structure's mask, reversed, must be `mask`."""
    B, _, L, S = mask.shape
    valid = keys[:, 0, 0]
    first = _torch.where(valid.any(-1), valid.to(_torch.int8).argmax(-1), _torch.full((B,), S))
    st = Structure(False, {"alignment": "top_left", "key_lengths": (S - first).numpy().astype(_np.int64),
                           "window_size": (0, None if local_size is None else int(local_size) - 1)}, None)
    if bool((implied_mask(st, B, L, S).flip(-1).flip(-2) == mask).all()):
        return st
    return None


def _offset(kwargs: Dict[str, Any]) -> int:
    """q_offset - kv_offset from the mask builder's arguments (transformers 5: q_offset, default 0;
    4.x: cache_position[0])."""
    if kwargs.get("cache_position") is not None:
        q0 = kwargs["cache_position"][0]
    else:
        q0 = kwargs.get("q_offset", 0)
    return int(q0) - int(kwargs.get("kv_offset", 0) or 0)


def mask_builder(*args: Any, **kwargs: Any) -> Any:
    """transformers' SDPA mask builder, whose boolean mask then carries its Structure (when it has
    one) for `attention_forward`. Registered by :func:`register` in ``AttentionMaskInterface``."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    build: Any = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get("sdpa", sdpa_mask)
    mask = build(*args, **kwargs)
    if mask is not None and not args and not _torch.compiler.is_compiling():   # values read: not traced
        st = recognise(mask, _offset(kwargs), kwargs.get("local_size"))
        if st is not None:
            setattr(mask, _ATTR, st)
    return mask


def _wants_grad(*tensors: Any) -> bool:
    return _torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _sdpa(query: Any, key: Any, value: Any, attn_mask: Any = None, is_causal: bool = False, *,
          reverse: bool = False, **options: Any) -> Any:
    """selfattn.torch's differentiable attention when a gradient is wanted; without one (inference,
    generation) the NumPy function on the tensors' memory: the same kernel and the same bits, without
    the autograd Function and the log-sum-exp kept for a backward (about 40 us a call less).
    reverse (no gradient only): query, key and value read backwards along the sequence (a
    Structure's ``flipped`` options), the output turned back."""
    sinks = options.get("sinks")
    if _wants_grad(query, key, value, *([sinks] if isinstance(sinks, _torch.Tensor) else [])):
        if reverse:
            raise AssertionError("reverse is for calls without a gradient")
        return _torch_sdpa(query, key, value, attn_mask=attn_mask, is_causal=is_causal, **options)
    if isinstance(sinks, _torch.Tensor):
        options["sinks"] = _as_numpy(sinks.detach(), "sinks")
    q, k, v = _as_numpy(query, "query"), _as_numpy(key, "key"), _as_numpy(value, "value")
    if reverse:
        q, k, v = q[..., ::-1, :], k[..., ::-1, :], v[..., ::-1, :]
        for name in ("k_scale", "v_scale"):          # an int8 cache's scales: the same positions
            if options.get(name) is not None:
                options[name] = options[name][..., ::-1]
    mask = _as_numpy(attn_mask, "attn_mask")
    out = _np_sdpa(q, k, v, mask, is_causal=is_causal, **options)
    if reverse:
        out = out[..., ::-1, :].copy()          # torch takes no negative strides
    out.flags.writeable = True           # the kernel's own new array
    return _to_torch(out)


def attention_forward(module: Any, query: Any, key: Any, value: Any, attention_mask: Optional[Any],
                      dropout: float = 0.0, scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                      **kwargs: Any) -> Tuple[Any, None]:
    """One layer's attention, as transformers calls it: query (B, Hq, L, D), key and value (B, H, S, D)
    -> ((B, L, Hq, Dv), None). The arguments are transformers' (``sdpa_attention_forward``'s)."""
    train_dropout = float(dropout) if dropout and getattr(module, "training", False) else 0.0
    if kwargs.get("output_attentions", False):
        raise ValueError("attn_implementation='selfattn' never forms the attention weights: load the model with "
                         "attn_implementation='eager' for output_attentions=True (or use "
                         "selfattn.attention_weights on the layer's q and k)")
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError("attn_implementation='selfattn' does not take a position_bias (T5-style "
                                  "relative positions); use 'sdpa' or 'eager' for this model")
    paged = getattr(key, _PAGED, None)
    if paged is not None:                       # new_cache(paged=True): attention from the layer's pages
        return _paged_forward(paged, module, query, key, attention_mask, train_dropout, scaling, is_causal, kwargs)
    if key.device.type == "meta":
        raise TypeError("key is a placeholder on the meta device: the keys of new_cache(paged=True) reach "
                        "attn_implementation='selfattn' only as the cache's update() returned them, and this model "
                        "changed them first (repeated, sliced, ...): use new_cache() without paged=True for it")
    q_len, kv_len = query.shape[2], key.shape[2]
    options: Dict[str, Any] = {}
    if key.dtype in (_torch.int8, _torch.float8_e4m3fn, _torch.float8_e5m2):
        # new_cache(kv_dtype="int8" / float8): the scales ride on the views
        scales = getattr(key, _SCALES, None)
        if scales is None or _wants_grad(query):
            raise TypeError(f"{key.dtype} keys reach attn_implementation='selfattn' only from selfattn."
                            f"transformers.new_cache(kv_dtype=...), in inference (torch.no_grad())")
        options["k_scale"], options["v_scale"] = scales
    st = getattr(attention_mask, _ATTR, None)
    if attention_mask is not None and st is not None and tuple(attention_mask.shape[-2:]) == (q_len, kv_len) \
            and attention_mask.shape[0] in (1, query.shape[0]):
        # the mask's structure: causal / window / key lengths in the kernel, at most a key mask
        if st.flipped is not None and not _wants_grad(query, key, value):
            st = st.flipped                     # left padding read backwards: key_lengths, nothing masked
            options["reverse"] = True
        causal, attention_mask = st.is_causal, st.attn_mask
        options.update(st.options)
    else:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        # as transformers' SDPA path: the causal flag only for a prefill without a mask; a mask, when
        # given, already holds causality, padding and windows (read in place, never expanded)
        causal = bool(q_len > 1 and attention_mask is None and causal)
        if causal and kv_len > q_len:
            # prefill into an empty preallocated cache: the keys past the queries are empty slots
            key, value = key[:, :, :q_len], value[:, :, :q_len]
            if "k_scale" in options:
                options["k_scale"], options["v_scale"] = options["k_scale"][..., :q_len], options["v_scale"][..., :q_len]
    if kwargs.get("softcap") is not None:
        options["softcap"] = float(kwargs["softcap"])
    if kwargs.get("s_aux") is not None:
        # gpt-oss's attention sinks: one learnable logit per query head in every row's denominator
        # (selfattn's sinks=, in the kernel; its gradient through the torch bridge)
        options["sinks"] = kwargs["s_aux"]
    if train_dropout:           # attention dropout in training: in the kernel, its seed from torch's generator
        options["dropout_p"], options["seed"] = train_dropout, _torch_seed()
    out = _sdpa(query, key, value, attn_mask=attention_mask, is_causal=causal, scale=scaling,
                enable_gqa=key.shape[1] != query.shape[1], **options)
    return out.transpose(1, 2).contiguous(), None


def _paged_mask(mask: Any, B: int, L: int, S: int) -> Tuple[Optional[Any], Optional[Tuple[int, int]]]:
    """(left padding per row or None, window_size or None) of the mask transformers made for L queries
    over a paged layer's S positions (the queries its last ones): what generate() builds -- none,
    causal, a sliding window, left padding -- or NotImplementedError naming what it is instead."""
    if mask is None:
        return None, None
    st: Optional[Structure] = getattr(mask, _ATTR, None)
    what = None
    if st is None or tuple(mask.shape[-2:]) != (L, S) or mask.shape[0] not in (1, B):
        what = f"a {tuple(mask.shape)} {mask.dtype} mask that is not one of these (a 4-D mask given by the caller, " \
               f"packed sequences, chunked attention, ...)"
    elif not st.is_causal:
        what = "bidirectional"
    elif st.options.get("alignment") == "top_left" and L != S:
        what = "causal with the queries at the start of the keys"
    elif st.attn_mask is None:
        kl = st.options.get("key_lengths")
        if kl is not None and bool((_np.asarray(kl) != S).any()):
            what = "right padding (keys masked at the end)"
    elif st.flipped is None:
        what = "padding other than on the left (masked keys between valid ones)"
    if what is not None:
        raise NotImplementedError(f"new_cache(paged=True) attends from its pages with the masks generate() builds "
                                  f"(causal, a sliding window, left padding); this attention_mask is {what}: use "
                                  f"new_cache() without paged=True for it")
    assert st is not None
    window = st.options.get("window_size")
    if st.flipped is None:
        return None, window
    valid = _np.broadcast_to(_np.asarray(st.flipped.options["key_lengths"], _np.int64), (B,))
    return S - valid, window


def _paged_forward(layer: Any, module: Any, query: Any, key: Any, attention_mask: Optional[Any], dropout: float,
                   scaling: Optional[float], is_causal: Optional[bool], kwargs: Dict[str, Any]) -> Tuple[Any, None]:
    """attention_forward for the keys of a PagedKVCacheLayer: paged attention of the queries (the layer's
    last positions, bottom-right causal) to its pages, the left padding (never stored) from the mask."""
    B, L, S = query.shape[0], query.shape[2], key.shape[2]
    if dropout:
        raise NotImplementedError("new_cache(paged=True) is for inference: call model.eval() (no attention dropout)")
    if S != layer.length or B != len(layer.seq_ids):
        raise ValueError(f"these keys ({B} sequences of {S} positions) are from an earlier state of their paged cache "
                         f"(now {len(layer.seq_ids)} of {layer.length}): attend right after the cache's update()")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None and L > 1 and not causal:
        raise NotImplementedError("new_cache(paged=True) attends causally (the queries are its last positions); "
                                  "this layer is bidirectional: use new_cache() without paged=True")
    left_padding, window = _paged_mask(attention_mask, B, L, S)
    options: Dict[str, Any] = {"scale": scaling}
    if window is not None:
        options["window_size"] = window
    if kwargs.get("softcap") is not None:
        options["softcap"] = float(kwargs["softcap"])
    if kwargs.get("s_aux") is not None:         # gpt-oss's attention sinks, in the kernel
        options["sinks"] = _as_numpy(kwargs["s_aux"], "s_aux")
    out = layer.attend(_as_numpy(query, "query"), left_padding, **options)
    out.flags.writeable = True                  # the kernel's own new array
    return _to_torch(out).transpose(1, 2).contiguous(), None


def register(name: str = NAME) -> str:
    """Make ``attn_implementation=name`` (default ``"selfattn"``) available to every transformers
    model; returns the name. Idempotent. Raises ImportError (naming the versions) for a transformers
    older than 4.57."""
    import transformers
    from transformers import AttentionInterface
    if _version_tuple(transformers.__version__) < MIN_VERSION:
        raise ImportError(f"selfattn.transformers needs transformers >= {'.'.join(map(str, MIN_VERSION))} "
                          f"(the oldest its tests pass with; tested: 4.57.6, 5.0.0, 5.10.4, 5.25.0); found "
                          f"{transformers.__version__}")
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask_builder)
    return name


# ---------------------------------------------------------------- a cache for generate()

_CACHE_CLASSES: Dict[str, Any] = {}
_SCALES = "_selfattn_kv_scales"     # an int8 cache's key view carries (key scales, value scales)
_PAGED = "_selfattn_paged"          # a paged cache's key placeholder carries its layer


def _check_kv_dtype(kv_dtype: Optional[str], keys: Any) -> None:
    if kv_dtype and keys.dtype != _np.float32:
        raise TypeError(f"new_cache(kv_dtype={kv_dtype!r}) holds a float32 model's keys and values (the kernels "
                        f"take float32 queries with narrower K/V); this model's are {keys.dtype}")


def _left_aligned(a: Any, left: Any) -> Any:
    """(B, H, n, E) with row b's first left[b] positions (its padding) dropped and the rest moved to the
    front (zeros after): a copy, for PagedKVCache.append's counts (the first counts[b] rows)."""
    out = _np.zeros_like(a)
    n = a.shape[2]
    for b, pad in enumerate(left.tolist()):
        out[b, :, :n - pad] = a[b, :, pad:]
    return out


def _index_array(idx: Any, batch: int) -> Any:
    """A batch index (a torch tensor, list, slice or array: what transformers passes) as the NumPy
    array of the sequences it picks, for KVCache.reorder."""
    if isinstance(idx, _torch.Tensor):
        idx = idx.detach().cpu().numpy()
    return _np.arange(batch)[idx]


def _cropped_length(length: int, n: Any) -> int:
    """The positions a layer of `length` keeps after transformers' ``crop(n)``: n < 0 drops -n from the
    end, n > 0 keeps at most n (the absolute length of transformers 4.x), and 0 removes nothing in
    transformers 5 (``crop(tokens_to_remove)``: assisted decoding crops 0 when every candidate is
    accepted) but everything in 4.x, as its DynamicLayer does (asked once)."""
    if isinstance(n, (bool, _np.bool_)) or not isinstance(n, (int, _np.integer)):
        raise TypeError(f"crop takes an int, got {type(n).__name__}")
    n = int(n)
    if n < 0:
        return max(length + n, 0)
    if n == 0 and _CACHE_CLASSES["crop_zero_keeps"]:
        return length
    return min(length, n)


def _crop_zero_keeps(layer_class: Any) -> bool:
    """Whether transformers' DynamicLayer.crop(0) keeps a layer's positions (5.x) or drops them (4.x)."""
    probe = layer_class()
    t = _torch.zeros(1, 1, 1, 1)
    probe.update(t, t)
    probe.crop(0)
    return bool(probe.get_seq_length() == 1)


def _cache_classes() -> Tuple[Any, Any]:
    """KVCacheLayer and SelfattnCache, made on first use (transformers is imported only then)."""
    if not _CACHE_CLASSES:
        try:
            from transformers.cache_utils import Cache, DynamicLayer
        except ImportError:
            import transformers
            raise ImportError(f"selfattn.transformers.new_cache() needs transformers' cache layers "
                              f"(transformers.cache_utils.DynamicLayer; tested with 4.57.6 to 5.25.0), not in "
                              f"transformers {transformers.__version__}") from None

        class KVCacheLayer(DynamicLayer):  # type: ignore[misc, valid-type, unused-ignore]
            """One layer's keys and values in a :class:`selfattn.KVCache`: preallocated (``max_len``
            positions; past that its capacity doubles), each step written in place, the layer given
            views of the valid positions (no ``torch.cat`` per step). Grouped, padded and 16-bit
            models alike; cropping in place (:meth:`selfattn.KVCache.crop`), beam search's reorder and
            batch selection by :meth:`selfattn.KVCache.reorder` (one copy of the valid positions)."""

            def __init__(self, max_len: int = 0, kv_dtype: Optional[str] = None) -> None:
                super().__init__()
                self.max_len = int(max_len)
                self.kv_dtype = kv_dtype
                self.kv: Optional[_KVCache] = None

            def lazy_initialization(self, key_states: Any, value_states: Any) -> None:
                self.device = key_states.device
                self.is_initialized = True

            def _expose(self) -> None:
                assert self.kv is not None
                views = []
                for a in (self.kv.keys, self.kv.values):
                    a.flags.writeable = True           # a view of the cache's own buffer; torch needs it writable
                    views.append(_to_torch(a))
                self.keys, self.values = views
                if self.kv.kv_dtype:                   # int8 / float8: the scales beside the values (attention_forward)
                    setattr(self.keys, _SCALES, (self.kv.key_scales, self.kv.value_scales))

            def _fill(self, key_states: Any, value_states: Any) -> None:
                k, v = _as_numpy(key_states, "key_states"), _as_numpy(value_states, "value_states")
                B, H, n, E = k.shape
                _check_kv_dtype(self.kv_dtype, k)
                if self.kv is None or self.kv.batch != B or self.kv.num_kv_heads != H or self.kv.dtype != k.dtype:
                    self.kv = _KVCache(B, H, max(self.max_len, n), E, v.shape[-1], dtype=k.dtype, grow=True,
                                       kv_dtype=self.kv_dtype)
                self.kv.append(k, v)
                self._expose()

            def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> Tuple[Any, Any]:
                if _torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
                    raise NotImplementedError("selfattn.transformers.new_cache() holds no autograd history: run "
                                              "generation under torch.no_grad(), or train with use_cache=False")
                self._fill(key_states, value_states)
                if not self.is_initialized:     # only once filled: a refused first call leaves the layer as new
                    self.lazy_initialization(key_states, value_states)
                return self.keys, self.values

            def _adopt(self) -> None:
                """After DynamicLayer's own operation made new tensors (no KVCache yet): into a KVCache."""
                keys, values = self.keys, self.values
                self.kv = None
                if keys is not None and keys.numel():
                    self._fill(keys, values)

            def reset(self) -> None:
                if self.kv is not None:
                    self.kv.reset()
                    self._expose()

            # cropping (speculative decoding), beam search's reorder, batch selection and repetition:
            # in the KVCache itself (crop in place; the others copy the valid positions once)
            def crop(self, max_length: int) -> None:
                if self.kv is None:
                    super().crop(max_length)
                    return
                self.kv.crop(_cropped_length(int(self.kv.lengths.max(initial=0)), max_length))
                self._expose()

            def reorder_cache(self, beam_idx: Any) -> None:
                if self.kv is None:
                    super().reorder_cache(beam_idx)
                    return
                self.kv.reorder(_index_array(beam_idx, self.kv.batch))
                self._expose()

            def batch_repeat_interleave(self, repeats: int) -> None:
                if self.kv is None:
                    super().batch_repeat_interleave(repeats)
                    return
                self.kv.reorder(_np.repeat(_np.arange(self.kv.batch), int(repeats)))
                self._expose()

            def batch_select_indices(self, indices: Any) -> None:
                if self.kv is None:
                    super().batch_select_indices(indices)
                    return
                self.kv.reorder(_index_array(indices, self.kv.batch))
                self._expose()

        class PagedKVCacheLayer(DynamicLayer):  # type: ignore[misc, valid-type, unused-ignore]
            """One layer's keys and values in a :class:`selfattn.PagedKVCache`, a sequence per batch row
            (``layer.pages``, ``layer.seq_ids``), each step appended in place; ``attn_implementation=
            "selfattn"`` attends from the pages (:meth:`selfattn.PagedKVCache.attend`). Left padding is not
            stored: the first update's positions wait for the first attention, whose mask says how many of
            each row's first positions are padding (``layer.left_padding``). ``update`` returns meta-device
            placeholders of the keys' shape, which only that attention reads. Cropping: each sequence's
            :meth:`~selfattn.PagedKVCache.crop`; reorder, batch selection and repetition: forks of the rows
            kept (blocks shared, copied on write), the old sequences freed."""

            def __init__(self, max_len: int = 0, kv_dtype: Optional[str] = None, block_size: int = 16,
                         num_blocks: Optional[int] = None, config: Any = None) -> None:
                super().__init__()
                self.max_len, self.kv_dtype = int(max_len), kv_dtype
                self.block_size, self.num_blocks = int(block_size), num_blocks
                self.config = config                # its attention implementation, checked at each update
                self.pages: Optional[_PagedKVCache] = None
                self.seq_ids: List[int] = []
                self.left_padding: Optional[Any] = None   # (batch,) int64: each row's first positions not stored
                self.length = 0                     # positions as transformers counts them (padding included)
                self._pending: Optional[Tuple[Any, Any]] = None    # the first update's K/V, until the mask is known

            def lazy_initialization(self, key_states: Any, value_states: Any) -> None:
                self.device = key_states.device
                self.is_initialized = True

            def get_seq_length(self) -> int:
                return self.length

            def _check_implementation(self) -> None:
                impl = getattr(self.config, "_attn_implementation", None)
                if impl is None:
                    return
                from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
                if ALL_ATTENTION_FUNCTIONS.get(impl) is not attention_forward:
                    raise ValueError(f"new_cache(paged=True) is read only by attn_implementation='selfattn' (it "
                                     f"attends from the pages); this model runs {impl!r}: model.set_attn_implementation"
                                     f"('selfattn'), or new_cache() without paged=True")

            def _pool_size(self, batch: int) -> int:
                return self.num_blocks if self.num_blocks is not None else batch * -(-self.max_len // self.block_size)

            def _write(self, k: Any, v: Any, counts: Optional[Any] = None) -> None:
                assert self.pages is not None
                try:
                    self.pages.append(self.seq_ids, k, v, counts=counts)
                except _CacheFullError as exc:
                    longest = max(self.pages.seq_len(s) for s in self.seq_ids) + \
                        (k.shape[2] if counts is None else int(counts.max()))
                    raise _CacheFullError(
                        f"new_cache(paged=True, max_len={self.max_len}, block_size={self.block_size}, num_blocks="
                        f"{self.num_blocks}): a layer's pool of {self.pages.num_blocks} blocks is full, with "
                        f"{len(self.seq_ids)} sequences of up to {longest} positions (left padding not stored); nothing was written. Make the "
                        f"cache with a larger max_len (positions per sequence: prompt plus new tokens) or num_blocks") \
                        from exc

            def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> Tuple[Any, Any]:
                if _torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
                    raise NotImplementedError("selfattn.transformers.new_cache() holds no autograd history: run "
                                              "generation under torch.no_grad(), or train with use_cache=False")
                self._check_implementation()
                k, v = _as_numpy(key_states, "key_states"), _as_numpy(value_states, "value_states")
                _check_kv_dtype(self.kv_dtype, k)
                B, H, n, E = k.shape
                if self.length == 0:
                    # a new batch: its sequences, written once attention knows the padding (_flush)
                    blocks = self._pool_size(B)
                    p = self.pages
                    # a new pool where it does not fit, or float8's (its per-head scales: the batch's first rows)
                    if p is None or (p.num_blocks, p.num_kv_heads, p.head_dim, p.value_dim, p.dtype) != \
                            (blocks, H, E, v.shape[-1], k.dtype) or self.kv_dtype in _FLOAT8:
                        p = _PagedKVCache(blocks, self.block_size, H, E, dtype=k.dtype, kv_dtype=self.kv_dtype,
                                          value_dim=v.shape[-1])
                    else:
                        for s in self.seq_ids:
                            p.free(s)
                    self.pages = p
                    self.seq_ids = [p.add_sequence() for _ in range(B)]
                    self.left_padding = None
                    self._pending = (k, v)
                else:
                    p = self.pages
                    assert p is not None
                    if (B, H, E, v.shape[-1], k.dtype) != (len(self.seq_ids), p.num_kv_heads, p.head_dim, p.value_dim,
                                                           p.dtype):
                        raise ValueError(f"key_states {tuple(k.shape)} {k.dtype} do not continue this paged cache's "
                                         f"{len(self.seq_ids)} sequences of {p.num_kv_heads} heads of {p.head_dim} "
                                         f"({p.dtype}); reset() it for another batch")
                    self._flush()
                    self._write(k, v)
                self.length += n
                if not self.is_initialized:
                    self.lazy_initialization(key_states, value_states)
                keys = _torch.empty((B, H, self.length, E), dtype=key_states.dtype, device="meta")
                values = _torch.empty((B, H, self.length, v.shape[-1]), dtype=value_states.dtype, device="meta")
                setattr(keys, _PAGED, self)
                return keys, values

            def _flush(self, left_padding: Optional[Any] = None) -> None:
                """The first update's positions into the pages, each row's first left_padding[b] left out."""
                if self._pending is None:
                    return
                k, v = self._pending
                pad = _np.zeros(len(self.seq_ids), _np.int64) if left_padding is None else left_padding
                counts = None
                if pad.any():
                    counts = k.shape[2] - pad
                    k, v = _left_aligned(k, pad), _left_aligned(v, pad)
                try:
                    self._write(k, v, counts)
                except _CacheFullError:
                    self.reset()                    # nothing was written: the layer as new
                    raise
                self._pending = None
                self.left_padding = pad

            def attend(self, query: Any, left_padding: Optional[Any], **options: Any) -> Any:
                """PagedKVCache.attend of the queries (B, Hq, L, E) to the rows' sequences; left_padding
                (B,) from the step's mask (None: none), which the first step's must match."""
                if self._pending is not None:
                    self._flush(left_padding)
                else:
                    pad = _np.zeros(len(self.seq_ids), _np.int64) if left_padding is None else left_padding
                    assert self.left_padding is not None
                    # the mask shows the padding the queries could see: with a window of `left` past keys,
                    # none before the first query's window (its first visible key, where it has none)
                    left = (options.get("window_size") or (None, None))[0]
                    lo = 0 if left is None else max(self.length - query.shape[2] - int(left), 0)
                    if not _np.array_equal(_np.maximum(pad, lo), _np.maximum(self.left_padding, lo)):
                        raise NotImplementedError(
                            f"the attention mask's left padding {pad.tolist()} is not the one this paged cache was "
                            f"filled with ({self.left_padding.tolist()}); padded positions are not stored: use "
                            f"new_cache() without paged=True for masks that change so")
                assert self.pages is not None
                return self.pages.attend(query, self.seq_ids, **options)

            def reset(self) -> None:
                if self.pages is not None:
                    for s in self.seq_ids:
                        self.pages.free(s)
                self.seq_ids, self.length, self.left_padding, self._pending = [], 0, None, None

            # crop: each sequence's PagedKVCache.crop; reorder, selection, repetition: forks (no copy)
            def crop(self, max_length: int) -> None:
                if self.pages is None or self.length == 0:
                    return
                self._flush()
                assert self.left_padding is not None
                new = _cropped_length(self.length, max_length)
                for s, pad in zip(self.seq_ids, self.left_padding.tolist()):
                    self.pages.crop(s, max(new - pad, 0))
                self.left_padding = _np.minimum(self.left_padding, new)
                self.length = new

            def _select(self, idx: Any) -> None:
                """Row i becomes the former row idx[i]: a fork of its sequence (blocks shared)."""
                if self.pages is None or self.length == 0:
                    return
                if idx.size == 0:
                    raise ValueError("a paged cache keeps at least one sequence: the batch indices are empty")
                self._flush()
                assert self.left_padding is not None
                forks = [self.pages.fork(self.seq_ids[i]) for i in idx.tolist()]
                for s in self.seq_ids:
                    self.pages.free(s)
                self.seq_ids, self.left_padding = forks, self.left_padding[idx]

            def reorder_cache(self, beam_idx: Any) -> None:
                self._select(_index_array(beam_idx, len(self.seq_ids)))

            def batch_select_indices(self, indices: Any) -> None:
                self._select(_index_array(indices, len(self.seq_ids)))

            def batch_repeat_interleave(self, repeats: int) -> None:
                self._select(_np.repeat(_np.arange(len(self.seq_ids)), int(repeats)))

        class SelfattnCache(Cache):  # type: ignore[misc, valid-type, unused-ignore]
            """A transformers ``Cache`` of :class:`KVCacheLayer` s, or of :class:`PagedKVCacheLayer` s
            with ``paged=True`` (see :func:`new_cache`)."""

            def __init__(self, config: Any = None, max_len: int = 0, kv_dtype: Optional[str] = None, *,
                         paged: bool = False, block_size: int = 16, num_blocks: Optional[int] = None) -> None:
                def make_layer(text_config: Any = None) -> Any:
                    if paged:
                        return PagedKVCacheLayer(max_len, kv_dtype, block_size, num_blocks, text_config)
                    return KVCacheLayer(max_len, kv_dtype)

                if config is None:
                    super().__init__(layer_class_to_replicate=make_layer)  # type: ignore[arg-type, unused-ignore]
                    return
                text = config.get_text_config(decoder=True)
                kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
                other = kinds - {"full_attention", "sliding_attention", "chunked_attention"}
                if other:
                    raise NotImplementedError(f"selfattn.transformers.new_cache() holds attention keys and values "
                                              f"only; this model's layer_types include {sorted(other)}: use "
                                              f"transformers' DynamicCache")
                # sliding layers keep every position too: the window is in the mask (and in the kernel)
                super().__init__(layers=[make_layer(text) for _ in range(text.num_hidden_layers)])

        _CACHE_CLASSES.update(layer=KVCacheLayer, paged_layer=PagedKVCacheLayer, cache=SelfattnCache,
                              crop_zero_keeps=_crop_zero_keeps(DynamicLayer))
    return _CACHE_CLASSES["layer"], _CACHE_CLASSES["cache"]


def new_cache(config: Any = None, max_len: int = 0, kv_dtype: Optional[str] = None, *, paged: bool = False,
              block_size: Optional[int] = None, num_blocks: Optional[int] = None) -> Any:
    """A transformers ``Cache`` whose layers keep their keys and values in :class:`selfattn.KVCache` s
    (or, ``paged=True``, in :class:`selfattn.PagedKVCache` s).

    ``model.generate(ids, cache=selfattn.transformers.new_cache(model.config, max_len=n))``: each layer's
    keys and values are preallocated for `max_len` positions (prompt plus new tokens; past that the
    capacity doubles) and written in place at every step; the attention reads views of them (no
    ``torch.cat`` of the whole cache per step, as transformers' ``DynamicCache`` does). Sliding-window
    layers keep every position (the window is applied by the mask, in the kernel). Inference only
    (gradients: ``use_cache=False``).

    ``kv_dtype`` (a float32 model; :class:`selfattn.KVCache`'s): ``"int8"`` (one float32 scale per
    position and kv head; a quarter of the memory), ``"float8_e4m3fn"`` / ``"float8_e5m2"`` (one
    scale per sequence and kv head, set by its first rows; a quarter), ``"bfloat16"`` /
    ``"float16"`` (half): converted as they are appended and read as stored by the kernels
    (``attn_implementation="selfattn"`` only: the layer hands transformers views of that dtype,
    the scales beside).

    ``paged=True`` (``attn_implementation="selfattn"`` only): each layer's keys and values in a
    :class:`selfattn.PagedKVCache` of `num_blocks` blocks of `block_size` positions (default 16), one
    sequence per batch row, appended in place; the attention reads the pages
    (:func:`selfattn.paged_attention`, no dense copy), bit for bit what the dense cache gives at the same
    `kv_dtype` where no row is left-padded. `kv_dtype`: any the pages take (``"int8"``; float8, its
    per-head scales set by each new batch's first rows; ``"bfloat16"``, ``"float16"``). Left padding
    is never stored: the first step's mask says how much each row has, and a later mask with other
    padding, or any mask but those ``generate()`` builds (causal, sliding window, left padding),
    raises NotImplementedError.
    The pool does not grow: `num_blocks` defaults to batch x ceil(`max_len` / `block_size`) (the batch
    of the first step, beams included), so it needs `max_len` (or `num_blocks`), and an append that
    finds too few free blocks raises :class:`selfattn.CacheFullError` (nothing written). Cropping
    (assisted decoding) releases blocks; beam search's reorder, batch selection and repetition fork
    the sequences kept (blocks shared, copied when written). ``update`` hands transformers meta-device
    placeholders, so another attention implementation cannot read it: where `config` says the model
    runs one, ``update`` raises ValueError."""
    max_len = _check_size(max_len, "max_len", 0)
    if not isinstance(paged, (bool, _np.bool_)):
        raise TypeError(f"paged must be a bool, got {type(paged).__name__}")
    if not paged and (block_size is not None or num_blocks is not None):
        raise ValueError("block_size and num_blocks size the pages of new_cache(paged=True); pass paged=True")
    block_size = 16 if block_size is None else _check_size(block_size, "block_size", 1)
    if num_blocks is not None:
        num_blocks = _check_size(num_blocks, "num_blocks", 1)
    elif paged and max_len == 0:
        raise ValueError("new_cache(paged=True) sizes its pool from max_len (positions per sequence: prompt plus new "
                         "tokens) or num_blocks (blocks per layer); pass one of them")
    if kv_dtype is not None:
        from .quant import _kv_dtype
        kv_dtype = _kv_dtype(kv_dtype)
    return _cache_classes()[1](config, max_len, kv_dtype, paged=bool(paged), block_size=block_size,
                               num_blocks=num_blocks)
