"""A bf16 product for a few rows on AVX-512 BF16 (``csrc/bf16_rows.c``), built with the machine's C
compiler on first use and cached; offered to the kernel tuner only where it builds and runs.

Why a kernel of our own: oneDNN's bf16 product turns compute-bound at ~5 rows on a 2-core Zen 4,
so a 5-token bf16 verification cost 1.4× a 1-token step (docs/perf.md, stop 26); this one spends
one dot-product instruction per 64 weight bytes a row and stays memory-bound to ~8 rows. Each
row's sum runs in the same order whatever the row count: k rows give exactly what k one-row calls
give. The C file is ~100 lines with no torch headers, so it builds in about a second; ctypes calls
it on the tensors' memory (float32 sums, one rounding to bf16, as the other bf16 kernels).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "bf16_rows.c"
LANES = 16  # outputs per packed block (one 512-bit register of float32 sums)


def _build_dir() -> Path:
    from specdecode.models.loading import cache_dir  # loading imports this module's users, not this module
    return cache_dir() / "kernels"


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where this machine cannot build or run it (no C compiler, no
    AVX-512 BF16, no OpenMP): the tuner then never offers it."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None or not SOURCE.is_file():
        return None
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
    from specdecode.models.kernels import cpu_description
    key = hashlib.sha256(repr((SOURCE.read_bytes(), compiler, flags, cpu_description()["cpu"],
                               cpu_description()["features"])).encode()).hexdigest()[:16]
    target = _build_dir() / f"bf16_rows-{key}.so"
    if not target.is_file():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built)], check=True,
                               capture_output=True, timeout=120)
                built.replace(target)  # atomic: a concurrent build never loads half a file
        except (OSError, subprocess.SubprocessError) as error:
            print(f"the bf16 row kernel did not build ({type(error).__name__}); using the stock kernels",
                  file=sys.stderr)
            return None
    try:
        lib = ctypes.CDLL(str(target))  # links libgomp.so.1, which torch has loaded: one thread pool
    except OSError:
        return None
    if not lib.bf16_rows_available():
        return None
    lib.bf16_rows.restype = None
    lib.bf16_rows.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    return lib


def available() -> bool:
    return library() is not None


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight [N, K]`` (bf16) packed as ``[⌈N/16⌉, K/2, 16, 2]`` (zero rows pad N), or None where
    the kernel cannot take it (not bf16, odd K, no kernel)."""
    out_features, in_features = weight.shape
    if weight.dtype != torch.bfloat16 or in_features % 2 or not available():
        return None
    padded = -(-out_features // LANES) * LANES
    weight = weight.detach()
    if padded != out_features:
        weight = torch.cat([weight, weight.new_zeros(padded - out_features, in_features)])
    return weight.reshape(padded // LANES, LANES, in_features // 2, 2).permute(0, 2, 1, 3).contiguous()


def product(rows: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None,
            out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``rows [M, K] @ weightᵀ`` from ``pack(weight)``: float32 sums (plus ``bias``), returned in
    ``out_dtype`` (bf16: one rounding to nearest even, like the other bf16 kernels)."""
    lib = library()
    assert lib is not None and rows.dim() == 2
    rows = rows.to(torch.bfloat16).contiguous()
    out = torch.empty(rows.shape[0], out_features, dtype=out_dtype)
    if bias is not None:
        bias = bias.float().contiguous()
    lib.bf16_rows(rows.data_ptr(), packed.data_ptr(), rows.shape[0], rows.shape[1], out_features,
                  None if bias is None else bias.data_ptr(), out.data_ptr(), int(out_dtype == torch.bfloat16),
                  torch.get_num_threads())
    return out
