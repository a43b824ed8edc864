"""Tiny models and learnable token streams for the trainer, CLI and Hugging Face tests."""

import torch

from kdfast.train.models import GPT, GPTConfig

VOCAB = 48
CONTEXT = 16


def markov_tokens(n: int, seed: int, vocab: int = VOCAB) -> torch.Tensor:
    """A stream a small model learns in a few steps: mostly next = (5 * prev + 3) % vocab, sometimes random."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, vocab, (n,), generator=gen)
    jump = torch.rand(n, generator=gen) < 0.2
    tokens = torch.empty(n, dtype=torch.long)
    tokens[0] = noise[0]
    for i in range(1, n):
        tokens[i] = noise[i] if jump[i] else (5 * tokens[i - 1] + 3) % vocab
    return tokens


def make_pair(seed: int, vocab: int = VOCAB, student_vocab: int = None) -> tuple[GPT, GPT]:
    """(teacher, student) GPTs of different widths, initialised from seed."""
    torch.manual_seed(seed)
    teacher = GPT(GPTConfig(vocab, CONTEXT, n_layer=2, n_head=2, d_model=32))
    student = GPT(GPTConfig(student_vocab or vocab, CONTEXT, n_layer=1, n_head=2, d_model=16))
    return teacher, student


def tiny_llama(seed: int, width: int = 16):
    """A one-layer Hugging Face Llama on VOCAB tokens, initialised from seed (needs transformers)."""
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2))
