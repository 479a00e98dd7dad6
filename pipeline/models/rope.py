"""3D rotary position embedding of the Wan DiTs, computed with float32 cos/sin tables.

Must not change the reference function: adjacent-pair complex layout, theta 10000 per axis, head_dim split
d-4(d//6) / 2(d//6) / 2(d//6) over (frame, row, column), padding rows left untouched.
"""

from __future__ import annotations

import torch


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Real dims given to the frame, row and column axes (each even, summing to head_dim)."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    side = 2 * (head_dim // 6)
    return head_dim - 2 * side, side, side


def rope_tables(
    grid: tuple[int, int, int], head_dim: int, total_rows: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [total_rows, head_dim // 2] float32 for tokens ordered (f, h, w); rows past the grid are identity.

    Angles are formed in float64 (position x frequency) and only the final cos/sin are rounded to float32,
    so large positions lose no accuracy.
    """
    f, h, w = grid
    tokens = f * h * w
    if tokens > total_rows:
        raise ValueError(f"grid {grid} has {tokens} tokens but only {total_rows} rows were asked for")
    angles = torch.cat(
        [
            _axis_angles(n, dim, device)[idx]
            for n, dim, idx in zip(
                (f, h, w), axis_dims(head_dim), _grid_index(f, h, w, device), strict=True
            )
        ],
        dim=1,
    )  # [tokens, head_dim // 2]
    cos = torch.ones(total_rows, head_dim // 2, dtype=torch.float32, device=device)
    sin = torch.zeros(total_rows, head_dim // 2, dtype=torch.float32, device=device)
    cos[:tokens] = angles.cos().float()
    sin[:tokens] = angles.sin().float()
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x [B, L, H, D] by the tables [L, D/2]; returns float32 like the reference."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, L, H, D/2, 2]
    re, im = pairs[..., 0], pairs[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((re * c - im * s, re * s + im * c), dim=-1).flatten(-2)


def _axis_angles(n: int, dim: int, device: torch.device | str) -> torch.Tensor:
    inv_freq = 1.0 / torch.pow(10000.0, torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
    return torch.outer(torch.arange(n, dtype=torch.float64, device=device), inv_freq)


def _grid_index(f: int, h: int, w: int, device: torch.device | str) -> list[torch.Tensor]:
    # token index = (fi * h + hi) * w + wi
    fi, hi, wi = torch.meshgrid(
        torch.arange(f, device=device), torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
    )
    return [fi.flatten(), hi.flatten(), wi.flatten()]
