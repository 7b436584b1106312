"""What this machine is, and where its one-time work is kept: the CPU and the features kernel
choices depend on (recorded in every plan key and result), and the cache directory for converted
models, tuned plans and built kernels. Low in the tree: the runtime and its kernels read it,
nothing here reads them."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cache_dir() -> Path:
    """Where converted models live: ``$SPECDECODE_CACHE`` or ``~/.cache/specdecode``."""
    return Path(os.environ.get("SPECDECODE_CACHE", Path.home() / ".cache" / "specdecode"))


def cpu_description() -> dict[str, object]:
    """The CPU model and the instruction-set features the kernel choice depends on."""
    name, flags = "", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not name:
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {"cpu": name or platform.processor() or platform.machine(),
            "features": [f for f in wanted if f in flags],
            "native_bf16": bool({"avx512_bf16", "amx_bf16"} & flags), "threads": torch.get_num_threads()}
