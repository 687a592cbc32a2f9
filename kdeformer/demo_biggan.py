"""KDEformer's image-generation experiment (Zandieh et al. 2023, Sec. 5.2): swap BigGAN's self-attention.

BigGAN (Brock et al. 2019) has one SAGAN self-attention layer (Zhang et al. 2019): at resolution R the R^2
feature-map positions attend to each other, o = x + gamma W_o softmax(theta(x) phi(x)^T) g(x). The paper replaces
that softmax by each approximation and compares images. Here the generator is a compact BigGAN-style network
(linear -> 4x4 -> residual up-sampling blocks -> self-attention at the output resolution -> RGB); its attention
is ``--attention exact|kdeformer|performer|reformer|sblocal`` (all of them with ``--attention all``).

What can and cannot be reproduced here: pretrained BigGAN weights cannot be downloaded on this machine, and the
official checkpoints do not fit this compact architecture. With ``--checkpoint PATH`` the script loads a
``state_dict`` of :class:`Generator` (``torch.save(generator.state_dict(), PATH)``, keys as in
``Generator().state_dict()``); without one it uses seeded random weights. Random weights make the *numbers*
meaningful (relative error of the attention layer's output and of the final image vs exact, attention time),
but the images are not natural images, so the paper's FID / inception-score comparison is not reproduced.

    python -m kdeformer.demo_biggan --quick                 # 32x32 (1024 tokens), seconds
    python -m kdeformer.demo_biggan --attention all         # 64x64 (4096 tokens)
"""
from __future__ import annotations

import csv
from pathlib import Path

import torch
from torch import nn

from common import get_attention, plotting
from common.bench import time_callable
from common.cli import script_parser
from common.metrics import relative_frobenius_error

METHOD_OPTIONS = {"exact": {}, "kdeformer": {"bucket_size": 64, "sample_size": 128},
                  "performer": {"nb_features": 128}, "reformer": {"bucket_size": 64, "n_hashes": 2},
                  "sblocal": {"local_size": 64, "nb_features": 128}}


