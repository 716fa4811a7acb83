"""use_isa is per context (thread, asyncio task), set_isa / SELFATTN_ISA are the process default.

What ran is checked twice: config()["isa"] in the thread, and the result's bits, which differ
from one path to another on the inputs used here (asserted) and are reproducible on each path
(the kernel is deterministic), so a call that ran on another thread's path gives other bits.
"""

import asyncio
import contextvars
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import selfattn
from selfattn import _core
from sa_testutil import BF16_DOT_BASE, ISAS

sdpa = selfattn.scaled_dot_product_attention
DEFAULT = selfattn.config()["isa"]
# the path whose float32 bits a path gives: a bfloat16-dot path (avx512bf16, the default on AMD's
# Zen 4 / 5; neonbf16) runs its base path's float32 kernels (sa_testutil.ISAS leaves it out)
BITS = BF16_DOT_BASE
DEFAULT_BITS = BITS.get(DEFAULT, DEFAULT)

needs_two = pytest.mark.skipif(len(ISAS) < 2, reason="only one instruction set runs on this CPU")


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((2, 3, 70, 20)).astype(np.float32) for _ in range(3))
    return q, k, v


def _fingerprints():
    """{isa: the bytes of out on that path}, computed serially; they must differ between paths."""
    q, k, v = _inputs()
    fp = {}
    for name in ISAS:
        with selfattn.use_isa(name):
            fp[name] = sdpa(q, k, v, num_threads=1).tobytes()
    assert len(set(fp.values())) == len(fp), (
        "two paths give the same bits on these inputs: the bits no longer tell which path ran; "
        "pick other inputs")
    return fp


def _which(out_bytes, fp):
    return [n for n, b in fp.items() if b == out_bytes] or ["<none: bits of no path>"]


