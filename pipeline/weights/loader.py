"""Load released Wan2.2 checkpoints (sharded safetensors + index, single safetensors, .pth) into our modules.

Must not guess: strict key/shape matching, every tensor consumed, and each error names the file and the key.

Tensors go from the file straight to the target device and dtype one at a time (`.pth` memory-mapped),
into a model built on the meta device and filled with `load_state_dict(assign=True)`, so no second full copy
of the weights is ever made. Safetensors shards bound for a CUDA device are read by several threads with
pread into a ring of pinned host buffers, copied to the GPU asynchronously and cast there (`_StagedReader`):
the released fp32 shards then load at page-cache/PCIe speed instead of one pageable copy per tensor.
Predicted on the H200 host (bench/bench_load.py measures it): one expert (57.2 GB fp32 -> 28.6 GB bf16) from
the page cache in ~3-5 s (12-20 GB/s, bounded by six preads and PCIe 5) instead of ~12-20 s (one thread
faulting in mmap pages, pageable H2D at ~5 GB/s), so both experts in ~6-10 s against the 20 s target.
"""

from __future__ import annotations

import json
import os
import struct
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from pipeline.models.dit import DiTConfig, WanDiT
from pipeline.weights.pth import TorchFileError, load_torch_file

Tensor = torch.Tensor
INDEX_SUFFIX = ".safetensors.index.json"
PTH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
# Staged CUDA reads: off with WANBOX_STAGED_READS=0 (then safetensors copies each tensor itself).
STAGED_READS = os.environ.get("WANBOX_STAGED_READS", "1").strip() != "0"
STAGE_PIECE_BYTES = 64 << 20  # one pread / one H2D copy
STAGE_BUFFERS = 8  # pinned pieces in flight (512 MiB of pinned host memory)
STAGE_THREADS = 6  # parallel preads: one thread copies page cache at ~5-8 GB/s, PCIe 5 takes ~50
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, or does not match the model (message says which and how)."""


# ---------------------------------------------------------------------------------------------- layout


def checkpoint_files(path: Path | str) -> dict[Path, list[str] | None]:
    """Files holding a checkpoint -> the keys each must hold (from the index) or None (whatever it holds).

    `path` is a directory with one `*.safetensors.index.json` (sharded), or with one `*.safetensors`,
    or a single `.safetensors` / `.pth` file.
    """
    path = Path(path)
    if path.is_file():
        return {path: None}
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint not found (no such file or directory)")
    indexes = sorted(path.glob(f"*{INDEX_SUFFIX}"))
    if len(indexes) > 1:
        raise CheckpointError(f"{path}: several shard indexes ({', '.join(p.name for p in indexes)}); expected one")
    if indexes:
        return _shards_from_index(indexes[0])
    singles = sorted(path.glob("*.safetensors"))
    if len(singles) == 1:
        return {singles[0]: None}
    if len(singles) > 1:
        raise CheckpointError(
            f"{path}: {len(singles)} safetensors files but no {INDEX_SUFFIX} saying which keys each holds"
        )
    raise CheckpointError(f"{path}: no *{INDEX_SUFFIX} and no *.safetensors file in this directory")


def _shards_from_index(index: Path) -> dict[Path, list[str] | None]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: not a valid shard index (needs a 'weight_map' object): {exc}") from exc
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard files; got {weight_map!r:.80}")
    shards: dict[Path, list[str] | None] = {}
    for key, shard in weight_map.items():
        keys = shards.setdefault(index.parent / shard, [])
        assert keys is not None
        keys.append(key)
    for shard, keys in shards.items():
        if not shard.is_file():
            raise CheckpointError(
                f"{shard}: shard missing; {index.name} maps {len(keys or [])} tensors to it "
                f"(e.g. {(keys or ['?'])[0]!r}). Re-download it (wanbox models pull)."
            )
    return shards


def tensor_shapes(path: Path | str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a checkpoint, reading only the safetensors headers."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in checkpoint_files(path):
        if file.suffix != ".safetensors":
            for key, tensor in _pth_state(file).items():
                shapes[key] = tuple(tensor.shape)
            continue
        with _open_safetensors(file, "cpu") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


# ---------------------------------------------------------------------------------------------- reading


def iter_tensors(
    path: Path | str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> Iterator[tuple[Path, str, Tensor]]:
    """(file, key, tensor) for every tensor, each moved to `device` and cast to `dtype` (floats only)."""
    device = torch.device(device)
    for file, wanted in checkpoint_files(path).items():
        if file.suffix == ".safetensors":
            yield from _iter_safetensors(file, wanted, dtype, device)
        else:
            for key, tensor in _pth_state(file).items():
                yield file, key, _cast(tensor, dtype).to(device)  # cast first: less to move


def _iter_safetensors(
    file: Path, wanted: list[str] | None, dtype: torch.dtype | None, device: torch.device
) -> Iterator[tuple[Path, str, Tensor]]:
    if device.type == "cuda" and STAGED_READS:
        yield from _StagedReader(file, wanted, device).tensors(dtype)
        return
    with _open_safetensors(file, device) as handle:
        _check_shard_keys(file, set(handle.keys()), wanted)
        for key in wanted if wanted is not None else handle.keys():  # noqa: SIM118
            try:
                tensor = handle.get_tensor(key)
            except Exception as exc:  # corrupt data region
                raise CheckpointError(f"{file}: cannot read tensor {key!r}: {exc}") from exc
            yield file, key, _cast(tensor, dtype)


def _check_shard_keys(file: Path, present: set[str], wanted: list[str] | None) -> None:
    if wanted is None:
        return
    absent = [k for k in wanted if k not in present]
    if absent:
        raise CheckpointError(f"{file}: the index lists {absent[0]!r} here but the shard lacks it "
                              f"({len(absent)} such keys); the shard does not match its index")
    extra = sorted(present - set(wanted))
    if extra:
        raise CheckpointError(f"{file}: holds {extra[0]!r} which the index does not list "
                              f"({len(extra)} such keys); the shard does not match its index")


class _StagedReader:
    """One safetensors shard to a CUDA device: threads pread 64 MiB pieces into a ring of pinned buffers, each
    piece is copied to the GPU without blocking, each tensor is cast on the GPU. Yields in file order."""

    def __init__(self, file: Path, wanted: list[str] | None, device: torch.device) -> None:
        with _open_safetensors(file, "cpu") as handle:  # validates the header against the file size
            _check_shard_keys(file, set(handle.keys()), wanted)
        self.file, self.device = file, device
        self.header, self.data_start = self._read_header(file)
        keys = wanted if wanted is not None else list(self.header)
        self.keys = sorted(keys, key=lambda k: self.header[k]["data_offsets"][0])

    @staticmethod
    def _read_header(file: Path) -> tuple[dict[str, Any], int]:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        return header, 8 + length

    def tensors(self, dtype: torch.dtype | None) -> Iterator[tuple[Path, str, Tensor]]:
        unknown = [k for k in self.keys if self.header[k]["dtype"] not in _SAFETENSORS_DTYPES]
        if unknown:
            raise CheckpointError(f"{self.file}: tensor {unknown[0]!r} has dtype {self.header[unknown[0]]['dtype']}; "
                                  f"expected one of {', '.join(_SAFETENSORS_DTYPES)}")
        pieces = [(key, start, size) for key in self.keys for start, size in self._pieces(key)]
        on_gpu = self.device.type == "cuda"  # the CPU runs the same steps synchronously (tests)
        ring = [torch.empty(STAGE_PIECE_BYTES, dtype=torch.uint8, pin_memory=on_gpu) for _ in range(STAGE_BUFFERS)]
        copied: list[torch.cuda.Event | None] = [None] * STAGE_BUFFERS
        fd = os.open(self.file, os.O_RDONLY)
        try:
            with ThreadPoolExecutor(STAGE_THREADS, thread_name_prefix="wanbox-read") as pool:
                reads: deque[Future[None]] = deque()

                def submit(i: int) -> None:
                    _key, start, size = pieces[i]
                    slot = i % STAGE_BUFFERS
                    reads.append(pool.submit(self._pread, fd, ring[slot], start, size, copied[slot]))

                for i in range(min(STAGE_BUFFERS - 1, len(pieces))):
                    submit(i)
                raw, filled, nxt = None, 0, STAGE_BUFFERS - 1
                for i, (key, _start, size) in enumerate(pieces):
                    if raw is None:
                        raw, filled = torch.empty(self._nbytes(key), dtype=torch.uint8, device=self.device), 0
                    reads.popleft().result()
                    slot = i % STAGE_BUFFERS
                    raw[filled : filled + size].copy_(ring[slot][:size], non_blocking=on_gpu)
                    if on_gpu:  # readers sleep on it (blocking) before refilling this buffer
                        copied[slot] = torch.cuda.Event(blocking=True)
                        copied[slot].record(torch.cuda.current_stream(self.device))
                    filled += size
                    if nxt < len(pieces):  # reuses the buffer of piece i-1, whose copy was issued before
                        submit(nxt)
                        nxt += 1
                    if filled == raw.numel():
                        yield self.file, key, _cast(self._view(key, raw), dtype)
                        raw = None
                if on_gpu:  # the pinned ring is freed only after its copies
                    torch.cuda.current_stream(self.device).synchronize()
        finally:
            os.close(fd)

    def _nbytes(self, key: str) -> int:
        begin, end = self.header[key]["data_offsets"]
        return end - begin

    def _pieces(self, key: str) -> Iterator[tuple[int, int]]:
        begin, end = self.header[key]["data_offsets"]
        for start in range(begin, end, STAGE_PIECE_BYTES):
            yield self.data_start + start, min(STAGE_PIECE_BYTES, end - start)
        if begin == end:
            yield self.data_start + begin, 0

    def _view(self, key: str, raw: Tensor) -> Tensor:
        info = self.header[key]
        return raw.view(_SAFETENSORS_DTYPES[info["dtype"]]).view(info["shape"])

    def _pread(self, fd: int, buffer: Tensor, offset: int, size: int, wait: torch.cuda.Event | None) -> None:
        if wait is not None:
            wait.synchronize()  # the GPU has taken this buffer's previous piece
        view = memoryview(buffer.numpy())[:size]
        done = 0
        while done < size:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise CheckpointError(f"{self.file}: file ends at byte {offset + done} inside tensor data; "
                                      f"the shard is truncated. Re-download it (wanbox models pull).")
            done += got


@contextmanager
def _open_safetensors(file: Path, device: torch.device | str) -> Iterator[Any]:
    """safe_open with errors that name the file (a truncated download is the usual cause)."""
    dev = torch.device(device)
    name = "cpu" if dev.type == "cpu" else str(dev if dev.index is not None else torch.device(dev.type, 0))
    try:
        handle = safe_open(str(file), framework="pt", device=name)
    except Exception as exc:
        size = file.stat().st_size if file.exists() else 0
        raise CheckpointError(
            f"{file}: unreadable safetensors file ({size} bytes): {exc}. The file is truncated or corrupt; "
            f"re-download it (wanbox models pull) and check it (wanbox models verify)."
        ) from exc
    with handle:
        yield handle


def _pth_state(file: Path) -> dict[str, Tensor]:
    """A torch.save'd state dict (optionally wrapped as {'state_dict': ...}), memory-mapped where possible."""
    try:
        state = load_torch_file(file)  # legacy (non-zip) files are read whole, zip files memory-mapped
    except TorchFileError as exc:
        raise CheckpointError(f"{file}: cannot load this .pth state dict ({exc}); it is truncated, corrupt, "
                              f"or not a plain tensor dict") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: expected a dict of tensors, got {type(state).__name__}")
    return state


