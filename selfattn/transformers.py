"""selfattn inside Hugging Face ``transformers``: ``attn_implementation="selfattn"``.

    import selfattn.transformers
    selfattn.transformers.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="selfattn")

:func:`register` adds selfattn's fused attention to transformers' ``AttentionInterface`` (the
attention of every layer) and the matching mask builder (transformers' SDPA one: a boolean
``(batch, 1, L, S)`` mask, or none where ``is_causal`` says all) to its ``AttentionMaskInterface``.
Each layer's attention then runs through :mod:`selfattn.torch` (fused forward and backward,
CPU tensors, float32 / float64 / float16 / bfloat16): grouped-query heads are read without
repeating K and V, the mask in place, ``softcap`` in the kernel. The cache, positions and
everything else stay transformers' own.

Not imported by ``import selfattn`` (transformers and torch are optional):
``import selfattn.transformers``. Supported: transformers >= 4.53 (the first with
``AttentionMaskInterface``); tested with the version CI installs (see the closing notes).
"""

from typing import Any, Optional, Tuple

from .torch import scaled_dot_product_attention as _sdpa

__all__ = ["register", "attention_forward", "NAME", "MIN_VERSION"]

NAME = "selfattn"
MIN_VERSION = (4, 53)


def _version_tuple(v: str) -> Tuple[int, ...]:
    out = []
    for part in v.split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def attention_forward(module: Any, query: Any, key: Any, value: Any, attention_mask: Optional[Any],
                      dropout: float = 0.0, scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                      **kwargs: Any) -> Tuple[Any, None]:
    """One layer's attention, as transformers calls it: query (B, Hq, L, D), key and value (B, H, S, D)
    -> ((B, L, Hq, Dv), None). The arguments are transformers' (``sdpa_attention_forward``'s)."""
    if dropout and getattr(module, "training", False):
        raise NotImplementedError(f"selfattn has no attention dropout (got dropout={dropout} in training); "
                                  f"set the model's attention_dropout to 0.0")
    if kwargs.get("output_attentions", False):
        raise ValueError("attn_implementation='selfattn' never forms the attention weights: load the model with "
                         "attn_implementation='eager' for output_attentions=True (or use "
                         "selfattn.attention_weights on the layer's q and k)")
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError("attn_implementation='selfattn' does not take a position_bias (T5-style "
                                  "relative positions); use 'sdpa' or 'eager' for this model")
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # as transformers' SDPA path: the causal flag only for a prefill without a mask; a mask, when
    # given, already holds causality, padding and windows (read in place, never expanded)
    causal = bool(q_len > 1 and attention_mask is None and causal)
    if causal and kv_len > q_len:
        # prefill into an empty preallocated cache: the keys past the queries are empty slots
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    options = {}
    if kwargs.get("softcap") is not None:
        options["softcap"] = float(kwargs["softcap"])
    out = _sdpa(query, key, value, attn_mask=attention_mask, is_causal=causal, scale=scaling,
                enable_gqa=key.shape[1] != query.shape[1], **options)
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME) -> str:
    """Make ``attn_implementation=name`` (default ``"selfattn"``) available to every transformers
    model; returns the name. Idempotent. Raises ImportError (naming the versions) for a transformers
    older than 4.53."""
    import transformers
    from transformers import AttentionInterface
    if _version_tuple(transformers.__version__) < MIN_VERSION:
        raise ImportError(f"selfattn.transformers needs transformers >= {'.'.join(map(str, MIN_VERSION))} "
                          f"(AttentionInterface and AttentionMaskInterface); found {transformers.__version__}")
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS.get("sdpa", sdpa_mask))
    return name

