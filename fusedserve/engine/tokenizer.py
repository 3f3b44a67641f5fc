"""The engine's tokenizer interface and its Hugging Face implementation.

Everything that turns text into ids or back goes through `Tokenizer`, so an adapted vocabulary (AdaptiVocab's
PatchTokenizer) plugs in by implementing the same few methods. Chat templates are rendered to text with the
model folder's template and then encoded, so special tokens in the template map to their ids.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any


class Tokenizer(ABC):
    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def eos_token_ids(self) -> set[int]:
        """Ids that end generation unless ignore_eos is set."""

    @property
    @abstractmethod
    def all_special_ids(self) -> set[int]: ...

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Plain text to ids, adding no special tokens of its own (templates add what they need)."""

    @abstractmethod
    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...

    @abstractmethod
    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The chat template applied to messages, as text."""

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt, **kwargs))

    def token_text(self, token_id: int) -> str:
        """A single token shown to humans (logprobs): its decoded text, special tokens included."""
        return self.decode([token_id], skip_special_tokens=False)


class HFTokenizer(Tokenizer):
    """A transformers tokenizer loaded from a local model folder (never from a hub)."""

    def __init__(self, model_dir: str | Path) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self._special = set(self._tok.all_special_ids)
        self._eos = {i for i in [self._tok.eos_token_id] if i is not None}
        self._eos |= _generation_config_eos(Path(model_dir))

    @property
    def hf(self) -> Any:
        return self._tok

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def eos_token_ids(self) -> set[int]:
        return self._eos

    @property
    def all_special_ids(self) -> set[int]:
        return self._special

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        if not getattr(self._tok, "chat_template", None):
            raise ValueError("this model has no chat template; use /v1/completions")
        return self._tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )


def _generation_config_eos(model_dir: Path) -> set[int]:
    import json

    path = model_dir / "generation_config.json"
    if not path.exists():
        return set()
    eos = json.loads(path.read_text()).get("eos_token_id")
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list) else {int(eos)}


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The tokenizer a model folder asks for: AdaptiVocab's PatchTokenizer when its manifest says so."""
    from fusedserve.engine.manifest import read_manifest

    manifest = read_manifest(Path(model_dir))
    if "adaptivocab" in manifest:
        from fusedserve.engine.adaptivocab.patch_tokenizer import PatchTokenizer

        return PatchTokenizer.from_model_dir(Path(model_dir))
    return HFTokenizer(model_dir)
