"""Ulysses sequence parallelism over torch.distributed: the `sp` object the DiT calls to shard, gather and attend.

It must not know the model: padding to a multiple of the world size and per-rank RoPE offsets are the DiT's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

# (q, k, v, k_len) -> out, all [B, L, heads, head_dim]; keys at positions >= k_len are ignored.
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "int | torch.Tensor | None"], torch.Tensor]


class ParallelConfigError(ValueError):
    """A GPU count / head count / parallel layout that cannot work, saying which ones do."""


def supported_sizes(num_heads: int) -> list[int]:
    """Ulysses sizes that split `num_heads` evenly (40 heads -> 1, 2, 4, 5, 8, 10, 20, 40)."""
    return [n for n in range(1, num_heads + 1) if num_heads % n == 0]


def check_heads(num_heads: int, ulysses_size: int) -> None:
    """Raise ParallelConfigError unless every rank gets the same number of whole attention heads."""
    if num_heads % ulysses_size:
        sizes = ", ".join(str(n) for n in supported_sizes(num_heads) if n <= 16)
        raise ParallelConfigError(
            f"ulysses size: got {ulysses_size} ranks for a model with {num_heads} attention heads, expected a "
            f"divisor of {num_heads} (GPU counts that work: {sizes}); change the number of GPUs "
            f"or use CFG-parallel (which halves the Ulysses size)"
        )


def local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_len: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Non-causal attention on [B, L, H, D] with keys cut at the true length k_len (padding excluded)."""
    if k_len is not None:
        lengths = torch.as_tensor(k_len).reshape(-1).tolist()
        if len(set(lengths)) == 1:
            # One true length for the batch: dropping the padding keys is the same as masking them.
            k, v = k[:, : int(lengths[0])], v[:, : int(lengths[0])]
            k_len = None
    mask = None
    if k_len is not None:  # different lengths per sample: a boolean key mask [B, 1, 1, Lk]
        positions = torch.arange(k.shape[1], device=k.device)
        mask = (positions[None, :] < torch.as_tensor(k_len, device=k.device).reshape(-1, 1))[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def _dit_attention() -> AttentionFn:
    """The DiT's own kernel choice (cuDNN / flash / SDPA), so sequence parallelism changes no numerics."""
    from pipeline.models.attention import attention

    return attention


class UlyssesParallel:
    """Sequence parallelism over one process group: each rank holds L/p tokens, attends with H/p heads.

    DiT contract: `shard(x, dim)` keeps this rank's contiguous chunk (dim must divide by world_size),
    `gather(x, dim)` concatenates every rank's chunk in rank order, `attention(q, k, v, k_len)` takes
    local-token q/k/v [B, L/p, H, D] and returns local-token outputs [B, L/p, H, D] over the whole
    sequence, ignoring keys at global positions >= k_len.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, attention_fn: AttentionFn | None = None) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.attention_fn = attention_fn or _dit_attention()

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if x.shape[dim] % self.world_size:
            raise ParallelConfigError(
                f"shard: dim {dim} has size {x.shape[dim]}, expected a multiple of the Ulysses size "
                f"{self.world_size} (the DiT pads the sequence before sharding)"
            )
        return x.chunk(self.world_size, dim)[self.rank]

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_len: int | torch.Tensor | None = None
    ) -> torch.Tensor:
        check_heads(q.shape[2], self.world_size)
        q, k, v = (self.sequence_to_heads(t) for t in (q, k, v))  # [B, L, H/p, D]
        out = self.attention_fn(q, k, v, k_len)
        return self.heads_to_sequence(out)  # [B, L/p, H, D]

    def sequence_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L/p, H, D] (this rank's tokens, all heads) -> [B, L, H/p, D] (all tokens, this rank's heads)."""
        b, local_len, heads, dim = x.shape
        p = self.world_size
        if p == 1:
            return x
        send = x.reshape(b, local_len, p, heads // p, dim).permute(2, 0, 1, 3, 4).contiguous()
        received = self._all_to_all(send)  # [p (whose tokens), B, L/p, H/p, D]
        return received.permute(1, 0, 2, 3, 4).reshape(b, p * local_len, heads // p, dim)

    def heads_to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, H/p, D] (all tokens, this rank's heads) -> [B, L/p, H, D] (this rank's tokens, all heads)."""
        b, length, local_heads, dim = x.shape
        p = self.world_size
        if p == 1:
            return x
        send = x.reshape(b, p, length // p, local_heads, dim).permute(1, 0, 2, 3, 4).contiguous()
        received = self._all_to_all(send)  # [p (whose heads), B, L/p, H/p, D]
        return received.permute(1, 2, 0, 3, 4).reshape(b, length // p, p * local_heads, dim)

    def _all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        # Chunk i of dim 0 goes to rank i; chunk j of the result came from rank j (gloo and NCCL both do it).
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=self.group)
        return received
