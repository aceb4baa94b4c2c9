"""Repacked GGUF layers kept on disk, so that later loads of the same file skip the repack.

A GGUF file's blocks are decoded and packed into ondo's int4 planes as they load
(`GGUFLinearMethod`): on a 2-core machine about half of the built-in model's ~1 s load. The packed
tensors of every layer are saved once, in one safetensors file under `$ONDO_CACHE_DIR` (default
`~/.cache/ondo`, beside the converted tokenizers), and later loads read them back instead.

The file's name holds three SHA-256 digests: of the layout packed (the run dtype, the CPU's tile, the
tensor-parallel rank and size, since each rank packs its own shard), of the GGUF file's identity (size,
modification time, the digest of its metadata, the table of its tensors) and of the code that packs it
(the torch version and the source of the packing code itself, so a change to the packing can never
read an older file's bytes). A file written replaces the others of the same file name and layout: a
file rewritten in place, the same model installed anew (a fresh virtual environment copies the GGUF
with a new modification time) or an upgrade of ondo leaves no stale copy behind, so the cache holds
one file per model name and layout (two models of one file name, or two installs of different
versions sharing one cache, repack in turn).
Inside, each layer is checked against what it staged (its parts' rows, types and shapes) before its
tensors are taken; a file that cannot be read, or that disagrees, is ignored and rewritten. A cache
that cannot be written is skipped.
`ONDO_REPACK_CACHE=0` turns it off. It holds the CPU layout (torch's int4 tiles) and serves CPU runs
only: GPU loads are not measured or tested with it.

The built-in model on this 2-core machine: LLM() 1.2 s and 393 MB peak RSS the first time (the file
written: 102 MB), then 0.49-0.51 s and 356 MB.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import re
from pathlib import Path

import torch

from ondo.layers import cpu_kernels
from ondo.layers.quantization.int4_planes import cpu_tile_rows
from ondo.loader.gguf_tokenizer import cache_root

logger = logging.getLogger(__name__)

_ATTRIBUTES = ("planes", "group", "padded16", "k_eff", "digits", "codes_layout")
_TENSORS = ("qweight", "scales_and_zeros")


def packing_sources_digest() -> str:
    """SHA-256 of the modules whose code decides the packed bytes."""
    from ondo.layers.quantization import gguf_blocks, int4_gpu, int4_planes

    digest = hashlib.sha256()
    for module in (gguf_blocks, int4_planes, int4_gpu):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


class RepackCache:
    """The packed layers of one (file, dtype, rank): those read from disk, and those packed this load."""

    def __init__(self, path: Path):
        self.path = path
        self.stored = self._read()             # ordinal -> (signature, tensors, attributes)
        self.packed: dict[int, tuple] = {}
        self.ordinal = 0
        self.repacked_any = False              # a layer the file did not hold (or held otherwise)

    @classmethod
    def for_file(cls, gguf_path: Path, file_fingerprint: str, dtype: torch.dtype) -> "RepackCache":
        from ondo.distributed.parallel_state import tp_rank, tp_size

        # The tile is the CPU's (AVX512 or AVX2): a cache shared by two machines keeps one file each. 8-bit
        # digits are code bytes, other tiles row pairs, where ondo's kernel reads them (int4_planes.CodesLayout).
        layout = repr((str(dtype), "cpu", cpu_tile_rows(), tp_rank(), tp_size(), cpu_kernels.int4_reads_code_bytes()))
        code = repr((torch.__version__, packing_sources_digest()))
        name = f"{gguf_path.stem[:60]}-{_digest(layout)}-{_digest(file_fingerprint)}-{_digest(code)}.safetensors"
        return cls(cache_root() / "gguf-repacked" / name)

    def take(self, layer, signature: list) -> bool:
        """Fill `layer` from the file if it holds this layer: the same ordinal (layers pack in model
        order) and the same `signature` (each staged part's rows, ggml type and shape)."""
        ordinal, self.ordinal = self.ordinal, self.ordinal + 1
        entry = self.stored.get(ordinal)
        if entry is None or entry[0] != signature:
            return False
        _, tensors, attributes = entry
        for name in _TENSORS:
            layer.register_buffer(name, tensors[name].to(layer.run_device), persistent=False)
        for name in _ATTRIBUTES:
            setattr(layer, name, attributes[name])
        self.packed[ordinal] = entry
        return True

    def add(self, layer, signature: list) -> None:
        """Record a layer this load packed (its ordinal is the one `take` just declined)."""
        tensors = {name: getattr(layer, name) for name in _TENSORS}
        self.repacked_any = True
        self.packed[self.ordinal - 1] = (signature, tensors, {name: getattr(layer, name) for name in _ATTRIBUTES})

    def save(self) -> None:
        """Write the file when this load packed anything the file did not hold: into a temporary file
        renamed into place, so a reader never sees half of it."""
        if not self.repacked_any:
            return
        from safetensors.torch import save_file

        staging = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tensors = {f"{ordinal}.{name}": tensor.detach().to("cpu").contiguous()
                       for ordinal, (_, layer_tensors, _) in self.packed.items() for name, tensor in layer_tensors.items()}
            layers = {str(ordinal): {"signature": signature, **attributes}
                      for ordinal, (signature, _, attributes) in self.packed.items()}
            save_file(tensors, str(staging), metadata={"layers": json.dumps(layers)})
            os.replace(staging, self.path)
            self._remove_superseded()
        except Exception as error:   # a read-only home, a full disk: run without the cache
            logger.debug("repack cache %s not written: %s", self.path, error)
        finally:
            with contextlib.suppress(OSError):
                staging.unlink(missing_ok=True)

    def _remove_superseded(self) -> None:
        """Remove the other files of this file name and layout (another version of the GGUF file or of the
        packing code: some 100 MB to GBs each), and those named as before names had three digests. A
        process still reading one keeps its mapping: unlinking does not take it away."""
        stem, layout, _, _ = self.path.name.removesuffix(".safetensors").rsplit("-", 3)
        for other in self.path.parent.glob(f"{glob.escape(stem)}-*.safetensors"):
            rest = other.name.removesuffix(".safetensors")[len(stem) + 1:]
            superseded = rest.startswith(f"{layout}-") or re.fullmatch(r"[0-9a-f]{32}|[0-9a-f]{16}-[0-9a-f]{16}", rest)
            if superseded and other != self.path:
                with contextlib.suppress(OSError):
                    other.unlink()

    def _read(self) -> dict[int, tuple]:
        if not self.path.is_file():
            return {}
        try:
            from safetensors import safe_open

            with safe_open(str(self.path), framework="pt") as file:
                layers = json.loads(file.metadata()["layers"])
                stored = {}
                for ordinal, entry in layers.items():
                    tensors = {name: file.get_tensor(f"{ordinal}.{name}") for name in _TENSORS}
                    attributes = {name: entry[name] for name in _ATTRIBUTES}
                    stored[int(ordinal)] = (entry["signature"], tensors, attributes)
                return stored
        except Exception as error:   # a damaged file: pack again (and overwrite it)
            logger.debug("repack cache %s unreadable (%s): packing again", self.path, error)
            return {}


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def enabled() -> bool:
    return os.environ.get("ONDO_REPACK_CACHE", "1") != "0"
