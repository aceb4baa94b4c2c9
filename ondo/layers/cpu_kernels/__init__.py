"""ondo's CPU kernels: RMSNorm with the residual add, the gated activations, rotary embedding, the KV-cache
write and decode attention over the paged cache, each one call on the CPU (kernels.c); the products of a
few rows with int4 planes (int4_mm.c).

Why: a decode step of a small model on a CPU spends most of its time outside the matrix products, in
tensor ops of a few microseconds each (about 40 per layer). These kernels do a layer's non-matrix work
in five calls, in float32 with the roundings of the torch code they replace (norm.py, activation.py,
rotary.py, attention/torch_backend.py), which stays the reference and the fallback.

The C files are compiled at first use with the system's C compiler (`$CC`, else `cc`) for this CPU
(-march=native) into one library, cached under `$ONDO_CACHE_DIR/cpu_kernels`, keyed by the sources,
the compiler and the CPU. Without a compiler (or with ONDO_CPU_KERNELS=0) every caller keeps its torch path.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from ondo.layers.fused import rows_of

logger = logging.getLogger("ondo")

_HERE = Path(__file__).parent
_SOURCES = [_HERE / "kernels.c", _HERE / "int4_mm.c", _HERE / "decoder_stack.c"]
_HEADERS = [_HERE / "common.h", _HERE / "int4_mm.h", _HERE / "kernels.h"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1}   # the kernels' code for each dtype they read
KV_DTYPES = {**DTYPES, torch.float16: 2}          # and for a KV cache's (kv_cache_dtype)
# int4 scales, the same codes: (scale, zero) pairs in the run dtype, or float16 (scale, zero - 8 scale)
# pairs (int4_planes.compact_cpu_scales)
SCALE_DTYPES = KV_DTYPES
_I64, _F32, _PTR, _INT = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {
    "ondo_rms_norm": [_INT, _PTR, _PTR, _PTR, _PTR, _PTR, _INT, _I64, _I64, _I64, _I64, _I64, _I64, _F32, _F32],
    "ondo_gated": [_INT, _INT, _PTR, _PTR, _I64, _I64, _I64, _I64, _INT],
    "ondo_rotary": [_INT, _PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _PTR, _I64],
    "ondo_write_kv": [_INT, _INT, _PTR, _I64, _PTR, _PTR, _I64, _I64, _I64, _I64, _PTR],
    "ondo_decode_attention": [_INT, _INT, _PTR, _I64, _PTR, _I64, _PTR, _I64, _PTR, _I64, _PTR, _I64, _I64,
                              _I64, _I64, _I64, _F32, _I64, _F32, _INT],
    "ondo_int4_mm": [_INT, _PTR, _I64, _I64, _PTR, _PTR, _PTR, _I64, _INT],
    "ondo_int4_rows": [_INT, _PTR, _PTR, _I64, _PTR],
    "ondo_int4_rounds_activations": [],
    "ondo_int4_reads_code_bytes": [],
    "ondo_llama_decode": [_INT, _PTR, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _INT],
}
# -ffp-contract=off: a product and the sum after it round apart, as torch's ops round them.
# -fno-math-errno: libm calls without errno bookkeeping (expf, tanhf give the same values).
# -fopenmp: the threads of int4_mm.c and decode attention. The library then needs libgomp.so.1, which torch
# has already loaded (its CPU wheels carry their own under that name), so both share one thread pool; a
# compiler without OpenMP builds it without (-fopenmp-simd: the simd pragmas only, one thread).
_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC", "-std=gnu11"]
_OPENMP_FLAGS = (["-fopenmp"], ["-fopenmp-simd"])
_lib: ctypes.CDLL | None = None
_tried = False
_enabled = True


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on the first call; None where they cannot be (no compiler, disabled)."""
    global _lib, _tried
    if not _tried:
        _tried = True
        if os.environ.get("ONDO_CPU_KERNELS", "1") != "0":
            _lib = _load()
    return _lib


def usable_for(dtype: torch.dtype) -> bool:
    """Whether the kernels are built and enabled for CPU tensors of `dtype`."""
    return dtype in DTYPES and (_lib if _tried else library()) is not None and _enabled


def usable(x: torch.Tensor) -> bool:
    """Whether x's op may run here: a CPU tensor of a dtype the kernels read, with the library built."""
    return x.is_cpu and x.dtype in DTYPES and (_lib if _tried else library()) is not None and _enabled


