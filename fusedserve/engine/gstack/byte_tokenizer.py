"""The byte-level vocabulary of the Gstack models: token id = byte value (0..255), plus <|endoftext|> = 256.

It builds a Hugging Face fast tokenizer (ByteLevel BPE with no merges) whose ids equal the raw byte values, so
the corpus can be encoded with numpy (`bytes -> uint16`) and the saved folder still loads with `AutoTokenizer`
for serving. It never downloads anything.
"""

from __future__ import annotations

from pathlib import Path

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 256
VOCAB_SIZE = 257
# The models are pre-trained on Python source, not on dialogues: a chat is rendered as the plain concatenation
# of the messages' contents, so a chat request is a code prompt that the model continues.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}"
    "{% if not loop.last %}{{ '\\n' }}{% endif %}{% endfor %}"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from byte values to printable unicode characters (what ByteLevel uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


def build_byte_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """A fast tokenizer where every byte is one token whose id is the byte value."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([EOT_TOKEN])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOT_TOKEN,
        eos_token=EOT_TOKEN,
        unk_token=None,
        pad_token=EOT_TOKEN,
        model_max_length=1 << 30,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.convert_tokens_to_ids(EOT_TOKEN) != EOT_ID:
        raise RuntimeError("byte tokenizer: <|endoftext|> did not get id 256")
    return tokenizer


def save_byte_tokenizer(folder: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json (+ special tokens) into a model folder."""
    build_byte_tokenizer().save_pretrained(str(folder))
