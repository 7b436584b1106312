"""Kernels of our own for a decode step's few rows (``csrc/``), built with the machine's C compiler on
first use and cached; each offered only where it builds and runs here.

- ``bf16_product``: bf16 weights and rows on AVX-512 BF16, a candidate of the kernel tuner.
- ``int8_product``: weights as int8 with a float32 scale per 32 inputs, rows as int16 with a scale
  each (AVX-512 VNNI): the LM head's cheapest screen (1.125 bytes a weight), whose error a bound
  covers (``heads.py``).
- ``q8_product``: the same int8 weights, rows as int8 with a scale per 32 inputs too (AVX-512
  VNNI's four-byte products): half the instructions of ``int8_product`` a weight, for screens of
  many rows, where that one turns compute-bound.
- ``chain_attention``: every request's chain rows attended over its own cache in one call
  (portable C), where torch's attention costs ~60-100 µs a call, once a request and a layer.

Why kernels of our own: oneDNN's bf16 product turns compute-bound at ~5 rows on a 2-core Zen 4,
so a 5-token bf16 verification cost 1.4× a 1-token step (docs/perf.md, stop 26); this one spends
one dot-product instruction per 64 weight bytes a row and stays memory-bound to ~8 rows. Each
row's sum runs in the same order whatever the row count: k rows give exactly what k one-row calls
give (the attention too, whatever the requests beside). The C files have no torch headers, so it builds in about a second; ctypes calls it on the
tensors' memory (float32 sums, one rounding to bf16, as the other bf16 kernels).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

from specdecode.models.machine import cache_dir, cpu_description

SOURCES = (Path(__file__).parent / "csrc" / "row_kernels.c", Path(__file__).parent / "csrc" / "chain_attention.c")
LANES = 16  # outputs per packed block (one 512-bit register of float32 sums)
GROUP_K = 32  # inputs sharing one scale in the int8 layout (as GGUF's Q8_0)


@cache
def source_digest() -> str:
    """Names this version of the kernels (tuned plans that timed them are keyed by it)."""
    if not all(source.is_file() for source in SOURCES):
        return "none"
    return hashlib.sha256(b"".join(source.read_bytes() for source in SOURCES)).hexdigest()[:12]


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where this machine cannot build them (no C compiler, no
    OpenMP); which of them run here says :func:`bf16_available` / :func:`int8_available`."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None or source_digest() == "none":
        return None
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
    key = hashlib.sha256(repr((source_digest(), compiler, flags, cpu_description()["cpu"],
                               cpu_description()["features"])).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"row_kernels-{key}.so"
    if not target.is_file():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", str(built)], check=True,
                               capture_output=True, timeout=120)
                built.replace(target)  # atomic: a concurrent build never loads half a file
        except (OSError, subprocess.SubprocessError) as error:
            print(f"the row kernels did not build ({type(error).__name__}); using the stock kernels",
                  file=sys.stderr)
            return None
    try:
        lib = ctypes.CDLL(str(target))  # links libgomp.so.1, which torch has loaded: one thread pool
    except OSError:
        return None
    pointer, number = ctypes.c_void_p, ctypes.c_int
    lib.bf16_rows.restype = lib.int8_rows.restype = None
    lib.bf16_rows.argtypes = [pointer, pointer, number, number, number, pointer, pointer, number, number]
    lib.int8_rows.argtypes = [pointer, pointer, pointer, pointer, number, number, number, pointer, number]
    lib.q8_rows.restype = None
    lib.q8_rows.argtypes = [pointer, pointer, pointer, pointer, pointer, number, number, number, pointer, number]
    lib.chain_attention.restype = number
    lib.chain_attention.argtypes = [pointer, ctypes.c_int64, ctypes.c_int64, pointer, pointer, pointer, pointer,
                                    pointer, number, number, number, number, number, ctypes.c_float, pointer, number]
    return lib


def bf16_available() -> bool:
    lib = library()
    return lib is not None and bool(lib.bf16_rows_available())


def int8_available() -> bool:
    lib = library()
    return lib is not None and bool(lib.int8_rows_available())


def pack_bf16(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight [N, K]`` (bf16) packed as ``[⌈N/16⌉, K/2, 16, 2]`` (zero rows pad N), or None where
    the kernel cannot take it (not bf16, odd K, no kernel)."""
    out_features, in_features = weight.shape
    if weight.dtype != torch.bfloat16 or in_features % 2 or not bf16_available():
        return None
    padded = -(-out_features // LANES) * LANES
    weight = weight.detach()
    if padded != out_features:
        weight = torch.cat([weight, weight.new_zeros(padded - out_features, in_features)])
    return weight.reshape(padded // LANES, LANES, in_features // 2, 2).permute(0, 2, 1, 3).contiguous()


def bf16_product(rows: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None,
                 out_dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None) -> torch.Tensor:
    """``rows [M, K] @ weightᵀ`` from ``pack_bf16(weight)``: float32 sums (plus ``bias``), returned in
    ``out_dtype`` (bf16: one rounding to nearest even, like the other bf16 kernels), written into
    ``out`` (contiguous ``[M, out_features]``) where given."""
    lib = library()
    assert lib is not None and rows.dim() == 2 and out_dtype in (torch.bfloat16, torch.float32)
    rows = rows.to(torch.bfloat16).contiguous()
    out = _output(out, rows.shape[0], out_features, out_dtype)
    if bias is not None:
        bias = bias.float().contiguous()
    lib.bf16_rows(rows.data_ptr(), packed.data_ptr(), rows.shape[0], rows.shape[1], out_features,
                  None if bias is None else bias.data_ptr(), out.data_ptr(), int(out_dtype == torch.bfloat16),
                  torch.get_num_threads())
    return out


def _output(out: torch.Tensor | None, rows: int, columns: int, dtype: torch.dtype) -> torch.Tensor:
    """``out`` checked to be what a kernel may write ``rows × columns`` of ``dtype`` into, or a new tensor."""
    if out is None:
        return torch.empty(rows, columns, dtype=dtype)
    assert out.shape == (rows, columns) and out.dtype == dtype and out.is_contiguous()
    return out


def _int8_groups(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``values [M, K]`` in groups of 32 inputs (K zero-padded): each group's integers in [-127, 127]
    ``[M, G, 32]`` (as float32) and its float32 scale ``max|v| / 127`` ``[M, G, 1]`` (1 for a zero
    group) — the weights' quantization and q8's rows' alike."""
    count, width = values.shape
    grouped = F.pad(values.float(), (0, -(-width // GROUP_K) * GROUP_K - width)).view(count, -1, GROUP_K)
    scale = grouped.abs().amax(dim=2, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(grouped / scale).clamp_(-127, 127), scale


class Int8Groups:
    """A weight ``[N, K]`` (K even) as int8 with a float32 scale per 32 inputs (``scale = max|w| / 127``
    over the group): ``dequantized()`` is what the kernel multiplies by, exactly (a 7-bit integer
    times a float32 scale), for the screen's error bound. Packed for :func:`int8_product` (``layout
    "pairs"``: ``[N/16][K/2][16][2]``) or for :func:`q8_product` (``"quads"``: K zero-padded to a
    multiple of 32, ``[N/16][K/4][16][4]``, with each group's sum of weights times 128)."""

    def __init__(self, weight: torch.Tensor, layout: str = "pairs") -> None:
        out_features, in_features = weight.shape
        assert in_features % 2 == 0 and layout in ("pairs", "quads")
        self.out_features, self.in_features = out_features, in_features
        padded_k = -(-in_features // GROUP_K) * GROUP_K
        levels, scale = _int8_groups(weight.detach())
        q = levels.to(torch.int8)
        self.q, self.scale = q.view(out_features, padded_k)[:, :in_features], scale.squeeze(2)
        padded_n = -(-out_features // LANES) * LANES
        blocks = padded_n // LANES

        def by_block(per_row: torch.Tensor, value: float = 0) -> torch.Tensor:  # [N, G] -> [N/16][G][16]
            return F.pad(per_row, (0, 0, 0, padded_n - out_features), value=value).view(blocks, LANES, -1).transpose(1, 2).contiguous()

        self.packed_scale = by_block(self.scale, 1.0)
        if layout == "pairs":
            q_rows = F.pad(self.q, (0, 0, 0, padded_n - out_features))
            self.packed_q = q_rows.view(blocks, LANES, in_features // 2, 2).transpose(1, 2).contiguous()
        else:
            q_rows = F.pad(q.view(out_features, padded_k), (0, 0, 0, padded_n - out_features))
            self.packed_q = q_rows.view(blocks, LANES, padded_k // 4, 4).transpose(1, 2).contiguous()
            self.packed_offset = by_block(q.sum(dim=2, dtype=torch.int32) * 128)

    def dequantized(self, rows: slice = slice(None)) -> torch.Tensor:
        """The weight's ``rows`` as the kernel multiplies by them, in float64 (exact)."""
        scale = self.scale[rows].double().repeat_interleave(GROUP_K, dim=1)[:, :self.in_features]
        return self.q[rows].double() * scale


def quantize_groups(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rows [M, K]`` as :func:`q8_product` reads them: int8 with a float32 scale per 32 inputs
    (``max|x| / 127`` over the group), fed as ``xq + 128`` (uint8, K zero-padded to a multiple of 32);
    also the rows as multiplied, ``xq · scale`` in float64 (exact), for the screen's bound."""
    count, in_features = rows.shape
    padded_k = -(-in_features // GROUP_K) * GROUP_K
    xq, scale = _int8_groups(rows)
    rounded = (xq.double() * scale.double()).view(count, padded_k)[:, :in_features]
    return (xq + 128).to(torch.uint8).view(count, padded_k), scale.view(count, -1).contiguous(), rounded


def q8_product(xu: torch.Tensor, xs: torch.Tensor, weight: Int8Groups, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x̃ @ weight.dequantized()ᵀ`` of rows from :func:`quantize_groups` and a ``"quads"`` weight:
    integer sums exact within a group of 32 inputs, float32 across groups; float32 out (into ``out``
    where given)."""
    lib = library()
    assert lib is not None and xu.dtype == torch.uint8 and xu.shape[1] == weight.packed_q.shape[1] * 4
    xu, xs = xu.contiguous(), xs.contiguous()
    out = _output(out, xu.shape[0], weight.out_features, torch.float32)
    lib.q8_rows(xu.data_ptr(), xs.data_ptr(), weight.packed_q.data_ptr(), weight.packed_scale.data_ptr(),
                weight.packed_offset.data_ptr(), xu.shape[0], xu.shape[1], weight.out_features, out.data_ptr(),
                torch.get_num_threads())
    return out


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows [M, K]`` as int16 with one float32 scale a row (``t = max|row| / 32767``): ``xq·t`` is
    the input :func:`int8_product` multiplies, within ``t / 2`` of each value (plus the float32
    division's rounding, ~0.002 t); the screen's bound measures the difference itself."""
    t = rows.abs().amax(dim=1).float() / 32767
    t = torch.where(t > 0, t, torch.ones_like(t))
    return torch.round(rows.float() / t[:, None]).clamp_(-32767, 32767).to(torch.int16), t


def int8_product(xq: torch.Tensor, t: torch.Tensor, weight: Int8Groups, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(xq·t) @ weight.dequantized()ᵀ``: integer sums exact within a group of 32 inputs, float32
    across groups; float32 out (into ``out`` where given)."""
    lib = library()
    assert lib is not None and xq.dim() == 2 and xq.dtype == torch.int16
    xq, t = xq.contiguous(), t.contiguous()
    out = _output(out, xq.shape[0], weight.out_features, torch.float32)
    lib.int8_rows(xq.data_ptr(), t.data_ptr(), weight.packed_q.data_ptr(), weight.packed_scale.data_ptr(),
                  xq.shape[0], xq.shape[1], weight.out_features, out.data_ptr(), torch.get_num_threads())
    return out


def chain_attention_available() -> bool:
    """The attention kernel is portable C: it runs wherever the library builds."""
    return library() is not None


def chain_attention(q: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                    rows: Sequence[int], window: int | None, scale: float) -> torch.Tensor:
    """Every request's chain rows attended over its own cache in one call (``csrc/chain_attention.c``):
    ``q [1, heads, N, d]`` float32 (request after request, ``rows[r]`` each), ``keys[r]`` / ``values[r]``
    ``[1, kv_heads, past_r + rows[r], d]`` float32 views of request r's cache (its new rows already
    stored); row i of request r attends to the keys up to its own position (within ``window`` of it,
    for a sliding layer). Returns ``[1, N, heads·d]``, the layout the output projection reads."""
    lib = library()
    assert lib is not None and q.dtype == torch.float32 and q.stride(-1) == 1
    _, heads, total, head_dim = q.shape
    count = len(keys)
    key_pointers, value_pointers = [], []
    head_strides, pasts = [], []
    for k, v, n in zip(keys, values, rows):  # one pass: this runs once a layer and a step
        stride = k.stride()
        assert k.dtype == v.dtype == torch.float32 and stride[2:] == (head_dim, 1) and stride == v.stride()
        key_pointers.append(k.data_ptr())
        value_pointers.append(v.data_ptr())
        head_strides.append(stride[1])
        pasts.append(k.shape[2] - n)
    out = torch.empty(total, heads, head_dim)
    status = lib.chain_attention(
        q.data_ptr(), q.stride(2), q.stride(1), (ctypes.c_void_p * count)(*key_pointers),
        (ctypes.c_void_p * count)(*value_pointers), (ctypes.c_int64 * count)(*head_strides),
        (ctypes.c_int * count)(*pasts), (ctypes.c_int * count)(*rows), count, heads, keys[0].shape[1], head_dim,
        window or 0, scale, out.data_ptr(), torch.get_num_threads())
    if status:
        raise MemoryError("the attention kernel could not allocate its scores")
    return out.view(1, total, heads * head_dim)
