"""Command line: ``python -m selfattn [command]``, or ``selfattn [command]`` once installed.

Commands:
    demo   the worked self-attention example (猫 在 草地上 跑) and a speed comparison
           (the default when no command is given)
"""

import argparse
import sys
from typing import List, Optional


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m selfattn",
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
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in (None, "demo"):
        from selfattn._demo import main as demo
        if getattr(args, "rounds", 9) < 1:
            _parser().error("--rounds must be >= 1")
        heatmap = None if getattr(args, "no_heatmap", False) else getattr(args, "heatmap", "selfattn-demo-attention.png")
        return demo(timing=not getattr(args, "no_timing", False), rounds=getattr(args, "rounds", 9), heatmap=heatmap)
    raise AssertionError(f"unhandled command {args.command!r}")   # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
