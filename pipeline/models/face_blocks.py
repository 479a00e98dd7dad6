"""Animate-14B's face encoder (motion vectors -> per-latent-frame face tokens) and face adapter blocks.

Must not hard-code widths: the inner width and the number of face-encoder heads come from the checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.attention import attention
from pipeline.models.dit import RMSNorm, SequenceParallel, linear

Tensor = torch.Tensor


def _layer_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Parameter-free LayerNorm in fp32 (what autocast does to nn.LayerNorm in the reference)."""
    with torch.autocast(x.device.type, enabled=False):
        return F.layer_norm(x.float(), (x.shape[-1],), eps=eps)


class CausalConv1d(nn.Module):
    """Conv1d over time with the first frame repeated (kernel-1) times on the left."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.pad = kernel - 1
        self.conv = nn.Conv1d(cin, cout, kernel, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x.to(self.conv.weight.dtype), (self.pad, 0), mode="replicate")
        return self.conv(x)


class FaceEncoder(nn.Module):
    """[B, T_faces, motion_dim] -> [B, T', heads + 1, dim]; T' = frames after two stride-2 causal convs."""

    def __init__(self, motion_dim: int, inner: int, heads: int, dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.conv1_local = CausalConv1d(motion_dim, inner * heads, 3)
        self.conv2 = CausalConv1d(inner, inner, 3, stride=2)
        self.conv3 = CausalConv1d(inner, inner, 3, stride=2)
        self.out_proj = nn.Linear(inner, dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, motion: Tensor) -> Tensor:
        b = motion.shape[0]
        x = self.conv1_local(motion.transpose(1, 2))  # [B, heads*inner, T]
        x = x.unflatten(1, (self.heads, -1)).flatten(0, 1).transpose(1, 2)  # [B*heads, T, inner]
        x = F.silu(_layer_norm(x))
        for conv in (self.conv2, self.conv3):
            x = F.silu(_layer_norm(conv(x.transpose(1, 2)).transpose(1, 2)))
        x = linear(self.out_proj, x)  # [B*heads, T', dim]
        x = x.unflatten(0, (b, self.heads)).transpose(1, 2)  # [B, T', heads, dim]
        pad = self.padding_tokens.to(x.dtype).expand(b, x.shape[1], 1, -1)
        return torch.cat([x, pad], dim=2)


class FaceBlock(nn.Module):
    """Each latent frame's tokens attend to that frame's face tokens; returns the residual [B, L, dim]."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.linear1_kv = nn.Linear(dim, dim * 2)
        self.linear1_q = nn.Linear(dim, dim)
        self.linear2 = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(dim // num_heads, 1e-6)
        self.k_norm = RMSNorm(dim // num_heads, 1e-6)

    def forward(self, x: Tensor, motion_vec: Tensor, num_tokens: int, sp: SequenceParallel | None = None) -> Tensor:
        """x [B, rows, dim] (this rank's rows under sp), motion_vec [B, T, N, dim]; the first `num_tokens`
        rows of the whole sequence are the T frames' tokens, later rows are padding (zero residual)."""
        b, frames, n_face, _ = motion_vec.shape
        kv = linear(self.linear1_kv, _layer_norm(motion_vec)).unflatten(-1, (2, self.num_heads, -1))
        k, v = kv[..., 0, :, :], kv[..., 1, :, :]  # [B, T, N, H, D]
        q = linear(self.linear1_q, _layer_norm(x)).unflatten(-1, (self.num_heads, -1))
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        if sp is not None:
            q = sp.gather(q, 1)  # whole frames are needed
        per_frame = q[:, :num_tokens].reshape(b * frames, num_tokens // frames, self.num_heads, -1)
        out = attention(per_frame, k.flatten(0, 1), v.flatten(0, 1))
        out = out.reshape(b, num_tokens, -1)
        out = F.pad(out, (0, 0, 0, q.shape[1] - num_tokens))
        if sp is not None:
            out = sp.shard(out, 1)  # keep this rank's rows
        return linear(self.linear2, out)


class FaceAdapter(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_blocks: int) -> None:
        super().__init__()
        self.fuser_blocks = nn.ModuleList(FaceBlock(dim, num_heads) for _ in range(num_blocks))
