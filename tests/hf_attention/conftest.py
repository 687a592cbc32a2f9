"""Tiny randomly initialised transformers models built from a config (nothing downloaded): an encoder (BERT) and a
decoder with grouped-query attention (Llama, 4 query heads sharing 2 key/value heads)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 64


def tiny_bert(n_layers: int = 2, dtype=torch.float32):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=n_layers, num_attention_heads=4, max_position_embeddings=64,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.AutoModel.from_config(config, attn_implementation="sdpa").to(dtype).eval()


def tiny_llama(n_layers: int = 2, dtype=torch.float32):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(dtype).eval()


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Token ids in [3, VOCAB): never pad (0), bos (1) or eos (2), so that greedy decoding runs its full length."""
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def generate(model, input_ids, attention_mask=None, new_tokens: int = 5):
    """Greedy decoding with the KV cache: (token ids, per-step logits (B, steps, vocab))."""
    out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, use_cache=True, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=0)
    return out.sequences, torch.stack(out.logits, dim=1)


def rel_error(approx: torch.Tensor, reference: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(approx - reference) / torch.linalg.vector_norm(reference))
