"""Wan2.1 video VAE (causal 3-D convs, 16 latent channels, stride 4x8x8): videos <-> normalised latents.

Loads the released `Wan2.1_VAE.pth` as it is; must not change the reference's chunking, caches or clamp.

Causal chunking: encode runs the encoder on frames [0], [1-4], [5-8], ...; decode runs the decoder on one
latent frame at a time. Every temporal conv remembers the last input frames it saw in a `FeatureCache`, so
chunk k sees the true history instead of zero padding. The cache is a plain dict keyed by module path:
it can be moved between devices or sent to another rank.

Splitting a decode across ranks exactly: the decoder is causal in time and its temporal receptive field
spans the whole clip (a change in latent frame t still moves frame t+38; measured, and it depends only on
the layer list, not the width), so independent time slices cannot be exact, and spatial tiles cannot be
exact either (the middle attention block is global per frame). Two exact schemes are supported: (1) hand-off in time: `decode_frames(latent, cache, a, b)` continues from the
cache left by frames [0, a) (sequential, but lets a rank stream or resume); (2) a pipeline over layers:
`decoder_layer_count()` layers split into contiguous groups, rank r runs `run_decoder_layers(x, cache,
lo_r, hi_r)` on latent frame t while rank r+1 works on frame t-1 (each rank keeps its own cache, the
per-layer keys are disjoint). Both are the same computation as one process (bit-for-bit in the tests).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.t5 import CheckpointError, count_indices, load_checked, load_pth, require_key

CACHE_FRAMES = 2  # a kernel-3 causal conv needs the two frames before the chunk
# The released latent statistics (Wan2_1_VAE), per latent channel.
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)  # fmt: skip
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)  # fmt: skip


@dataclass(frozen=True)
class VaeConfig:
    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temporal_downsample: tuple[bool, ...] = (False, True, True)

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], source: str | Path) -> VaeConfig:
        """Read every field off the encoder's keys and shapes: width from `encoder.conv1.weight`, latent
        channels from `conv2.weight`, stages from the resample layers of `encoder.downsamples`."""
        width = require_key(state, "encoder.conv1.weight", source).shape[0]
        z_dim = require_key(state, "conv2.weight", source).shape[0]
        stages: list[list[int]] = [[]]  # output widths of the residual blocks, per encoder stage
        attention: set[int] = set()  # stages with an attention block
        temporal: list[bool] = []
        for i in range(count_indices(state, "encoder.downsamples.")):
            prefix = f"encoder.downsamples.{i}."
            if prefix + "resample.1.weight" in state:  # a resample closes the stage
                temporal.append(prefix + "time_conv.weight" in state)
                stages.append([])
            elif prefix + "to_qkv.weight" in state:
                attention.add(len(stages) - 1)
            else:
                stages[-1].append(require_key(state, prefix + "residual.6.weight", source).shape[0])
        if not all(stages) or len({len(widths) for widths in stages}) != 1:
            raise CheckpointError(
                f"{source}: encoder.downsamples.* do not form equal stages of residual blocks"
            )
        return cls(
            dim=width,
            z_dim=z_dim,
            dim_mult=tuple(widths[-1] // width for widths in stages),
            num_res_blocks=len(stages[0]),
            attn_scales=tuple(1.0 / 2**i for i in sorted(attention)),
            temporal_downsample=tuple(temporal),
        )


class FeatureCache:
    """What each temporal conv of one chunked pass has seen: its last input frames, keyed by module path."""

    def __init__(self, frames: dict[str, Tensor] | None = None) -> None:
        self.frames: dict[str, Tensor] = dict(frames or {})

    def get(self, key: str) -> Tensor | None:
        return self.frames.get(key)

    def put(self, key: str, value: Tensor) -> None:
        self.frames[key] = value

    def __contains__(self, key: str) -> bool:
        return key in self.frames

    def __len__(self) -> int:
        return len(self.frames)

    def to(self, device: str | torch.device) -> FeatureCache:
        return FeatureCache({k: v.to(device) for k, v in self.frames.items()})


def _history_tail(previous: Tensor | None, x: Tensor) -> Tensor:
    """The last CACHE_FRAMES input frames after this chunk; a 1-frame chunk borrows one from before."""
    tail = x[:, :, -CACHE_FRAMES:].clone()  # clone: a view would keep the whole chunk alive
    if tail.shape[2] < CACHE_FRAMES and previous is not None:
        tail = torch.cat([previous[:, :, -1:].to(tail.device), tail], dim=2)
    return tail


class CausalConv3d(nn.Conv3d):
    """Conv3d padded only on the past side in time; with a cache, the past is the previous chunk.

    Spatial zero padding is left to the conv itself, which saves a padded copy of the (large) input.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel, stride=1, padding=0) -> None:
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=(0, ph, pw))
        self.time_pad = 2 * pt
        self.cache_key = ""  # the module path, set once the whole VAE is built

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        missing = self.time_pad  # past frames the kernel needs before the first one of x
        if cache is not None and missing > 0:
            previous = cache.get(self.cache_key)
            cache.put(self.cache_key, _history_tail(previous, x))
            if previous is not None:
                x = torch.cat([previous.to(x.device), x], dim=2)
                missing -= previous.shape[2]
        if missing > 0:
            x = F.pad(x, (0, 0, 0, 0, missing, 0))
        return super().forward(x)


