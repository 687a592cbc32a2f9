"""A compact GPT (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners") whose attention
is any method of ``common``'s registry.

The network is the GPT-2 decoder: token + learned position embeddings (or none: ``position_embedding="none"``,
"NoPE", Kazemnejad et al. 2023, where the causal mask alone orders the tokens and the model runs at any length),
``n_layer`` pre-LayerNorm blocks

    x = x + Attn(LN(x)),    x = x + MLP(LN(x)),    MLP(x) = W2 GELU(W1 x)   (W1: d -> 4d),

a final LayerNorm, and a language-model head tied to the token embedding (Press & Wolf 2017). Inside a block
the projections give q, k, v of shape (B, H, T, D) with D = n_embd / n_head, and the attention itself is the
registered method called as ``attn(q, k, v, causal=True)`` (Vaswani et al. 2017, eq. 1 for ``exact``). Swapping
the method (:meth:`GPT.set_attention`, in every layer or in the layers named) changes nothing else, so a model
trained with ``exact`` can be evaluated with an approximation.

Dropout is applied to the embeddings, the attention output projection and the MLP output. There is no dropout on
the attention weights: the contract's ``attn(q, k, v)`` never exposes them (most methods never form them).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

import common


@dataclass
class ModelConfig:
    """The model a run chooses: the network's shape and its attention method (a registered name plus options).

    The one home of these fields and their defaults: :class:`GPTConfig` adds the vocabulary (which the data
    fixes) and ``nanoGPT.train.TrainConfig`` adds the training fields, both by inheriting from this class.
    """
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True
    attention: str = "exact"
    attention_options: dict = field(default_factory=dict)
    # "learned": GPT-2's table of block_size position embeddings; "none" (NoPE): no position signal but the
    # causal mask, so the model accepts any sequence length and block_size bounds nothing (it stays the length
    # the model was trained at, which a training script reads).
    position_embedding: str = "learned"
    # Per-layer attention: None (every layer runs ``attention`` with ``attention_options``) or one
    # [name, options] pair per layer, which then replaces attention/attention_options layer by layer
    # (GPT.set_attention with ``layers`` writes it, so that a saved model knows what each layer ran).
    layer_attention: list | None = None

    def __post_init__(self):
        for name in ("block_size", "n_layer", "n_head", "n_embd"):
            check_positive_int(type(self).__name__, name, getattr(self, name))
        if self.n_embd % self.n_head:
            raise ValueError(f"{type(self).__name__}: n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{type(self).__name__}: dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.attention_options, dict):
            raise TypeError(f"{type(self).__name__}: attention_options must be a dict, got "
                            f"{type(self.attention_options).__name__}")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"{type(self).__name__}: position_embedding must be one of {POSITION_EMBEDDINGS}, got "
                             f"{self.position_embedding!r}")
        if self.layer_attention is not None:
            self.layer_attention = check_layer_attention(type(self).__name__, self.layer_attention, self.n_layer)

    def attention_of_layer(self, layer: int) -> tuple[str, dict]:
        """The (name, options) that layer ``layer`` runs."""
        if self.layer_attention is None:
            return self.attention, dict(self.attention_options)
        name, options = self.layer_attention[layer]
        return name, dict(options)

    def model_fields(self) -> dict:
        """The values of this class's fields (those of :class:`ModelConfig`), whatever subclass ``self`` is."""
        return {f.name: getattr(self, f.name) for f in fields(ModelConfig)}


POSITION_EMBEDDINGS = ("learned", "none")


def check_layer_attention(owner: str, value, n_layer: int) -> list:
    """``layer_attention`` as a list of n_layer [name, options] lists, or a ValueError naming what is wrong."""
    if not isinstance(value, (list, tuple)) or len(value) != n_layer:
        raise ValueError(f"{owner}: layer_attention must be None or a list of n_layer={n_layer} [name, options] "
                         f"pairs, got {value!r}")
    checked = []
    for i, entry in enumerate(value):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], dict)):
            raise ValueError(f"{owner}: layer_attention[{i}] must be a [name, options dict] pair, got {entry!r}")
        checked.append([entry[0], dict(entry[1])])
    return checked


