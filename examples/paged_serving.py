"""Continuous batching over a paged KV cache: what a server does with selfattn.PagedKVCache.

Requests arrive with prompts of different lengths; each one's prompt is written into the pool
(prefill), then every step appends one new position to each running sequence and attends all of
them in ONE call, whatever their lengths; finished requests give their blocks back, new ones take
them. One request asks for two samples: `fork` shares its prompt's blocks, the two continuations
copy only the partly filled last block. A single attention layer with random projections stands in
for a model (the point is the cache). Each step is checked against dense attention over the same
rows: the same bits.

    python examples/paged_serving.py
"""

import time

import numpy as np

import selfattn


def run(num_requests=12, max_prompt=300, new_tokens=24, num_blocks=512, block_size=16, Hq=8, Hkv=2, E=64,
        max_running=6, seed=0, check=True):
    """Serve `num_requests` requests; returns a dict of what happened (steps, tokens, blocks at peak,
    the largest difference to dense attention: 0.0 when the bits agree)."""
    rng = np.random.default_rng(seed)
    cache = selfattn.PagedKVCache(num_blocks, block_size, Hkv, E)
    waiting = [(i, int(rng.integers(1, max_prompt))) for i in range(num_requests)]
    running = {}                                   # seq id -> tokens still to generate
    stats = {"steps": 0, "tokens": 0, "peak_blocks": 0, "max_diff": 0.0, "forks": 0}
    t0 = time.perf_counter()
    while waiting or running:
        while waiting and len(running) < max_running:      # admit: prefill the prompt
            req, n = waiting[0]
            # admit only what fits beside the blocks the running sequences will still take (no preemption;
            # + 1 each: a forked sequence's copy of a shared last block)
            def blocks(length):
                return -(-length // block_size)
            future = sum(blocks(cache.seq_len(s) + left) - blocks(cache.seq_len(s)) + 1 for s, left in running.items())
            need = blocks(n + new_tokens) * (2 if req == 0 else 1) + 1
            if need > cache.num_free_blocks - future:
                break
            waiting.pop(0)
            sid = cache.add_sequence()
            k, v = rng.standard_normal((2, 1, Hkv, n, E), dtype=np.float32)
            try:
                cache.append([sid], k, v)
            except selfattn.CacheFullError:                # no room: wait for blocks to come back
                cache.free(sid)
                waiting.insert(0, (req, n))
                break
            running[sid] = new_tokens
            if req == 0:                                   # two samples of the first request
                running[cache.fork(sid)] = new_tokens
                stats["forks"] += 1
        ids = list(running)
        k, v = rng.standard_normal((2, len(ids), Hkv, 1, E), dtype=np.float32)
        cache.append(ids, k, v)                            # one new position per running sequence
        q = rng.standard_normal((len(ids), Hq, 1, E), dtype=np.float32)
        out = cache.attend(q, ids)                         # one kernel call for the ragged batch
        if check:
            for i, s in enumerate(ids):
                dense = selfattn.scaled_dot_product_attention(q[i:i + 1], cache.keys(s)[None], cache.values(s)[None],
                                                              is_causal=True, alignment="bottom_right",
                                                              enable_gqa=True)
                stats["max_diff"] = max(stats["max_diff"], float(np.abs(out[i:i + 1] - dense).max()))
        stats["steps"] += 1
        stats["tokens"] += len(ids)
        stats["peak_blocks"] = max(stats["peak_blocks"], num_blocks - cache.num_free_blocks)
        for s in ids:
            running[s] -= 1
            if running[s] == 0:                            # finished: its blocks back to the pool
                del running[s]
                cache.free(s)
    stats["seconds"] = time.perf_counter() - t0
    stats["free_at_end"] = cache.num_free_blocks
    return stats


if __name__ == "__main__":
    s = run()
    print(f"{s['steps']} steps, {s['tokens']} tokens generated ({s['tokens'] / s['seconds']:.0f} tokens/s with the "
          f"checks), {s['forks']} fork, at most {s['peak_blocks']} of 512 blocks in use, all "
          f"{s['free_at_end']} free at the end; largest difference to dense attention: {s['max_diff']}")