@contextmanager
def disabled():
    """Every caller takes its torch path inside (the reference the tests compare the kernels with)."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


def _load(target_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The library built for this CPU; `target_flags` (e.g. "-mno-avx512f") build a variant for the
    tests, which check every instruction-set path of the kernels on one machine."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning("ondo: no C compiler (cc): the CPU runs its layers on torch ops, slower for small "
                       "models; install gcc to get ondo's CPU kernels")
        return None
    path = _cache_dir() / f"kernels-{_build_key(compiler, [*_FLAGS, *_OPENMP_FLAGS[0], *target_flags])}.so"
    if not path.exists():
        try:
            _compile(compiler, path, list(target_flags))
        except (OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", "") or error
            logger.warning("ondo: compiling the CPU kernels failed (%s); the CPU keeps its torch ops", detail)
            return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as error:   # a cache on a noexec mount, a file cut short outside ondo
        logger.warning("ondo: loading the CPU kernels from %s failed (%s); the CPU keeps its torch ops", path, error)
        return None
    for name, argtypes in _SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, None
    lib.ondo_int4_rounds_activations.restype = _INT
    lib.ondo_int4_reads_code_bytes.restype = _INT
    lib.ondo_int4_rows.restype = _INT
    return lib


def _cache_dir() -> Path:
    from ondo.loader.gguf_tokenizer import cache_root

    return cache_root() / "cpu_kernels"


def _build_key(compiler: str, flags: list[str]) -> str:
    """The source, the compiler, its flags and the CPU (its model and flags: -march=native depends on them)."""
    digest = hashlib.sha256()
    for source in _SOURCES + _HEADERS:
        digest.update(source.read_bytes())
    digest.update(f"{os.path.realpath(compiler)}|{' '.join(flags)}|{platform.machine()}".encode())
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags", "Features")):
                digest.update(line.encode())
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        digest.update(platform.processor().encode())
    return digest.hexdigest()[:16]


def _compile(compiler: str, path: Path, target_flags: list[str]) -> None:
    """Builds into a temporary file beside `path`, then renames it: concurrent processes never load half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    base = [*_FLAGS, *map(str, _SOURCES), "-o", tmp, "-lm"]
    # Best first: for this CPU with threads; a compiler without -march=native or OpenMP gets portable or
    # single-threaded code, still one call per op.
    attempts = [[compiler, *arch, *target_flags, *openmp, *base] for arch in (["-march=native"], [])
                for openmp in _OPENMP_FLAGS]
    try:
        for i, command in enumerate(attempts):
            try:
                subprocess.run(command, check=True, capture_output=True, text=True)
                break
            except subprocess.CalledProcessError:
                if i == len(attempts) - 1:
                    raise
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# The wrappers below are on the decode step's critical path (a few per layer): each Python step they skip
# is a microsecond or more on a small CPU, hence empty_like over torch.empty(shape) and no view of a 2-D x.

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             offset: float = 0.0):
    """As `ondo.layers.fused.rms_norm`: normed, or (normed, x + residual) with a residual. weight dense."""
    x2d = rows_of(x)
    out = torch.empty_like(x2d)
    if residual is None:
        _lib.ondo_rms_norm(DTYPES[x.dtype], x2d.data_ptr(), None, out.data_ptr(), None, weight.data_ptr(),
                           DTYPES[weight.dtype], x2d.shape[0], x2d.shape[1], x2d.stride(0), 0, out.stride(0), 0,
                           eps, offset)
        return out if out.shape == x.shape else out.view(x.shape)
    res2d, res_out = rows_of(residual), torch.empty_like(out)
    _lib.ondo_rms_norm(DTYPES[x.dtype], x2d.data_ptr(), res2d.data_ptr(), out.data_ptr(), res_out.data_ptr(),
                       weight.data_ptr(), DTYPES[weight.dtype], x2d.shape[0], x2d.shape[1], x2d.stride(0),
                       res2d.stride(0), out.stride(0), res_out.stride(0), eps, offset)
    if out.shape == x.shape:
        return out, res_out
    return out.view(x.shape), res_out.view(x.shape)


def gated(x: torch.Tensor, gelu_tanh: bool) -> torch.Tensor:
    """[..., 2 * I] = [gate | up] -> act(gate) * up [..., I]: silu, or gelu_tanh."""
    x2d = rows_of(x)
    rows, inter = x2d.shape[0], x2d.shape[1] // 2
    out = x2d.new_empty((rows, inter))
    _lib.ondo_gated(DTYPES[x.dtype], int(gelu_tanh), x2d.data_ptr(), out.data_ptr(), rows, inter, x2d.stride(0),
                    inter, torch.get_num_threads())
    return out if x.dim() == 2 else out.view(*x.shape[:-1], inter)


def rotary_(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, head_dim: int) -> None:
    """In place on x [T, heads * head_dim] (rows may be strided, each row dense), from `rotation_tables`
    (cos / signed_sin [T, 1, 2, half], dense)."""
    half = cos.shape[-1]
    _lib.ondo_rotary(DTYPES[x.dtype], x.data_ptr(), x.shape[0], x.stride(0), x.shape[1] // head_dim, head_dim,
                     half, cos.data_ptr(), signed_sin.data_ptr(), 2 * half)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k / v [T, KVH, D] (each token's heads dense) into their slots of kv_cache [2, blocks, block_size, KVH, D]
    (of any KV_DTYPES: rounded to it as .to() rounds)."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    _lib.ondo_write_kv(DTYPES[k.dtype], KV_DTYPES[kv_cache.dtype], kv_cache.data_ptr(), num_blocks * block_size,
                       k.data_ptr(), v.data_ptr(), k.shape[0], num_kv_heads * head_dim, k.stride(0), v.stride(0),
                       slot_mapping.data_ptr())


