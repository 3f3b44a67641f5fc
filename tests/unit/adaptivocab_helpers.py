"""Small real things for the AdaptiVocab tests: a byte-level BPE tokenizer trained on the spot, a domain
corpus of documentation-like text, and a tiny random Llama folder with tied embeddings (like SmolLM2)."""

from __future__ import annotations

import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

PHRASES = [
    "Return the value of the attribute.",
    "This function is used to open the file.",
    "See :func:`open` for details of the mode argument.",
    "Raises :exc:`ValueError` if the argument is not valid.",
    "The :class:`dict` type is a mapping of keys to values.",
    "Changed in version 3.11: the default is now used.",
    "Use :meth:`str.join` to concatenate the strings in the list.",
    "New in version 3.8.",
]
WORDS = "the of a to in is for and value object list string module function return type".split()


def domain_text(seed: int, paragraphs: int = 30) -> str:
    """Documentation-like text: the same phrases over and over, with some random words between them."""
    rng = random.Random(seed)
    lines = []
    for _ in range(paragraphs):
        sentence = " ".join(rng.choice(PHRASES) for _ in range(3))
        filler = " ".join(rng.choice(WORDS) for _ in range(6))
        lines.append(f"{sentence} {filler.capitalize()}.\n")
    return "\n".join(lines)


def write_domain_corpus(root: Path, files: int = 24) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        sub = root / ("library" if i % 2 else "reference")
        sub.mkdir(exist_ok=True)
        (sub / f"doc{i:02d}.rst.txt").write_text(domain_text(i))
    (root / "binary.bin").write_bytes(b"\x00\x01\x02")
    return root


def write_tiny_tokenizer(folder: Path, vocab_size: int = 700) -> Path:
    """A byte-level BPE (GPT-2 style, 'Ġ' for spaces) trained on domain and general text, as an HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    general = ["The quick brown fox jumps over the lazy dog. " * 3, "Weather, history and music; café naïve."]
    tokenizer.train_from_iterator([domain_text(s, 10) for s in range(5)] + general * 20, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    hf.chat_template = CHAT_TEMPLATE
    folder.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(folder))
    return folder


def write_tiny_model(folder: Path) -> Path:
    """A tiny random Llama (3 layers, tied embeddings) next to the tiny tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    write_tiny_tokenizer(folder)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    return folder
