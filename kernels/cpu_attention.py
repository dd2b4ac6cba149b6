"""The in-place CPU paged attention of ``cpu_attention.cpp``: its build, its loading, its launchers.

The C++ source (``cpu_attention.cpp`` and the ``cpu_attention_simd.h`` it includes) is compiled
once per machine with the system's C++ compiler (``$CXX``, else ``c++``; ``-O3 -march=native
-fopenmp``) against the installed torch into torch's extensions directory
(``$TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions``), in a folder named by a hash of the
sources, the flags, torch's version and the CPU; concurrent processes wait on a file lock there and
then load the same library. No ninja and no Python headers are needed (unlike torch's
``load_inline``): the library registers the torch ops ``pageant_cpu::paged_decode`` and
``pageant_cpu::paged_prefill`` and is loaded with ``torch.ops.load_library``. ``-fopenmp`` matters:
without it ``at::parallel_for`` compiles to a serial loop.

``load()`` builds (or loads) it once per process; when that fails, one warning naming the compiler
error is logged and ``available()`` is False (``pageant.kernels.cpu_ops`` then runs the reference).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import platform
import subprocess
import threading
import time

import torch

logger = logging.getLogger("pageant.kernels")

SOURCE = pathlib.Path(__file__).with_name("cpu_attention.cpp")
SOURCES = (SOURCE, SOURCE.with_name("cpu_attention_simd.h"))  # what the build's hash covers
LIBRARY_FILE = "pageant_cpu_attention.so"
CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn)
QUERY_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# rows (query positions x group) per prefill work item: enough to reuse each K/V tile, few enough
# that the item's accumulators stay in L1/L2
PREFILL_ROWS_PER_ITEM = 64


class _State:
    """What ``load()`` found: the ops namespace, or the error; how long the build or load took."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tried = False
        self.ops = None
        self.error: str | None = None
        self.seconds = 0.0
        self.compiled = False  # this process ran the compiler (a cold build), not just loaded the library
        self.path: pathlib.Path | None = None


_STATE = _State()


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _cpu_signature() -> str:
    """The CPU model and feature flags (the library is built with ``-march=native``)."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(sorted(set(keep)))


def compile_command(output: pathlib.Path, native: bool = True) -> list[str]:
    """The compiler command line that builds ``SOURCE`` into ``output``."""
    from torch.utils import cpp_extension

    std = "-std=c++20" if _torch_version() >= (2, 10) else "-std=c++17"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [os.environ.get("CXX") or "c++", str(SOURCE), "-o", str(output), "-shared", "-fPIC", "-O3", std,
           "-fopenmp", "-fno-math-errno", "-DNDEBUG", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    if native:
        cmd.append("-march=native")
    cmd += [f"-isystem{path}" for path in cpp_extension.include_paths()]
    for path in cpp_extension.library_paths():
        cmd += [f"-L{path}", f"-Wl,-rpath,{path}"]
    return cmd + ["-lc10", "-ltorch_cpu"]


def build_directory() -> pathlib.Path:
    """Where this source, these flags, this torch and this CPU's library lives."""
    from torch.utils import cpp_extension

    key = hashlib.sha256()
    parts = [path.read_bytes() for path in SOURCES]
    parts += [" ".join(compile_command(pathlib.Path("x"))).encode(), torch.__version__.encode(),
              platform.machine().encode(), _cpu_signature().encode()]
    for part in parts:
        key.update(part)
        key.update(b"\0")
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()  # as torch's own
    return pathlib.Path(root) / f"pageant_cpu_attention_{key.hexdigest()[:16]}"


def _compiler_error(output: str) -> str:
    """The first ``error`` line of the compiler's output (else its last line), for the warning."""
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["(no output)"])[0].strip()


def _build(directory: pathlib.Path) -> pathlib.Path:
    """The library in ``directory``, compiled first unless it is there (under a file lock)."""
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / LIBRARY_FILE
    with open(directory / "lock", "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (or the process dies)
        except ImportError:  # no POSIX locks: a concurrent build only repeats the work (atomic rename)
            pass
        if library.exists():
            return library
        partial = directory / f"{LIBRARY_FILE}.{os.getpid()}.tmp"
        failures = []
        for native in (True, False):  # a compiler without -march=native gets a second try without it
            try:
                proc = subprocess.run(compile_command(partial, native), capture_output=True, text=True, timeout=600)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise RuntimeError(f"could not run the C++ compiler: {exc}") from exc
            if proc.returncode == 0:
                os.replace(partial, library)
                _STATE.compiled = True
                return library
            failures.append(proc.stderr + proc.stdout)
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"C++ compilation of {SOURCE.name} failed: {_compiler_error(failures[-1])}")


