"""The report's test example as a runnable demo: L = 8, D = 64, H = 1, P = 1, e = 1.0, random q/k/v, the last
query equal to key 3; the verbose descent shows the buds, their alignments q . sum_k, the normalised pm, the sampled
bud, its expansion into children and the new bud list, round by round, and ends at leaf L - 1 + 3 = 10.

    python -m tree_attention.demo                       # alignment, verbose descent of the last query
    python -m tree_attention.demo --method FAVOR+
    python -m tree_attention.demo --profile             # line-by-line profile of tree.descend (line_profiler)
"""
from __future__ import annotations

from common.cli import script_parser

from .mass_estimators import METHODS
from .np_attention import report_example

KEY_LEAF = 8 - 1 + 3  # the leaf of key 3 in the L = 8 tree


def main(argv=None) -> list[int]:
    parser = script_parser("The report's L = 8 tree attention example, verbose descent.",
                           quick_help="(the example is already seconds-sized)",
                           device_help="(the example runs on the CPU, one token at a time)",
                           with_out=False)
    parser.add_argument("--method", default="alignment", choices=[m for m in METHODS if m != "tree-less"])
    parser.add_argument("--profile", action="store_true",
                        help="line-profile tree.descend (needs the optional package line_profiler)")
    args = parser.parse_args(argv)
    if args.profile:
        try:
            from line_profiler import LineProfiler
        except ImportError:
            raise SystemExit("--profile needs the optional package line_profiler, which is not installed "
                             "(pip install line_profiler); run without --profile for the verbose descent")
        from . import tree
        profiler = LineProfiler(tree.descend)
        buds = profiler.runcall(report_example, args.method, False, args.seed)
        profiler.print_stats()
    else:
        buds = report_example(args.method, True, args.seed)
    print(f"final buds of the last query: {buds}; leaf of key 3 is node {KEY_LEAF}: "
          f"{'reached' if KEY_LEAF in buds else 'NOT reached'}")
    return buds


if __name__ == "__main__":
    main()
