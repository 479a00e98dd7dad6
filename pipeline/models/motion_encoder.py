"""Animate-14B's face motion encoder (LIA-style): face crops [N, 3, S, S] -> motion vectors [N, 512].

Must not hard-code widths: the channel table, number of ResBlocks, input size and fc widths come from a
MotionEncoderSpec read off the checkpoint's tensor shapes (the released one is `MotionEncoderSpec.real()`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor
PREFIX = "motion_encoder."


@dataclass(frozen=True)
class MotionEncoderSpec:
    """Widths of the encoder: stem width, ResBlock output widths (each halves the size), fc widths, directions."""

    stem: int
    res_out: tuple[int, ...]
    style_dim: int
    fc_out: tuple[int, ...]
    direction_shape: tuple[int, int]  # (motion vector width, number of directions)

    @property
    def input_size(self) -> int:
        return 4 * 2 ** len(self.res_out)

    @classmethod
    def real(cls) -> MotionEncoderSpec:
        table = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32}
        return cls(table[512], tuple(table[2**i] for i in range(8, 1, -1)), 512, (512,) * 4 + (20,), (512, 20))

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]], prefix: str = PREFIX) -> MotionEncoderSpec:
        """Read the widths from checkpoint shapes (keys under `prefix`)."""
        convs = f"{prefix}enc.net_app.convs."
        n_convs = _count(shapes, convs)
        fc = f"{prefix}enc.fc."
        try:
            stem = shapes[f"{convs}0.0.weight"][0]
            res_out = tuple(shapes[f"{convs}{i}.conv2.1.weight"][0] for i in range(1, n_convs - 1))
            style_dim = shapes[f"{convs}{n_convs - 1}.weight"][0]
            fc_out = tuple(shapes[f"{fc}{i}.weight"][0] for i in range(_count(shapes, fc)))
            direction = shapes[f"{prefix}dec.direction.weight"]
        except KeyError as exc:
            raise ValueError(f"checkpoint lacks motion encoder tensor {exc.args[0]!r}") from exc
        return cls(stem, res_out, style_dim, fc_out, (direction[0], direction[1]))


def _count(shapes: dict[str, tuple[int, ...]], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in shapes if (m := pattern.match(k))}
    if not found:
        raise ValueError(f"checkpoint has no tensors under {prefix!r}")
    return max(found) + 1


# ---------------------------------------------------------------------------------------------- layers


class EqualConv2d(nn.Module):
    """conv2d with the weight scaled by 1/sqrt(fan_in) at run time."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.scale = 1 / math.sqrt(cin * kernel**2)
        self.stride, self.padding = stride, padding

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        return F.conv2d(x.to(w.dtype), w * self.scale, self.bias, self.stride, self.padding)


class EqualLinear(nn.Module):
    """linear with the weight scaled by 1/sqrt(fan_in); no activation (as used by the encoder's fc)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cout, cin))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.scale = 1 / math.sqrt(cin)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight * self.scale, self.bias)


class FusedLeakyReLU(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x + self.bias, 0.2) * math.sqrt(2)


class Blur(nn.Module):
    """Depthwise 4x4 FIR [1,3,3,1]x[1,3,3,1]/64 with zero padding (pad0, pad1) on both axes."""

    def __init__(self, pad: tuple[int, int]) -> None:
        super().__init__()
        k = torch.tensor([1.0, 3.0, 3.0, 1.0])
        self.register_buffer("kernel", torch.outer(k, k) / 64)
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        channels = x.shape[1]
        kernel = self.kernel.flip(0, 1).to(x.dtype)[None, None].expand(channels, 1, -1, -1)
        p0, p1 = self.pad
        return F.conv2d(F.pad(x, (p0, p1, p0, p1)), kernel, groups=channels)


def conv_layer(cin: int, cout: int, kernel: int, downsample: bool = False, activate: bool = True) -> nn.Sequential:
    """Indices match the release: [Blur,] EqualConv2d [, FusedLeakyReLU]."""
    layers: list[nn.Module] = []
    if downsample:
        p = 2 + (kernel - 1)  # blur taps - stride + kernel - 1
        layers.append(Blur(((p + 1) // 2, p // 2)))
        layers.append(EqualConv2d(cin, cout, kernel, stride=2, padding=0, bias=False))
    else:
        layers.append(EqualConv2d(cin, cout, kernel, padding=kernel // 2, bias=False))
    if activate:
        layers.append(FusedLeakyReLU(cout))
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = conv_layer(cin, cin, 3)
        self.conv2 = conv_layer(cin, cout, 3, downsample=True)
        self.skip = conv_layer(cin, cout, 1, downsample=True, activate=False)

    def forward(self, x: Tensor) -> Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / math.sqrt(2)


class EncoderApp(nn.Module):
    def __init__(self, spec: MotionEncoderSpec) -> None:
        super().__init__()
        widths = (spec.stem, *spec.res_out)
        self.convs = nn.ModuleList([conv_layer(3, spec.stem, 1)])
        self.convs.extend(ResBlock(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.convs.append(EqualConv2d(widths[-1], spec.style_dim, 4, padding=0, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = conv(x)
        return x.flatten(1)  # [N, style_dim] (spatial 1x1)


class Encoder(nn.Module):
    def __init__(self, spec: MotionEncoderSpec) -> None:
        super().__init__()
        self.net_app = EncoderApp(spec)
        ins = (spec.style_dim, *spec.fc_out[:-1])
        self.fc = nn.Sequential(*(EqualLinear(a, b) for a, b in zip(ins, spec.fc_out, strict=True)))


class Direction(nn.Module):
    def __init__(self, shape: tuple[int, int]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(*shape))

    def forward(self, alpha: Tensor) -> Tensor:
        """sum_k alpha_k Q[:, k] with Q from QR(weight + 1e-8) in fp32, rounded to the weight dtype (as ref)."""
        w = self.weight + 1e-8
        q = torch.linalg.qr(w.float()).Q.to(w.dtype).float()
        return alpha.float() @ q.T


class Synthesis(nn.Module):
    def __init__(self, shape: tuple[int, int]) -> None:
        super().__init__()
        self.direction = Direction(shape)


class MotionEncoder(nn.Module):
    """`motion_encoder.*` of the Animate checkpoint; get_motion(faces [N,3,S,S] in [-1,1]) -> [N, 512] fp32."""

    def __init__(self, spec: MotionEncoderSpec) -> None:
        super().__init__()
        self.spec = spec
        self.enc = Encoder(spec)
        self.dec = Synthesis(spec.direction_shape)

    def get_motion(self, faces: Tensor) -> Tensor:
        size = self.spec.input_size
        if faces.dim() != 4 or faces.shape[1] != 3 or tuple(faces.shape[2:]) != (size, size):
            raise ValueError(f"face crops have shape {tuple(faces.shape)}; expected [N, 3, {size}, {size}]")
        alpha = self.enc.fc(self.enc.net_app(faces))
        with torch.autocast(faces.device.type, enabled=False):
            return self.dec.direction(alpha)
