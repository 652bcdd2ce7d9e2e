"""Tiny models and inputs shared by the tests: randomly initialised Hugging Face models small
enough that capturing, compiling and running one takes seconds on a CPU.

Each builder seeds torch itself, so a test gets the same weights whatever ran before it.
"""

from __future__ import annotations

import torch

VOCAB = 128


def tiny_llama(seed: int = 0, attn_implementation: str | None = None) -> torch.nn.Module:
    """A 2-layer Llama (GQA: 4 query heads, 2 key/value heads) in eval mode, float32;
    `attn_implementation` ("sdpa", "eager") as HF takes it, None for HF's default."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attn_implementation=attn_implementation,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0, attn_implementation: str | None = None) -> torch.nn.Module:
    """A 2-layer GPT-2 in eval mode (dropout off), float32; `attn_implementation` as for
    `tiny_llama`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, attn_implementation=attn_implementation)
    return GPT2LMHeadModel(config).eval()


def token_inputs(length: int, vocab: int = VOCAB, seed: int = 0, batch: int = 1) -> dict[str, torch.Tensor]:
    """Keyword inputs of a causal LM: random token ids and an all-ones attention mask."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, length), generator=gen)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def logits(output: object) -> torch.Tensor:
    """The logits of a model output (a ModelOutput, a dict or a tuple whose first item they are)."""
    if hasattr(output, "logits"):
        return output.logits  # type: ignore[no-any-return]
    if isinstance(output, dict):
        return output["logits"]
    if isinstance(output, (tuple, list)):
        return output[0]
    assert isinstance(output, torch.Tensor)
    return output


class FunctionModule(torch.nn.Module):
    """A module whose forward is `fn`: lets torch.export capture a plain function."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)