def select_layers(layers, n_layer: int) -> list[int]:
    """The sorted layer indices that ``layers`` names: None (all), a list of ints (negative counts from the end),
    or "first:k" / "last:k" (0 <= k <= n_layer), or "all". A ValueError names anything else."""
    if layers is None or layers == "all":
        return list(range(n_layer))
    if isinstance(layers, str):
        where, sep, count = layers.partition(":")
        if sep and where in ("first", "last") and count.isdigit() and int(count) <= n_layer:
            k = int(count)
            return list(range(k)) if where == "first" else list(range(n_layer - k, n_layer))
        raise ValueError(f"layers: expected None, 'all', 'first:k', 'last:k' (0 <= k <= {n_layer}) or a list of "
                         f"layer indices, got {layers!r}")
    if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                        for i in layers):
        raise ValueError(f"layers: expected None, 'first:k', 'last:k' or a list of int layer indices, got {layers!r}")
    bad = [i for i in layers if not -n_layer <= i < n_layer]
    if bad:
        raise ValueError(f"layers: indices {bad} out of range for a model of {n_layer} layers")
    return sorted({i % n_layer for i in layers})


def check_positive_int(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


@dataclass
class GPTConfig(ModelConfig):
    """The network: a :class:`ModelConfig` plus the vocabulary size."""
    vocab_size: int = 65

    def __post_init__(self):
        super().__post_init__()
        check_positive_int("GPTConfig", "vocab_size", self.vocab_size)

    def to_dict(self) -> dict:
        return asdict(self)


def check_attention(name: str, trainable: bool = False) -> None:
    """Refuse, saying why, a method a GPT cannot use: every GPT attends causally, and training also needs
    gradients. The policy itself is the registry's (``common.methods``)."""
    if name in common.methods(causal=True, trainable=trainable):
        return
    cls = common.method_class(name)  # an unknown name raises here, listing the known ones
    if name not in common.methods(causal=True):
        raise ValueError(f"attention {name!r} cannot run in a GPT: it does not support causal=True "
                         f"(its class {cls.__qualname__} sets supports_causal=False)")
    raise ValueError(f"attention {name!r} cannot train a GPT: it is inference-only (trainable=False, no "
                     "gradient); train with another method and swap it in with nanoGPT.evaluate")


def build_attention(name: str, options: dict, layer: int) -> common.AttentionMethod:
    """The registered method ``name`` for one layer; a ``seed`` option becomes ``seed + layer`` so that the
    layers of a randomised method draw independent features/samples while the whole model stays repeatable."""
    check_attention(name)
    options = dict(options)
    if options.get("seed") is not None:
        options["seed"] = options["seed"] + layer
    return common.get_attention(name, **options)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with the softmax step delegated to a registered method."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.qkv_proj = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.out_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.layer = layer
        self.attention = build_attention(*config.attention_of_layer(layer), layer)

    def split_heads(self, x: torch.Tensor):
        """(B, T, C) -> q, k, v each (B, H, T, D)."""
        b, t, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.n_head * self.head_dim, dim=2)
        return tuple(z.view(b, t, self.n_head, self.head_dim).transpose(1, 2) for z in (q, k, v))

    def merge_heads(self, y: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) -> the output projection of (B, T, C)."""
        b, _, t, _ = y.shape
        return self.resid_dropout(self.out_proj(y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim)))

    def forward(self, x: torch.Tensor, state=None) -> torch.Tensor:
        """Attend causally over x; with a decoding ``state`` (from ``attention.init_state()``) x holds only the
        new positions and the state carries the earlier ones."""
        q, k, v = self.split_heads(x)
        if state is None:
            y = self.attention(q, k, v, causal=True)
        else:
            y = self.attention.step(q, k, v, state, 1.0 / math.sqrt(self.head_dim))
        return self.merge_heads(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.up = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.down = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down(F.gelu(self.up(x))))


class Block(nn.Module):
    """One pre-LayerNorm transformer block."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_mlp = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, state=None):
        x = x + self.attn(self.ln_attn(x), state)
        return x + self.mlp(self.ln_mlp(x))


