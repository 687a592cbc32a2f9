"""The Triton kernel of ``flash_linear_attention.py`` (``attn_fn='flash'``) on a CUDA GPU: checked against the
PyTorch chunked form (``common.linear_attention``), outputs and gradients, then timed against it and against exact
attention (SDPA), forward and forward + backward.

    python -m srf_attention.benchmark_flash [--quick]     # CUDA and Triton only; --quick: the checks, no timing
"""
from __future__ import annotations

import torch

from common.bench import time_callable
from common.cli import script_parser
from common.data import synthetic_qkv

from .fast_attention import FastAttention
from .flash_linear_attention import check_available


def main(argv=None) -> None:
    """On a GPU: compare the kernel with the PyTorch form (outputs and gradients) and time both."""
    parser = script_parser(__doc__.split("\n")[0], quick_help="the correctness checks only, no timing",
                           device_help="a CUDA device (the kernel is Triton)", with_out=False)
    parser.set_defaults(device="cuda")
    args = parser.parse_args(argv)
    try:
        check_available(torch.device(args.device))
    except RuntimeError as error:
        parser.error(str(error))
    torch.manual_seed(args.seed)
    worst = 0.0
    print("| causal | dtype | B,H,L,D,m | max |flash - torch| (output) | max rel. grad diff |\n|---|---|---|---|---|")
    for causal in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            for (b, h, n, d, m) in ((1, 1, 1, 8, 8), (2, 3, 100, 16, 20), (1, 4, 1000, 64, 64), (1, 2, 4097, 64, 100)):
                x = synthetic_qkv("gaussian", b, h, n, n, d, seed=args.seed, dtype=dtype, device=args.device)
                fast = FastAttention(d, m, causal=causal, seed=args.seed).to(args.device)
                ins = [t.clone().requires_grad_() for t in (x.q, x.k, x.v)]
                grad_out = torch.randn_like(x.v)
                outs, grads = [], []
                for attn_fn in ("torch", "flash"):
                    out = fast(*ins, attn_fn=attn_fn)
                    grads.append(torch.autograd.grad(out, ins, grad_out))
                    outs.append(out.float())
                diff = (outs[0] - outs[1]).abs().max().item()
                gdiff = max(((g0.float() - g1.float()).abs().max() / g0.float().abs().max().clamp_min(1e-30)).item()
                            for g0, g1 in zip(*grads))
                worst = max(worst, diff if dtype == torch.float32 else 0.0)
                print(f"| {causal} | {str(dtype)[6:]} | {b},{h},{n},{d},{m} | {diff:.2e} | {gdiff:.2e} |")
    print(f"worst float32 output difference: {worst:.2e}")
    if args.quick:
        return
    print("\n| causal | L | torch fwd (ms) | flash fwd (ms) | torch fwd+bwd (ms) | flash fwd+bwd (ms) | exact fwd+bwd (ms) |"
          "\n|---|---|---|---|---|---|---|")
    b, h, d, m = 1, 8, 64, 64
    for causal in (True, False):
        for n in (4096, 16384, 65536):
            x = synthetic_qkv("gaussian", b, h, n, n, d, seed=args.seed, device=args.device)
            fast = FastAttention(d, m, causal=causal, seed=args.seed).to(args.device)
            ins = [t.clone().requires_grad_() for t in (x.q, x.k, x.v)]
            row = []
            for attn_fn in ("torch", "flash"):
                with torch.no_grad():
                    row.append(time_callable(lambda: fast(x.q, x.k, x.v, attn_fn=attn_fn), warmup=2, repeats=5,
                                             device=args.device).median_s)
            for attn_fn in ("torch", "flash"):
                row.append(time_callable(lambda: fast(*ins, attn_fn=attn_fn).sum().backward(), warmup=2,
                                         repeats=5, device=args.device).median_s)
            sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(*ins, is_causal=causal).sum().backward()
            row.append(time_callable(sdpa, warmup=2, repeats=5, device=args.device).median_s)
            print(f"| {causal} | {n} | " + " | ".join(f"{1e3 * t:.2f}" for t in row) + " |")


if __name__ == "__main__":
    main()