def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                     scale: float, sliding_window: int | None, logit_softcap: float | None) -> torch.Tensor:
    """q [S, H, D] (one query per sequence) -> [S, H, D] over each sequence's cached keys."""
    num_seqs, num_heads, head_dim = q.shape
    _, num_blocks, block_size, num_kv_heads, _ = kv_cache.shape
    out = torch.empty_like(q)
    _lib.ondo_decode_attention(
        DTYPES[q.dtype], KV_DTYPES[kv_cache.dtype], q.data_ptr(), q.stride(0), out.data_ptr(), out.stride(0), kv_cache.data_ptr(),
        num_blocks * block_size, block_tables.data_ptr(), block_tables.stride(0), seq_lens.data_ptr(), num_seqs,
        num_heads, num_kv_heads, head_dim, block_size, scale, sliding_window or 0, logit_softcap or 0.0,
        torch.get_num_threads())
    return out


class Int4Weight(ctypes.Structure):
    """`ondo_int4_weight` (int4_mm.h): where an int4-planes layer's CPU storage is and how it is cut."""
    _fields_ = [("qweight", _PTR), ("sz", _PTR), ("k_in", _I64), ("planes", _I64), ("group", _I64),
                ("n_pad", _I64), ("n_out", _I64), ("tile", _I64), ("sz_dtype", ctypes.c_int32),
                ("padded16", ctypes.c_int32), ("digits", ctypes.c_int32), ("layout", ctypes.c_int32),
                ("sz_blocks", ctypes.c_int32)]


def int4_weight(layer) -> Int4Weight:
    """The layer's `Int4Weight`, built once (and again should its storage move)."""
    built = layer.__dict__.get("cpu_int4_weight")
    if built is None or built.qweight != layer.qweight.data_ptr():
        sz = layer.scales_and_zeros
        built = layer.cpu_int4_weight = Int4Weight(
            layer.qweight.data_ptr(), sz.data_ptr(), layer.in_features, layer.planes, layer.group,
            layer.qweight.shape[0], layer.out_features, layer.cpu_tile, SCALE_DTYPES[sz.dtype], int(layer.padded16),
            int(getattr(layer, "digits", False)), int(getattr(layer, "codes_layout", 0)), int(sz.dim() == 4))
    return built


def int4_mm(x: torch.Tensor, layer, bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, in] times an int4-planes layer's weight (int4_planes.py, the CPU tile layout of `layer.cpu_tile`
    rows) -> [T, out] in x's dtype, + bias. x's rows dense; scales and zeros in float32 or bfloat16."""
    if x.stride(1) != 1:
        x = x.contiguous()
    out = x.new_empty((x.shape[0], layer.out_features))
    _lib.ondo_int4_mm(DTYPES[x.dtype], x.data_ptr(), x.shape[0], x.stride(0), ctypes.byref(int4_weight(layer)),
                      None if bias is None else bias.data_ptr(), out.data_ptr(), layer.out_features,
                      torch.get_num_threads())
    return out


def int4_rows(layer, token_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `token_ids` [T] of an int4-planes layer's weight, dequantized -> [T, in] in `dtype` (an embedding
    lookup), the numbers of `Int4PlanesMethod._rows`."""
    ids = token_ids.to(torch.int64).contiguous()
    out = torch.empty(ids.shape[0], layer.in_features, dtype=dtype)
    if _lib.ondo_int4_rows(DTYPES[dtype], ctypes.byref(int4_weight(layer)), ids.data_ptr(), ids.shape[0], out.data_ptr()):
        raise IndexError(f"token ids must be in [0, {layer.out_features}), got {ids.min().item()}..{ids.max().item()}")
    return out


def int4_rounds_activations() -> bool:
    """Whether int4_mm rounds each group of activations to 16-bit integers first (int4_mm.c: ROUNDED_X,
    CPUs with AVX512 byte permutes, and AVX2 ones without AVX512); else, or where the kernels are not built,
    it multiplies them as they are."""
    lib = library()
    return lib is not None and bool(lib.ondo_int4_rounds_activations())


def int4_reads_code_bytes() -> bool:
    """Whether int4_mm reads tiles stored in the orders of `int4_planes.CodesLayout` (int4_mm.c: CODE_BYTES,
    ROW_PAIRS; AVX2 CPUs without AVX512)."""
    lib = library()
    return lib is not None and bool(lib.ondo_int4_reads_code_bytes())


def attention_inputs_fit(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                         seq_lens: torch.Tensor) -> bool:
    """Whether decode_attention reads these as they are: dense heads, a contiguous cache, int32 tables."""
    return q.stride(2) == 1 and q.stride(1) == q.shape[2] and cache_inputs_fit(q, kv_cache, block_tables, seq_lens)


def cache_inputs_fit(x: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor) -> bool:
    """The part of `attention_inputs_fit` that does not depend on the queries' layout."""
    return (usable(x) and kv_cache.dtype in KV_DTYPES and kv_cache.is_contiguous() and block_tables.dtype == torch.int32
            and block_tables.stride(1) == 1 and seq_lens.dtype == torch.int32 and seq_lens.is_contiguous()
            and seq_lens.is_cpu and block_tables.is_cpu)