class SelfAttention2d(nn.Module):
    """SAGAN self-attention over the H*W positions, the softmax done by a registered method."""

    def __init__(self, channels: int, attention: nn.Module):
        super().__init__()
        self.theta = nn.Conv2d(channels, channels // 8, 1, bias=False)
        self.phi = nn.Conv2d(channels, channels // 8, 1, bias=False)
        self.g = nn.Conv2d(channels, channels // 2, 1, bias=False)
        self.out = nn.Conv2d(channels // 2, channels, 1, bias=False)
        self.gamma = nn.Parameter(torch.tensor(1.0))
        self.attention = attention
        self.last_output = None  # the attention's output of the last call, for the error report

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = lambda t: t.flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, HW, C')
        o = self.attention(tokens(self.theta(x)), tokens(self.phi(x)), tokens(self.g(x)), scale=1.0)
        self.last_output = o
        return x + self.gamma * self.out(o.squeeze(1).transpose(1, 2).reshape(b, c // 2, h, w))


class UpBlock(nn.Module):
    """BigGAN residual block: BN-ReLU-upsample-conv-BN-ReLU-conv plus an upsampled 1x1 shortcut."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
        self.conv1, self.conv2 = nn.Conv2d(cin, cout, 3, padding=1), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1)
        self.up = nn.Upsample(scale_factor=2)

    def forward(self, x):
        h = self.conv1(self.up(torch.relu(self.bn1(x))))
        return self.conv2(torch.relu(self.bn2(h))) + self.skip(self.up(x))


class Generator(nn.Module):
    """z (B, z_dim) -> image (B, 3, R, R), R = 4 * 2^blocks, with self-attention at resolution R."""

    def __init__(self, attention: nn.Module, resolution: int = 64, ch: int = 32, z_dim: int = 120):
        super().__init__()
        blocks = {32: 3, 64: 4}.get(resolution)
        if blocks is None:
            raise ValueError(f"Generator: resolution must be 32 or 64, got {resolution}")
        widths = [ch * 2 ** (blocks - i) for i in range(blocks + 1)]  # e.g. 16ch .. 1ch
        self.z_dim = z_dim
        self.linear = nn.Linear(z_dim, widths[0] * 16)
        self.blocks = nn.Sequential(*(UpBlock(a, b) for a, b in zip(widths[:-1], widths[1:])))
        self.attn = SelfAttention2d(widths[-1], attention)
        self.to_rgb = nn.Sequential(nn.BatchNorm2d(widths[-1]), nn.ReLU(), nn.Conv2d(widths[-1], 3, 3, padding=1))

    def forward(self, z):
        x = self.linear(z).view(z.shape[0], -1, 4, 4)
        return torch.tanh(self.to_rgb(self.attn(self.blocks(x))))


def build_generator(attention: str, resolution: int, seed: int, checkpoint: Path | None) -> Generator:
    torch.manual_seed(seed)  # the same weights for every attention method
    gen = Generator(get_attention(attention, **({**METHOD_OPTIONS[attention], "seed": seed}
                                                if attention != "exact" else {})), resolution)
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        missing, unexpected = gen.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"demo_biggan: {checkpoint} does not match Generator(resolution={resolution}): "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return gen.eval()


def main(argv=None) -> list[dict]:
    parser = script_parser("BigGAN-style generator with its self-attention swapped.",
                           quick_help="32x32, batch 2, one timed run")
    parser.add_argument("--attention", default="all", choices=["all", *METHOD_OPTIONS])
    parser.add_argument("--checkpoint", type=Path, default=None, help="state_dict of Generator (see module doc)")
    parser.add_argument("--resolution", type=int, default=64, choices=[32, 64])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.quick:
        args.resolution, args.batch, args.repeats = 32, 2, 1
    names = list(METHOD_OPTIONS) if args.attention == "all" else ["exact", args.attention]
    z = torch.randn(args.batch, 120, generator=torch.Generator().manual_seed(args.seed)).to(args.device)
    images, rows, reference = {}, [], None
    with torch.no_grad():
        for name in names:
            gen = build_generator(name, args.resolution, args.seed, args.checkpoint).to(args.device)
            images[name] = gen(z)
            attn_in = gen.blocks(gen.linear(z).view(args.batch, -1, 4, 4))
            layer = gen.attn
            t = time_callable(lambda: layer(attn_in), warmup=0, repeats=args.repeats, device=args.device).median_s
            layer(attn_in)
            if name == "exact":
                reference = (layer.last_output, images[name])
            rows.append(dict(method=name, tokens=args.resolution ** 2, attention_layer_s=t,
                             rel_err_attention=relative_frobenius_error(layer.last_output, reference[0]),
                             rel_err_image=relative_frobenius_error(images[name], reference[1])))
    print(f"{args.resolution}x{args.resolution} ({args.resolution ** 2} tokens), batch {args.batch}, "
          f"{'checkpoint ' + str(args.checkpoint) if args.checkpoint else 'seeded random weights'}, CPU")
    print("| method | attention layer time (s) | rel. error attention output | rel. error image |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['attention_layer_s']:.4f} | {r['rel_err_attention']:.4f} | {r['rel_err_image']:.4f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "kdeformer_biggan.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fig, axes = plotting.new_figure(ncols=args.batch, nrows=len(names), width=1.6, height=1.7)
    # one contrast stretch for every panel (the exact images' range), so that differences between rows show
    low, high = images["exact"].amin().item(), images["exact"].amax().item()
    for i, (name, row) in enumerate(zip(names, rows)):
        for j in range(args.batch):
            ax = axes[i][j]
            ax.imshow(((images[name][j].permute(1, 2, 0).cpu() - low) / (high - low)).clamp(0, 1))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            if j == 0:
                ax.set_ylabel(f"{name}\nimage err {row['rel_err_image']:.1%}", fontsize=8)
    weights = f"checkpoint {args.checkpoint.name}" if args.checkpoint else "seeded random weights"
    fig.suptitle(f"BigGAN-style generator ({weights}), {args.resolution}x{args.resolution}: images per attention "
                 f"method\n(contrast stretched to the exact images' range; err = relative Frobenius error vs exact)",
                 fontsize=8)
    print(f"wrote {plotting.save_figure(fig, args.out / 'kdeformer_biggan.png')}")
    return rows


if __name__ == "__main__":
    main()