def _cast(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def load_state_dict_from_dir(
    path: Path | str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> dict[str, Tensor]:
    """Every tensor of a checkpoint (directory or file) on `device`, floats cast to `dtype` (None = as stored)."""
    state: dict[str, Tensor] = {}
    for file, key, tensor in iter_tensors(path, dtype, device):
        if key in state:
            raise CheckpointError(f"{file}: tensor {key!r} appears twice in the checkpoint")
        state[key] = tensor
    return state


# ---------------------------------------------------------------------------------------------- modules


def load_into(
    model: nn.Module, path: Path | str, dtype: torch.dtype | None, device: torch.device | str
) -> nn.Module:
    """Fill a (meta-device) model from a checkpoint: strict keys and shapes, tensors assigned in place."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state: dict[str, Tensor] = {}
    for file, key, tensor in iter_tensors(path, dtype, device):
        if key not in expected:
            raise CheckpointError(f"{file}: unexpected tensor {key!r}; {type(model).__name__} has no such parameter")
        if tuple(tensor.shape) != expected[key]:
            raise CheckpointError(
                f"{file}: tensor {key!r} has shape {list(tensor.shape)}; expected {list(expected[key])}"
            )
        state[key] = tensor
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(
            f"{path}: {len(missing)} tensors missing from the checkpoint, e.g. {', '.join(missing[:3])}"
        )
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def verify_checkpoint(path: Path | str, deep: bool = False) -> None:
    """Check the checkpoint's files before loading: sizes (and with deep=True sha256) against the manifest
    `wanbox models pull` wrote in the checkpoint root (this folder or its parent), headers against sizes."""
    from pipeline.weights.hub import MANIFEST, check_files

    path = Path(path)
    files = list(checkpoint_files(path))
    base = path if path.is_dir() else path.parent
    root = base.parent if not (base / MANIFEST).is_file() and (base.parent / MANIFEST).is_file() else base
    problems = check_files(root, [f.relative_to(root).as_posix() for f in files], deep)
    if problems:
        raise CheckpointError(f"{root}: checkpoint files failed verification: " + "; ".join(problems))


def load_dit(
    model_dir: Path | str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu", verify: bool = False
) -> WanDiT:
    """One WanModel expert from a folder with config.json + weights (e.g. CKPT/high_noise_model).
    verify=True checks sizes and sha256 against the pull manifest first (reads every byte once)."""
    model_dir = Path(model_dir)
    if verify:
        verify_checkpoint(model_dir, deep=True)
    config = DiTConfig.from_json(_config_path(model_dir))
    with torch.device("meta"):
        model = WanDiT(config)
    return load_into(model, model_dir, dtype, device)  # type: ignore[return-value]


def load_i2v_experts(
    ckpt_dir: Path | str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu", verify: bool = False
) -> tuple[WanDiT, WanDiT]:
    """(high_noise_model, low_noise_model) of a Wan2.2-I2V-A14B checkpoint directory."""
    ckpt_dir = Path(ckpt_dir)
    high = load_dit(ckpt_dir / "high_noise_model", dtype, device, verify)
    low = load_dit(ckpt_dir / "low_noise_model", dtype, device, verify)
    return high, low


def load_animate_dit(  # noqa: ANN201 - WanAnimateDiT, imported lazily
    ckpt_dir: Path | str,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    lora_path: Path | str | None = None,
    verify: bool = False,
):
    """WanAnimateDiT from the folder holding its config.json and shards (the Animate-14B checkpoint root).

    Widths that config.json does not carry (motion encoder, face encoder, image embedding, number of face
    blocks) are read from the checkpoint's tensor shapes. `lora_path` (e.g. CKPT/relighting_lora.ckpt) is
    merged into the weights after loading (see animate_dit.merge_lora); load again without it to undo.
    verify=True checks sizes and sha256 against the pull manifest first.
    """
    from pipeline.models.animate_dit import AnimateConfig, WanAnimateDiT, merge_lora

    ckpt_dir = Path(ckpt_dir)
    if verify:
        verify_checkpoint(ckpt_dir, deep=True)
    config = AnimateConfig.from_checkpoint(_config_path(ckpt_dir), tensor_shapes(ckpt_dir))
    with torch.device("meta"):
        model = WanAnimateDiT(config)
    load_into(model, ckpt_dir, dtype, device)
    if lora_path is not None:
        try:
            merge_lora(model, load_lora_state(lora_path))
        except ValueError as exc:
            raise CheckpointError(f"{lora_path}: {exc}") from exc
    return model


def load_lora_state(path: Path | str) -> dict[str, Tensor]:
    """A LoRA state dict from `relighting_lora.ckpt` ({'state_dict': ...}) or a PEFT adapter .safetensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: LoRA file not found")
    return load_state_dict_from_dir(path)


def _config_path(model_dir: Path) -> Path:
    config = model_dir / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{config}: model config missing (every released DiT folder has one)")
    return config