class GPT(nn.Module):
    """The GPT language model: ``forward(idx, targets) -> (logits, loss)``; ``generate`` samples from it."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.token_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd) if config.position_embedding == "learned" \
            else None
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_final = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.token_emb.weight  # weight tying
        self.apply(self._init_weights)
        # GPT-2: residual output projections scaled by 1/sqrt(2 n_layer), so the residual stream's variance
        # does not grow with depth at initialisation.
        for name, p in self.named_parameters():
            if name.endswith("out_proj.weight") or name.endswith("down.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        """Trainable parameters, the tied head counted once."""
        return sum(p.numel() for p in self.parameters())

    def set_attention(self, name: str, layers=None, **options) -> "GPT":
        """Replace the attention of the layers named by ``layers`` (:func:`select_layers`: None = every layer, a
        list of indices, "first:k", "last:k") by the registered method ``name`` (e.g. evaluating an exact-trained
        model with an approximation); the other layers keep what they run now. The weights are untouched.
        ``config`` records the result: ``attention``/``attention_options`` when every layer runs the same, else
        ``layer_attention`` (one [name, options] per layer)."""
        chosen = select_layers(layers, self.config.n_layer)
        per_layer = [list(self.config.attention_of_layer(i)) for i in range(self.config.n_layer)]
        for i in chosen:
            block = self.blocks[i]
            block.attn.attention = build_attention(name, options, block.attn.layer).to(self.token_emb.weight.device)
            per_layer[i] = [name, dict(options)]
        if all(entry == per_layer[0] for entry in per_layer):
            self.config.attention, self.config.attention_options = per_layer[0][0], dict(per_layer[0][1])
            self.config.layer_attention = None
        else:
            self.config.layer_attention = per_layer
        return self

    def layer_attention_names(self) -> list[str]:
        """The name of the method each layer runs."""
        return [block.attn.attention.name for block in self.blocks]

    def _check_idx(self, idx: torch.Tensor, start: int = 0):
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"GPT: idx must be a (B, T) tensor of token ids (torch.long), got "
                             f"{getattr(idx, 'dtype', type(idx).__name__)} of shape {tuple(getattr(idx, 'shape', ()))}")
        if idx.shape[1] == 0:
            raise ValueError("GPT: idx is empty (T = 0); give at least one token")
        if self.pos_emb is not None and start + idx.shape[1] > self.config.block_size:
            raise ValueError(f"GPT: sequence of {start + idx.shape[1]} positions exceeds block_size="
                             f"{self.config.block_size}")
        if idx.min() < 0 or idx.max() >= self.config.vocab_size:
            raise ValueError(f"GPT: token ids must lie in [0, {self.config.vocab_size}), got "
                             f"[{idx.min().item()}, {idx.max().item()}]")

    def hidden_states(self, idx: torch.Tensor, states=None, start: int = 0) -> torch.Tensor:
        """Final-LayerNorm outputs (B, T, C) of tokens at positions start .. start + T - 1."""
        self._check_idx(idx, start)
        x = self.token_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + idx.shape[1], device=idx.device))
        x = self.emb_dropout(x)
        for i, block in enumerate(self.blocks):
            x = block(x, None if states is None else states[i])
        return self.ln_final(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits (B, T, vocab) and the mean next-token cross-entropy in nats (None without targets)."""
        logits = self.lm_head(self.hidden_states(idx))
        if targets is None:
            return logits, None
        if targets.shape != idx.shape:
            raise ValueError(f"GPT: targets must have the shape of idx {tuple(idx.shape)}, got {tuple(targets.shape)}")
        # The loss in at least float32 even under bfloat16 autocast (a sum over the vocabulary).
        wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
        loss = F.cross_entropy(wide.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 use_cache: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to idx (B, T); returns (B, T + max_new_tokens).

        The model conditions on the last ``block_size`` tokens. With ``use_cache`` every layer keeps its
        method's decoding state (``attention.init_state()``: a KV cache, or SRF's constant-size state), so each
        new token costs one position's work. Absolute position embeddings rule out sliding a cache, so once the
        text is longer than the block, the state is rebuilt from the last ``block_size`` tokens at each step:
        the logits are those of the uncached model either way. A model without position embeddings keeps the
        same window of ``block_size`` tokens (its training length), which bounds the cost of a step.
        """
        if temperature <= 0:
            raise ValueError(f"generate: temperature must be > 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"generate: top_k must be >= 1 or None, got {top_k}")
        block = self.config.block_size
        states, cached = None, 0  # cached: number of positions the states hold
        for _ in range(max_new_tokens):
            if not use_cache:
                logits = self.lm_head(self.hidden_states(idx[:, -block:])[:, -1])
            else:
                if states is None or idx.shape[1] > block:
                    states = [b.attn.attention.init_state() for b in self.blocks]
                    cached = 0
                    window = idx[:, -block:]
                else:
                    window = idx[:, cached:]
                logits = self.lm_head(self.hidden_states(window, states, start=cached)[:, -1])
                cached += window.shape[1]
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits.float(), dim=-1)
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], dim=1)
        return idx
