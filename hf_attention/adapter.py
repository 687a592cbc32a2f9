"""Every registered attention method as a Hugging Face transformers attention implementation.

    import hf_attention
    hf_attention.register()                                   # "exact", "knn", "kdeformer", ... as themselves
    model = AutoModel.from_config(cfg, attn_implementation="knn")
    hf_attention.register_layers("knn_first2", {0: ("knn", {"k": 32}), 1: "knn"})   # other layers: exact

transformers (>= 5) looks an attention implementation up by name in ``AttentionInterface`` and calls it as
``fn(module, query, key, value, attention_mask, dropout=..., scaling=..., **kwargs)`` with query (B, H, Nq, D),
key and value (B, Hkv, Nk, D) (grouped-query attention when Hkv < H, already concatenated with the KV cache), and
a 4D mask built by the function registered under the same name in ``AttentionMaskInterface``. We register
transformers' own ``sdpa_mask`` there, so our functions receive exactly what the ``sdpa`` implementation
receives: None (plain causal or full attention), or a boolean (B, 1, Nq, Nk) mask, True where a query may read a
key; a caller may also hand a model a 4D additive float mask of its own.

The mask is split into what the methods' contract speaks (docs/DESIGN.md): ``causal`` (bottom-right aligned, as
Vaswani et al. 2017 eq. 1 with a KV cache) and a key-padding mask (B, Nk), True = padded key. A mask that is
neither "causal and padding" nor "padding" (a sliding window, a block pattern, an additive bias such as ALiBi)
goes to ``exact`` as SDPA's ``attn_mask``; every other method refuses it with a ValueError naming itself.
The output is returned as (B, Nq, H, Dv), the layout transformers' ``sdpa_attention_forward`` returns.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Mapping

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import common



@dataclass(frozen=True)
class MaskPlan:
    """A 4D attention mask rewritten in the methods' terms.

    ``n_keys``: keys kept (a trailing run of keys no query reads, e.g. the empty slots of a static cache, is cut);
    ``causal``: bottom-right causal over those keys; ``key_padding_mask``: (B, n_keys) bool, True = padded key,
    or None when no key is padded; ``attn_mask``: the original mask when it is none of these patterns (only
    ``exact`` honours it), else None.
    """

    n_keys: int
    causal: bool
    key_padding_mask: torch.Tensor | None = None
    attn_mask: torch.Tensor | None = None


def _allowed_pattern(mask: torch.Tensor) -> torch.Tensor | None:
    """True where a query may read a key, or None if ``mask`` is an additive bias rather than a 0 / -inf pattern.
    transformers' eager masks put ``finfo(dtype).min`` where SDPA puts -inf; both count as masked (as in
    ``common.key_padding_from_attn_mask``)."""
    if mask.dtype == torch.bool:
        return mask
    allowed = mask == 0
    blocked = mask <= torch.finfo(mask.dtype).min
    return allowed if bool((allowed | blocked).all()) else None


def split_mask(attention_mask: torch.Tensor | None, batch: int, n_queries: int, n_keys: int,
               is_causal: bool) -> MaskPlan:
    """Split the mask transformers hands an attention function into causal / key padding / a general mask.

    None: causal from ``is_causal`` when Nq > 1 (a single decoding query reads every cached key, as in
    ``sdpa_attention_forward``); with Nk > Nq > 1 (a static cache's prefill) only the first Nq keys are real, so
    they are the ones kept, exactly as ``sdpa_attention_forward`` slices them.
    A 4D mask (bool, or additive float with 0 / very negative entries) equal to (bottom-right causal) AND (key
    padding), after cutting the trailing keys no query reads, gives ``causal=True`` with that padding; one equal to
    key padding alone gives ``causal=False``; anything else is kept whole as ``attn_mask``.
    """
    if attention_mask is None:
        causal = bool(is_causal) and n_queries > 1
        return MaskPlan(n_keys=min(n_keys, n_queries) if causal else n_keys, causal=causal)
    if attention_mask.dim() != 4 or attention_mask.shape[0] not in (1, batch) \
            or tuple(attention_mask.shape[2:]) != (n_queries, n_keys):
        raise ValueError(f"hf_attention: attention_mask must be 4D (B or 1, H or 1, Nq, Nk) = "
                         f"({batch}, ., {n_queries}, {n_keys}), got {tuple(attention_mask.shape)}")
    general = MaskPlan(n_keys=n_keys, causal=False, attn_mask=attention_mask)
    allowed = _allowed_pattern(attention_mask)
    if allowed is None or not bool((allowed == allowed[:, :1]).all()):  # an additive bias, or a per-head pattern
        return general
    allowed = allowed[:, 0].expand(batch, n_queries, n_keys)
    read = allowed.any(dim=1)                                    # (B, Nk): keys some query reads
    read_anywhere = read.any(dim=0).nonzero()
    if read_anywhere.numel() == 0:
        return general
    kept = int(read_anywhere[-1]) + 1
    allowed, read = allowed[..., :kept], read[:, :kept]
    if bool((allowed == read[:, None, :]).all()):
        causal = False
    elif bool((allowed == (common.causal_mask(n_queries, kept, allowed.device) & read[:, None, :])).all()):
        causal = True
    else:
        return general
    padded = ~read
    return MaskPlan(n_keys=kept, causal=causal, key_padding_mask=padded if bool(padded.any()) else None)


def _choice(spec) -> tuple[str, dict]:
    """``"knn"`` or ``("knn", {"k": 32})`` -> (name, options), the name checked against the registry."""
    name, options = (spec, {}) if isinstance(spec, str) else spec
    common.method_class(name)  # an unknown name raises, listing the known ones
    return name, dict(options)


class LayerChoice:
    """The attention function registered with transformers: which method runs in which layer.

    ``default``: the method of every layer not named in ``layers`` (``"exact"`` unless given); ``layers``: a mapping
    layer index -> method, each ``"name"`` or ``("name", options)``; the layer index is the attention module's
    ``layer_idx``. One method instance per (layer, method), built on first use with ``seed + layer index`` for a
    randomised method (``common.method_options``), so that a model's layers draw independently and a run repeats
    exactly after :meth:`reseed`. ``calls`` counts the calls per (layer index, method name).
    """

    def __init__(self, default="exact", layers: Mapping[int, object] | None = None, seed: int | None = 0):
        self.default = _choice(default)
        self.layers = {int(i): _choice(spec) for i, spec in (layers or {}).items()}
        self.seed = seed
        self.calls: collections.Counter = collections.Counter()
        self._methods: dict[tuple[int | None, str], common.AttentionMethod] = {}

    def method_for(self, layer_idx: int | None) -> tuple[str, dict]:
        if layer_idx is None and self.layers:
            raise ValueError("hf_attention: this model's attention module has no layer_idx, so a per-layer choice "
                             f"({sorted(self.layers)}) cannot be applied; use one method for every layer")
        return self.layers.get(layer_idx, self.default)

    def method(self, layer_idx: int | None) -> common.AttentionMethod:
        name, options = self.method_for(layer_idx)
        key = (layer_idx, name)
        if key not in self._methods:
            seed = None if self.seed is None else self.seed + (layer_idx or 0)
            self._methods[key] = common.get_attention(name, **common.method_options(name, options, seed))
        return self._methods[key]

    def reseed(self, seed: int | None) -> None:
        """Forget the method instances, so that the next calls draw again from ``seed`` (+ layer index)."""
        self.seed = seed
        self._methods.clear()

    def __call__(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
        layer_idx = getattr(module, "layer_idx", None)
        attn = self.method(layer_idx)
        name = attn.name
        if dropout:
            raise ValueError(f"{name}: attention dropout ({dropout}) is not supported; call model.eval() or set "
                             "the config's attention dropout to 0")
        for unsupported in ("softcap", "s_aux", "position_bias"):
            if kwargs.get(unsupported) is not None:
                raise ValueError(f"{name}: the model passes {unsupported}, which the hf_attention adapter does "
                                 "not support (use attn_implementation='sdpa' or 'eager' for this model)")
        is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        plan = split_mask(attention_mask, query.shape[0], query.shape[2], key.shape[2], is_causal)
        if plan.attn_mask is not None and name != "exact":
            raise ValueError(f"{name}: the model's attention mask is neither causal + key padding nor key padding "
                             "(e.g. a sliding window, a block pattern or an additive bias); only 'exact' takes a "
                             "general mask")
        key, value = key[:, :, :plan.n_keys], value[:, :, :plan.n_keys]
        masks = {}
        if plan.key_padding_mask is not None:
            masks["key_padding_mask"] = plan.key_padding_mask
        if plan.attn_mask is not None:
            masks["attn_mask"] = plan.attn_mask
        out = attn(query, key, value, causal=plan.causal, scale=scaling, enable_gqa=key.shape[1] != query.shape[1],
                   **masks)
        self.calls[(layer_idx, name)] += 1
        return out.transpose(1, 2).contiguous(), None


def _install(name: str, choice: LayerChoice) -> LayerChoice:
    """Register ``choice`` under ``name``; transformers' own names (``sdpa``, ``eager``, the flash and flex ones)
    and hub-kernel-like names (with '/' or '|') are refused, a name of ours is replaced."""
    taken = AttentionInterface._global_mapping.get(name, AttentionMaskInterface._global_mapping.get(name))
    if not isinstance(name, str) or not name or name == "eager" or "/" in name or "|" in name \
            or (taken is not None and not isinstance(taken, LayerChoice) and taken is not sdpa_mask):
        raise ValueError(f"hf_attention: cannot register under {name!r}: transformers' own names "
                         "(sdpa, eager, flash_attention_*, flex_attention) and names with '/' or '|' are reserved")
    AttentionInterface.register(name, choice)
    # The mask builder under the same name: without one, transformers builds no mask at all for a custom name
    # (masking_utils._preprocess_mask_arguments), and padding would be lost.
    AttentionMaskInterface.register(name, sdpa_mask)
    return choice


def register(methods=None, *, options: Mapping[str, dict] | None = None, seed: int | None = 0) \
        -> dict[str, LayerChoice]:
    """Register each method under its own name for every layer: ``attn_implementation="knn"`` etc.

    ``methods``: names (default: every name in ``common.methods()``); ``options``: per-name options, e.g.
    ``{"knn": {"k": 32}}`` (the method's defaults otherwise). Registering a name again replaces it.
    Returns the registered :class:`LayerChoice` per name (their ``calls`` count what ran).
    """
    names = list(common.methods() if methods is None else methods)
    options = dict(options or {})
    unknown = set(options) - set(names)
    if unknown:
        raise ValueError(f"hf_attention.register: options given for methods not registered: {sorted(unknown)}")
    return {name: _install(name, LayerChoice((name, options.get(name, {})), seed=seed)) for name in names}


def register_layers(name: str, layers: Mapping[int, object], default="exact", seed: int | None = 0) -> LayerChoice:
    """Register ``name`` as a per-layer choice: ``layers`` maps a layer index to ``"method"`` or
    ``("method", options)``; every other layer runs ``default`` (exact unless given)."""
    if not layers:
        raise ValueError("hf_attention.register_layers: layers must name at least one layer")
    return _install(name, LayerChoice(default, layers, seed=seed))

