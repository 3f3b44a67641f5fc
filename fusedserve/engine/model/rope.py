"""Rotary position embeddings (the Hugging Face "rotate half" convention), with Llama 3 and linear scaling."""

from __future__ import annotations

import math

import torch

from fusedserve.engine.model.arch import LlamaArch


def inverse_frequencies(arch: LlamaArch) -> torch.Tensor:
    dim = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = arch.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        inv_freq = _llama3_scaled(inv_freq, scaling)
    elif kind != "default":
        raise ValueError(f"rope scaling {kind!r} is not supported")
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_context = float(scaling.get("original_max_position_embeddings", 8192))
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding:
    """Precomputed cos/sin tables up to `max_positions`; kernels.norm_rope.apply_rope rotates q and k with them."""

    def __init__(
        self, arch: LlamaArch, max_positions: int, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> None:
        positions = torch.arange(max_positions, dtype=torch.float64)  # computed in fp64 on the host, then moved
        angles = torch.outer(positions, inverse_frequencies(arch))
        self.cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(device=device, dtype=dtype)
        self.sin = torch.cat([angles.sin(), angles.sin()], dim=-1).to(device=device, dtype=dtype)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, head_dim] at each token's position, for kernels.norm_rope.apply_rope."""
        return self.cos[positions], self.sin[positions]