@needs_two
def test_threads_forcing_different_paths_at_once_each_get_their_own():
    fp = _fingerprints()
    q, k, v = _inputs()
    plans = [(n, True) for n in ISAS] + [(DEFAULT, False)]   # every path forced, and one plain thread
    inside = threading.Barrier(len(plans))     # all blocks entered before any call
    before_exit = threading.Barrier(len(plans))   # all blocks still active after every call
    seen, errors = {}, []

    def worker(i, name, forced):
        try:
            ctx = selfattn.use_isa(name) if forced else _nullcontext()
            with ctx:
                inside.wait(timeout=60)
                got = [selfattn.config()["isa"]]
                for rep in range(5):
                    out = sdpa(q, k, v, num_threads=1 + rep % 2)
                    got.append(_which(out.tobytes(), fp)[0])
                    got.append(selfattn.config()["isa"])
                before_exit.wait(timeout=60)
            got.append(selfattn.config()["isa"])          # after the block: the default again
            seen[i] = got
        except BaseException as exc:  # noqa: BLE001
            errors.append(f"thread {i} ({name}, forced={forced}): {exc!r}")
            inside.abort()
            before_exit.abort()

    threads = [threading.Thread(target=worker, args=(i, n, f)) for i, (n, f) in enumerate(plans)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    for i, (name, forced) in enumerate(plans):
        want = [name] + [BITS.get(name, name), name] * 5
        assert seen[i][:-1] == want, f"thread {i} forced={forced} {name}: config/bits said {seen[i]}"
        assert seen[i][-1] == DEFAULT


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@needs_two
def test_use_isa_in_one_thread_leaves_the_main_thread_alone():
    other = ISAS[-1] if DEFAULT_BITS != ISAS[-1] else ISAS[0]
    fp = _fingerprints()
    q, k, v = _inputs()
    entered, release = threading.Event(), threading.Event()

    def worker():
        with selfattn.use_isa(other):
            entered.set()
            release.wait(timeout=60)

    t = threading.Thread(target=worker)
    t.start()
    try:
        assert entered.wait(timeout=60)
        assert selfattn.config()["isa"] == DEFAULT
        assert _which(sdpa(q, k, v, num_threads=1).tobytes(), fp) == [DEFAULT_BITS]
    finally:
        release.set()
        t.join(timeout=60)


def test_new_thread_does_not_inherit_unless_given_the_context():
    forced = "generic"
    fp = _fingerprints() if len(ISAS) > 1 else None
    q, k, v = _inputs()
    res = {}

    def probe(key):
        out = sdpa(q, k, v, num_threads=1).tobytes()
        res[key] = (selfattn.config()["isa"], _which(out, fp)[0] if fp else None)

    with selfattn.use_isa(forced):
        plain = threading.Thread(target=probe, args=("plain",))
        ctx = contextvars.copy_context()
        copied = threading.Thread(target=ctx.run, args=(probe, "copied"))
        for t in (plain, copied):
            t.start()
            t.join(timeout=60)
        with ThreadPoolExecutor(max_workers=1) as ex:
            ex.submit(probe, "pool").result(timeout=60)
            ex.submit(contextvars.copy_context().run, probe, "pool copied").result(timeout=60)
    expect_plain = (DEFAULT, DEFAULT_BITS if fp else None)
    expect_forced = (forced, forced if fp else None)
    assert res == {"plain": expect_plain, "copied": expect_forced, "pool": expect_plain,
                   "pool copied": expect_forced}, res


@needs_two
def test_asyncio_tasks_each_keep_their_own_path():
    fp = _fingerprints()
    q, k, v = _inputs()
    a, b = ISAS[0], ISAS[-1]

    async def task(name, my_turn, their_turn, log):
        with selfattn.use_isa(name):
            for _ in range(3):
                await my_turn.wait()
                my_turn.clear()
                log.append((name, selfattn.config()["isa"], _which(sdpa(q, k, v, num_threads=1).tobytes(), fp)[0]))
                their_turn.set()
                await asyncio.sleep(0)

    async def main():
        log = []
        ta, tb = asyncio.Event(), asyncio.Event()
        ta.set()
        await asyncio.gather(task(a, ta, tb, log), task(b, tb, ta, log))
        # a task created inside a block inherits it (the task copies the context)
        with selfattn.use_isa(b):
            inherited = await asyncio.create_task(_probe_isa())
        return log, inherited, selfattn.config()["isa"]

    async def _probe_isa():
        return selfattn.config()["isa"]

    log, inherited, after = asyncio.run(main())
    names = [x[0] for x in log]
    assert names == [a, b] * 3, names        # the two blocks really were active at once
    for name, cfg, ran in log:
        assert cfg == ran == name, log
    assert inherited == b
    assert after == DEFAULT == selfattn.config()["isa"]


@pytest.mark.parametrize("name", ISAS)
def test_nested_blocks_and_exceptions_restore_the_enclosing_path(name):
    with selfattn.use_isa(name):
        with pytest.raises(KeyError):
            with selfattn.use_isa("generic"):
                assert selfattn.config()["isa"] == _core.current_isa() == "generic"
                with selfattn.use_isa(name):
                    assert selfattn.config()["isa"] == name
                assert selfattn.config()["isa"] == "generic"
                raise KeyError("boom")
        assert selfattn.config()["isa"] == _core.current_isa() == name     # the enclosing block, not the default
    assert selfattn.config()["isa"] == _core.current_isa() == DEFAULT


def test_bad_names_raise_naming_the_choices_and_change_nothing():
    with pytest.raises(ValueError, match="unknown instruction set 'AVX2'.*generic"):
        with selfattn.use_isa("AVX2"):
            pass
    with pytest.raises(TypeError, match="name must be a str"):
        with selfattn.use_isa(None):
            pass
    with pytest.raises(TypeError, match="name must be a str"):
        selfattn.set_isa(2)
    assert selfattn.config()["isa"] == DEFAULT


@needs_two
def test_set_isa_is_the_default_that_use_isa_overrides():
    other = "generic" if DEFAULT != "generic" else ISAS[0]
    prev = selfattn.set_isa(other)
    try:
        assert prev == DEFAULT
        assert selfattn.config()["isa"] == _core.get_isa() == other
        seen = []
        t = threading.Thread(target=lambda: seen.append(selfattn.config()["isa"]))
        t.start()
        t.join(timeout=60)
        assert seen == [other], "the default is process-wide: a new thread sees it"
        with selfattn.use_isa(DEFAULT):
            assert selfattn.set_isa(other) == other
            assert selfattn.config()["isa"] == DEFAULT    # the block wins over the default inside it
    finally:
        selfattn.set_isa(prev)
    assert selfattn.config()["isa"] == _core.get_isa() == DEFAULT


@needs_two
def test_a_call_on_another_path_is_not_starved_by_busy_threads():
    """Two threads call on the default path back to back; a third, forced to another path,
    still gets its calls through (each call reads its own context's path: nobody waits)."""
    other = ISAS[-1] if DEFAULT_BITS != ISAS[-1] else ISAS[0]
    fp = _fingerprints()
    q, k, v = _inputs()
    done, errors, ran = threading.Event(), [], []

    def hammer():
        deadline = time.monotonic() + 60
        while not done.is_set() and time.monotonic() < deadline:
            if sdpa(q, k, v, num_threads=1).tobytes() != fp[DEFAULT_BITS]:
                errors.append("a default-path call ran on another path")

    def forced():
        with selfattn.use_isa(other):
            for _ in range(5):
                ran.append(_which(sdpa(q, k, v, num_threads=1).tobytes(), fp)[0])
        done.set()

    hs = [threading.Thread(target=hammer) for _ in range(2)]
    for t in hs:
        t.start()
    time.sleep(0.05)
    f = threading.Thread(target=forced)
    f.start()
    f.join(timeout=90)
    done.set()
    for t in hs:
        t.join(timeout=90)
    assert not f.is_alive() and ran == [other] * 5, f"the forced thread got {ran} (starved?)"
    assert not errors, errors[:3]


@needs_two
def test_many_threads_switching_paths_call_by_call():
    """Six threads, each changing its path every call: every
    call runs on its own path, nothing hangs, and the engine is left on the default."""
    fp = _fingerprints()
    q, k, v = _inputs()
    errors = []
    start = threading.Barrier(6)

    def worker(t):
        try:
            start.wait(timeout=60)
            for i in range(12):
                name = ISAS[(t + i) % len(ISAS)]
                with selfattn.use_isa(name):
                    ran = _which(sdpa(q, k, v, num_threads=1 + (t + i) % 2).tobytes(), fp)
                if ran != [name]:
                    errors.append(f"thread {t} call {i}: forced {name}, ran {ran}")
        except BaseException as exc:  # noqa: BLE001
            errors.append(f"thread {t}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads), "a thread hung"
    assert not errors, errors[:5]
    assert _which(sdpa(q, k, v, num_threads=1).tobytes(), fp) == [DEFAULT_BITS]
