"""SRF's train mode on a CUDA GPU: our Triton kernel (``attn_fn='flash'``, ``flash_linear_attention.py``) checked
against the PyTorch chunked form (``common.linear_attention``; outputs and gradients), then both timed, forward and
forward + backward, against exact attention (SDPA) in the same dtype (``--dtype``, bfloat16 by default), B = 1,
H = 8, D = 64, m = 64, medians of 5 after 2 warm-ups.

    python -m srf_attention.benchmark_flash [--quick] [--dtype bfloat16]   # CUDA and Triton; --quick: checks only
"""
from __future__ import annotations

import torch

from common.bench import time_callable
from common.cli import script_parser
from common.data import synthetic_qkv

from .fast_attention import FastAttention
from .flash_linear_attention import check_available


def main(argv=None) -> list[dict]:
    """On a GPU: compare the kernel with the PyTorch form (outputs and gradients) and time both; returns the rows."""
    parser = script_parser(__doc__.split("\n")[0], quick_help="the correctness checks only, no timing",
                           device_help="a CUDA device (the kernel is Triton)", with_out=False)
    parser.set_defaults(device="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="dtype of the timings")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    args = parser.parse_args(argv)
    try:
        check_available(torch.device(args.device))
    except RuntimeError as error:
        parser.error(str(error))
    paths = ["torch", "flash"]
    torch.manual_seed(args.seed)
    print("| causal | dtype | B,H,L,D,m | path | max |path - torch| (output) | max rel. grad diff |\n|---|---|---|---|---|---|")
    for causal in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            for (b, h, n, d, m) in ((1, 1, 1, 8, 8), (2, 3, 100, 16, 20), (1, 4, 1000, 64, 64), (1, 2, 4097, 64, 100)):
                x = synthetic_qkv("gaussian", b, h, n, n, d, seed=args.seed, dtype=dtype, device=args.device)
                fast = FastAttention(d, m, causal=causal, seed=args.seed).to(args.device)
                ins = [t.clone().requires_grad_() for t in (x.q, x.k, x.v)]
                grad_out = torch.randn_like(x.v)
                outs, grads = {}, {}
                for attn_fn in paths:
                    out = fast(*ins, attn_fn=attn_fn)
                    grads[attn_fn] = torch.autograd.grad(out, ins, grad_out)
                    outs[attn_fn] = out.float()
                for attn_fn in paths[1:]:
                    diff = (outs["torch"] - outs[attn_fn]).abs().max().item()
                    gdiff = max(((g0.float() - g1.float()).abs().max() / g0.float().abs().max().clamp_min(1e-30)).item()
                                for g0, g1 in zip(grads["torch"], grads[attn_fn]))
                    print(f"| {causal} | {str(dtype)[6:]} | {b},{h},{n},{d},{m} | {attn_fn} | {diff:.2e} | {gdiff:.2e} |")
    if args.quick:
        return []
    dtype = getattr(torch, args.dtype)
    columns = [f"{p} {w}" for w in ("fwd", "fwd+bwd") for p in paths + ["exact"]]
    print(f"\n{args.dtype}, ms; exact = SDPA in {args.dtype}\n| causal | L | " + " | ".join(columns)
          + " | exact / best srf fwd | exact / best srf fwd+bwd |\n|" + "---|" * (len(columns) + 4))
    b, h, d, m = 1, 8, 64, 64
    rows = []
    for causal in (True, False):
        for n in args.lengths:
            x = synthetic_qkv("gaussian", b, h, n, n, d, seed=args.seed, dtype=dtype, device=args.device)
            fast = FastAttention(d, m, causal=causal, seed=args.seed).to(args.device)
            ins = [t.clone().requires_grad_() for t in (x.q, x.k, x.v)]
            calls = {p: (lambda p=p: fast(x.q, x.k, x.v, attn_fn=p)) for p in paths}
            calls["exact"] = lambda: torch.nn.functional.scaled_dot_product_attention(x.q, x.k, x.v, is_causal=causal)
            train = {p: (lambda p=p: fast(*ins, attn_fn=p).sum().backward()) for p in paths}
            train["exact"] = lambda: torch.nn.functional.scaled_dot_product_attention(*ins, is_causal=causal).sum().backward()
            row = dict(causal=causal, L=n, dtype=args.dtype)
            for p in paths + ["exact"]:
                with torch.no_grad():
                    row[f"{p} fwd"] = time_callable(calls[p], warmup=2, repeats=5, device=args.device).median_s
                row[f"{p} fwd+bwd"] = time_callable(train[p], warmup=2, repeats=5, device=args.device).median_s
            best = {w: min(row[f"{p} {w}"] for p in paths) for w in ("fwd", "fwd+bwd")}
            print(f"| {causal} | {n} | " + " | ".join(f"{1e3 * row[c]:.2f}" for c in columns)
                  + f" | {row['exact fwd'] / best['fwd']:.2f} | {row['exact fwd+bwd'] / best['fwd+bwd']:.2f} |")
            rows.append(row)
    return rows


if __name__ == "__main__":
    main()