class RMSNorm(nn.Module):
    """L2-normalise over channels, times sqrt(channels) and a learned gain; computed in float32."""

    def __init__(self, dim: int, video: bool = True) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1, 1) if video else (dim, 1, 1)))

    def forward(self, x: Tensor) -> Tensor:
        return (F.normalize(x.float(), dim=1) * self.scale * self.gamma.float()).to(x.dtype)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        # Indices match the reference keys: residual.{0,2,3,6}; 5 was dropout (inactive at inference).
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim, 3, padding=1),
        )  # fmt: skip
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        skip = self.shortcut(x)
        for layer in self.residual:
            x = layer(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + skip


class AttentionBlock(nn.Module):
    """Single-head self-attention over the positions of each frame (no temporal mixing)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, video=False)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(frames)).reshape(b * t, 1, c * 3, h * w).permute(0, 1, 3, 2)
        q, k, v = qkv.contiguous().chunk(3, dim=-1)  # each [b*t, 1, h*w, c]
        y = F.scaled_dot_product_attention(q, k, v)
        y = self.proj(y.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w))
        return x + y.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)


class NearestUpsample2x(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").type_as(x)


class Resample(nn.Module):
    """Spatial x2 down/up per frame; the 3d variants also halve/double time through `time_conv`."""

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        if mode.startswith("up"):
            self.resample = nn.Sequential(NearestUpsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        if self.mode == "upsample3d":
            x = self._double_frames(x, cache)
        b, c, t, h, w = x.shape
        y = self.resample(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
        y = y.reshape(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4)
        if self.mode == "downsample3d":
            y = self._halve_frames(y, cache)
        return y

    def _double_frames(self, x: Tensor, cache: FeatureCache) -> Tensor:
        key = self.time_conv.cache_key
        if key not in cache:
            # The opening latent frame becomes one pixel frame; later convs see zeros as its past.
            b, c, _, h, w = x.shape
            cache.put(key, x.new_zeros(b, c, CACHE_FRAMES, h, w))
            return x
        b, c, t, h, w = x.shape
        y = self.time_conv(x, cache).reshape(b, 2, c, t, h, w)
        # Channel half 0 -> even frames, half 1 -> odd frames.
        return torch.stack((y[:, 0], y[:, 1]), dim=3).reshape(b, c, t * 2, h, w)

    def _halve_frames(self, x: Tensor, cache: FeatureCache) -> Tensor:
        key = self.time_conv.cache_key
        previous = cache.get(key)
        cache.put(key, x[:, :, -1:].clone())
        if previous is None:
            return x  # the opening frame has no partner: it stays one frame
        return self.time_conv(torch.cat([previous.to(x.device), x], dim=2))


_CACHED_LAYERS = (CausalConv3d, ResidualBlock, AttentionBlock, Resample)


def _run(layers: Sequence[nn.Module], x: Tensor, cache: FeatureCache) -> Tensor:
    for layer in layers:
        x = layer(x, cache) if isinstance(layer, _CACHED_LAYERS) else layer(x)
    return x


class Encoder(nn.Module):
    def __init__(self, cfg: VaeConfig) -> None:
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        scale = 1.0
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(d_in, d_out))
                if scale in cfg.attn_scales:
                    layers.append(AttentionBlock(d_out))
                d_in = d_out
            if i != len(cfg.dim_mult) - 1:
                layers.append(
                    Resample(d_out, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d")
                )
                scale /= 2.0
        width = dims[-1]
        self.downsamples = nn.Sequential(*layers)
        self.middle = nn.Sequential(
            ResidualBlock(width, width), AttentionBlock(width), ResidualBlock(width, width)
        )
        self.head = nn.Sequential(RMSNorm(width), nn.SiLU(), CausalConv3d(width, cfg.z_dim * 2, 3, padding=1))

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        return _run([self.conv1, *self.downsamples, *self.middle, *self.head], x, cache)


class Decoder(nn.Module):
    def __init__(self, cfg: VaeConfig) -> None:
        super().__init__()
        dims = [cfg.dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temporal_upsample = tuple(reversed(cfg.temporal_downsample))
        scale = 1.0 / 2 ** (len(cfg.dim_mult) - 2)
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))  # fmt: skip
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if i > 0:
                d_in //= 2  # the upsample before this stage halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(d_in, d_out))
                if scale in cfg.attn_scales:
                    layers.append(AttentionBlock(d_out))
                d_in = d_out
            if i != len(cfg.dim_mult) - 1:
                layers.append(Resample(d_out, "upsample3d" if temporal_upsample[i] else "upsample2d"))
                scale *= 2.0
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))

    def layers(self) -> list[nn.Module]:
        """The decoder as one ordered list (the unit of a pipeline split across ranks)."""
        return [self.conv1, *self.middle, *self.upsamples, *self.head]

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        return _run(self.layers(), x, cache)


class VideoVAE(nn.Module):
    """The network, with the reference's top-level names: encoder, conv1, conv2, decoder."""

    def __init__(self, cfg: VaeConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder(cfg)
        for name, module in self.named_modules():
            if isinstance(module, CausalConv3d):
                module.cache_key = name


class WanVAE:
    """Encode [3, F, H, W] videos in [-1, 1] to normalised latents [16, 1 + (F-1)//4, H/8, W/8] and back.

    dtype float32 (default) is the reference; bfloat16 runs the convs in bf16 with float32 norms (GPU).
    """

    def __init__(self, model: VideoVAE, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:  # fmt: skip
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        for module in self.model.modules():
            if isinstance(module, RMSNorm):
                module.float()  # norms stay float32 when the convs run in bf16
        self.dtype = dtype
        self.device = torch.device(device)
        z = model.config.z_dim
        if z != len(LATENT_MEAN):
            raise CheckpointError(
                f"VAE has {z} latent channels; the released statistics cover {len(LATENT_MEAN)}"
            )
        self.mean = torch.tensor(LATENT_MEAN, dtype=torch.float32, device=device).view(1, z, 1, 1, 1)
        self.inv_std = (1.0 / torch.tensor(LATENT_STD, dtype=torch.float32, device=device)).view(
            1, z, 1, 1, 1
        )

    @classmethod
    def from_checkpoint(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> WanVAE:  # fmt: skip
        """Load `Wan2.1_VAE.pth` (strict: every key, every shape); the width is read from the file."""
        state = load_pth(path)
        cfg = VaeConfig.from_state_dict(state, path)
        with torch.device("meta"):
            model = VideoVAE(cfg)
        load_checked(model, state, path)
        return cls(model, dtype=dtype, device=device)

    @property
    def z_dim(self) -> int:
        return self.model.config.z_dim

    def to(self, device: str | torch.device) -> WanVAE:
        """Move weights and latent statistics (e.g. onto a warm pool's GPU); returns self."""
        self.device = torch.device(device)
        self.model.to(self.device)
        self.mean, self.inv_std = self.mean.to(self.device), self.inv_std.to(self.device)
        return self

    # ---- encode ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """[3, F, H, W] in [-1, 1] -> [z, 1 + (F-1)//4, H/8, W/8] float32 (posterior mean, normalised)."""
        frames = _check_video(video)
        x = video.to(device=self.device, dtype=self.dtype)[None]
        cache = FeatureCache()
        chunks = [x[:, :, :1]] + [x[:, :, 1 + 4 * i : 5 + 4 * i] for i in range((frames - 1) // 4)]
        hidden = torch.cat([self.model.encoder(chunk, cache) for chunk in chunks], dim=2)
        mu = self.model.conv1(hidden)[:, : self.z_dim].float()
        return ((mu - self.mean) * self.inv_std)[0]

    # ---- decode ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        """[z, T, h, w] normalised latent -> [3, 1 + 4(T-1), 8h, 8w] float32 in [-1, 1]."""
        _check_latent(latent, self.z_dim)
        return self.decode_frames(latent, FeatureCache(), 0, latent.shape[1])

    @torch.no_grad()
    def decode_frames(self, latent: Tensor, cache: FeatureCache, start: int, stop: int) -> Tensor:
        """Pixel frames of latent frames [start, stop); `cache` must hold the state left by [0, start)
        (empty when start is 0) and is advanced in place. Latent frame 0 gives 1 frame, others 4."""
        _check_latent(latent, self.z_dim)
        if not 0 <= start <= stop <= latent.shape[1]:
            raise ValueError(f"frames [{start}, {stop}): expected 0 <= start <= stop <= {latent.shape[1]}")
        if (start == 0) != (len(cache) == 0):
            raise ValueError(
                f"cache: {len(cache)} entries for start={start}; it must be empty exactly when start is 0"
            )
        pieces = [self.decode_step(latent[:, t : t + 1], cache) for t in range(start, stop)]
        if not pieces:
            return latent.new_zeros(3, 0, latent.shape[2] * 8, latent.shape[3] * 8, dtype=torch.float32)
        return torch.cat(pieces, dim=1)

    def decode_stream(self, latent: Tensor) -> Iterator[Tensor]:
        """Yield the pixel frames of each latent frame in order (1, then 4 each): constant memory."""
        _check_latent(latent, self.z_dim)
        cache = FeatureCache()
        for t in range(latent.shape[1]):
            with torch.no_grad():  # not around the yield: the caller's code must keep its grad mode
                frames = self.decode_step(latent[:, t : t + 1], cache)
            yield frames

    def decode_step(self, latent_frame: Tensor, cache: FeatureCache) -> Tensor:
        """One latent frame [z, 1, h, w] -> its pixel frames [3, n, 8h, 8w], clamped to [-1, 1]."""
        x = self.decoder_input(latent_frame)
        out = self.run_decoder_layers(x, cache, 0, self.decoder_layer_count())
        return self.decoder_output(out)

    # The three pieces below are the units of a pipeline-parallel decode (see the module docstring).

    def decoder_input(self, latent_frame: Tensor) -> Tensor:
        """Undo the normalisation and apply `conv2` (per frame: it is a 1x1x1 conv)."""
        z = latent_frame.to(device=self.device, dtype=torch.float32)[None]
        z = z / self.inv_std + self.mean
        return self.model.conv2(z.to(self.dtype))

    def decoder_layer_count(self) -> int:
        return len(self.model.decoder.layers())

    def run_decoder_layers(self, x: Tensor, cache: FeatureCache, lo: int, hi: int) -> Tensor:
        return _run(self.model.decoder.layers()[lo:hi], x, cache)

    def decoder_output(self, x: Tensor) -> Tensor:
        return x.float().clamp_(-1.0, 1.0)[0]


def _check_video(video: Tensor) -> int:
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"video: shape {list(video.shape)}, expected [3, frames, height, width]")
    frames = video.shape[1]
    if frames < 1:
        raise ValueError("video: 0 frames, expected 4n+1 frames (e.g. 81)")
    if (frames - 1) % 4:
        # The reference silently drops them; we keep its result but say so.
        warnings.warn(
            f"video: {frames} frames is not 4n+1; the last {(frames - 1) % 4} frame(s) are not encoded",
            stacklevel=3,
        )
    return frames


def _check_latent(latent: Tensor, z_dim: int) -> None:
    if latent.ndim != 4 or latent.shape[0] != z_dim:
        raise ValueError(f"latent: shape {list(latent.shape)}, expected [{z_dim}, frames, height, width]")


__all__ = ["FeatureCache", "VaeConfig", "VideoVAE", "WanVAE", "LATENT_MEAN", "LATENT_STD"]