def load():
    """The ``torch.ops.pageant_cpu`` namespace, building the library first if needed; None when the
    build or the load failed (logged once as a warning)."""
    state = _STATE
    if state.tried:
        return state.ops
    with state.lock:
        if not state.tried:
            start = time.perf_counter()
            try:
                state.path = _build(build_directory())
                torch.ops.load_library(str(state.path))
                state.ops = torch.ops.pageant_cpu
            except Exception as exc:  # any failure: the CPU path stays on the reference kernels
                state.error = f"{type(exc).__name__}: {exc}"
                logger.warning("in-place CPU paged attention unavailable, using the reference kernels (%s)",
                               state.error)
            state.seconds = time.perf_counter() - start
            state.tried = True
    return state.ops


def available() -> bool:
    """Whether the in-place kernels are built and loaded (``load()`` first)."""
    return load() is not None


def build_info() -> dict:
    """``load()``'s outcome: available, error, seconds, compiled (a cold build), path."""
    load()
    return {"available": _STATE.ops is not None, "error": _STATE.error, "seconds": _STATE.seconds,
            "compiled": _STATE.compiled, "path": None if _STATE.path is None else str(_STATE.path)}


def supports(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *index: torch.Tensor) -> bool:
    """Whether these tensors can go to the in-place kernels (else the reference runs): all on the
    CPU, supported dtypes and ranks, contiguous head_dim, no autograd, and the library loaded."""
    tensors = (query, k_cache, v_cache, *index)
    if any(t.device.type != "cpu" for t in tensors):
        return False
    if query.dtype not in QUERY_DTYPES or k_cache.dtype not in CACHE_DTYPES or v_cache.dtype != k_cache.dtype:
        return False
    if query.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape or query.shape[2] != k_cache.shape[3]:
        return False
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1 or query.shape[1] % k_cache.shape[2]:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return load() is not None


def _int32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int32 and t.is_contiguous() else t.to(torch.int32).contiguous()


def _scale_value(cache: torch.Tensor, scale: torch.Tensor | None) -> float:
    """An FP8 cache's dequantization scale as a float (1.0 for None and for other caches)."""
    return float(scale) if scale is not None and cache.dtype == torch.float8_e4m3fn else 1.0


def _query(query: torch.Tensor) -> torch.Tensor:
    return query if query.stride(2) == 1 else query.contiguous()


def _tables(block_tables: torch.Tensor) -> torch.Tensor:  # any strides (column slices are fine)
    return block_tables if block_tables.dtype == torch.int32 else block_tables.to(torch.int32)


def decode(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_num_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    sliding_window: int | None,
    logits_soft_cap: float | None,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """``pageant_cpu::paged_decode`` on tensors that ``supports`` accepted (options already checked)."""
    out = torch.empty(query.shape, dtype=query.dtype)  # [num_seqs, num_heads, head_dim]
    load().paged_decode(out, _query(query), k_cache, v_cache, _tables(block_tables), _int32(seq_lens), float(scale),
                        sliding_window or 0, logits_soft_cap or 0.0, _scale_value(k_cache, k_scale),
                        _scale_value(v_cache, v_scale))
    return out


def prefill(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_num_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    sliding_window: int | None,
    logits_soft_cap: float | None,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    rows_per_item: int = PREFILL_ROWS_PER_ITEM,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """``pageant_cpu::paged_prefill`` on tensors that ``supports`` accepted (options already checked);
    ``rows_per_item``: query rows (positions x group) per work item."""
    out = torch.empty(query.shape, dtype=query.dtype)  # [num_tokens, num_heads, head_dim]
    load().paged_prefill(out, _query(query), k_cache, v_cache, _tables(block_tables), _int32(query_start_loc),
                         _int32(seq_lens), float(scale), sliding_window or 0, logits_soft_cap or 0.0,
                         _scale_value(k_cache, k_scale), _scale_value(v_cache, v_scale), rows_per_item)
    return out
