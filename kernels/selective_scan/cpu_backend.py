"""Compiled CPU selective-scan backend (the default on CPU where a C compiler is available).

Implements the backend contract of ``vim2_kernels.selective_scan`` (see ``interface.py``) with the C
kernels in ``csrc/selective_scan_cpu.c`` (algorithm and numerics are described there); the same library
holds ViM2's fused channel mixer (``csrc/channel_mixer_cpu.c``, used by ``vim2_kernels.channel_mixer``). The source is
plain C99 with no Python or torch headers: on first use it is compiled by the machine's C compiler
(``$CC``, else ``cc``/``gcc``/``clang``) with ``-O3 -march=native`` and OpenMP where the compiler
supports them, in well under a second, and cached in ``$VIM2_KERNELS_CACHE`` (default
``~/.cache/vim2_kernels``) under a name that hashes the source, the compiler, its flags and the CPU.
The library is loaded with ``ctypes``, which releases the GIL during the call.

Why not a prebuilt extension: a wheel cannot be built for ``-march=native``, and the scan is
compute-bound on the exponentials, whose vectorisation needs the local instruction set (16 float32
lanes on AVX-512). Why not numba: its LLVM does not vectorise ``exp`` without Intel's SVML, which
made a numba version 9x slower than this one (measured, see docs/kernels.md). Where no compiler
works (e.g. a bare Windows machine), ``unavailable_reason`` names the problem and ``auto`` falls back
to the pure-PyTorch backend with one warning.

Inputs in float16/bfloat16 are converted to float32 once (the state is float32 anyway); float64 is not
supported (the ``torch`` backend serves it; ``auto`` sends float64 there without a warning).
Threads: ``torch.get_num_threads()``.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from functools import lru_cache
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import Tensor

_log = logging.getLogger(__name__)

NAME = "cpu"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CACHE_ENV_VAR = "VIM2_KERNELS_CACHE"
# Steps between the states saved for backward (its recompute buffer is (N + 3) * CHUNK_SIZE * LANES floats
# per tile: states, and the chunk's step sizes, dt * u and softplus derivatives).
CHUNK_SIZE = 128
# Largest state size N (MAX_STATE in the C source: fixed-size per-tile arrays); dispatch checks it.
MAX_D_STATE = 64
MAX_DT_RANK = 64  # largest rank of the fused low-rank Δ (MAX_DT_RANK in csrc/selective_scan_cpu.c)
# Outputs and input gradients come back in their input's layout (e.g. token-major): the fake kernels
# of the custom ops must say so (interface.py).
PRESERVES_LAYOUT = True
# scan_backward takes du_out / accumulate_du / ddelta_out (ddelta_out may alias delta): the cross-scan's
# backward reuses one du and one Δ/dΔ buffer for all routes instead of three fresh maps per route.
BACKWARD_INTO = True

_CSRC = Path(__file__).with_name("csrc")
# One library from all sources: the generic scan and ViM2's fused channel mixer (channel_mixer_cpu.c).
_SOURCES = (_CSRC / "selective_scan_cpu.c", _CSRC / "channel_mixer_cpu.c")
_HEADERS = (_CSRC / "simd_math.h",)
_BASE_FLAGS = ["-O3", "-std=c99", "-fPIC", "-shared", "-ffp-contract=fast", "-fno-math-errno", "-fno-trapping-math",
               "-fno-signed-zeros",
               "-ffinite-math-only"]
# Tried in order; the first set that compiles is used (OpenMP and -march=native are optional).
_FLAG_SETS = (
    ["-march=native", "-fopenmp"],
    ["-march=native"],
    ["-fopenmp"],
    [],
)
# Order of the shape vector expected by the C code (enum S_* in the source).
_SHAPE_FIELDS = ("batch", "dim", "groups", "L1", "L2", "N", "chunk", "threads", "softplus", "reverse",
                 "bc_step_major", "dt_rank", "accumulate")
LANES = 32  # rows per tile in the C kernels (LANES in csrc/simd_math.h)


# ---------------------------------------------------------------------------------------------------
# build and load
# ---------------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """$VIM2_KERNELS_CACHE, else $XDG_CACHE_HOME/vim2_kernels or ~/.cache/vim2_kernels; a per-user
    temporary directory when that cannot be created (read-only home, e.g. some CI and HPC setups)."""
    root = os.environ.get(CACHE_ENV_VAR)
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    default = (Path(xdg) if xdg else Path.home() / ".cache") / "vim2_kernels"
    try:
        default.mkdir(parents=True, exist_ok=True)
        if os.access(default, os.W_OK):
            return default
    except OSError:
        pass
    user = getattr(os, "getuid", lambda: "user")()
    return Path(tempfile.gettempdir()) / f"vim2_kernels-{user}"


def _find_compiler() -> Optional[str]:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate:
            path = shutil.which(candidate)
            if path:
                return path
    return None


def _cpu_model() -> str:
    """The CPU's model and feature flags (-march=native code is only valid for them)."""
    found = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features") and key not in found:
                    found[key] = line.strip()
    except OSError:
        pass
    return " | ".join(found.values()) or platform.processor() or platform.machine()


def _compiler_id(compiler: str) -> str:
    try:
        result = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
        return result.stdout.splitlines()[0] if result.stdout else compiler
    except (OSError, subprocess.SubprocessError):
        return compiler


class _Library:
    def __init__(self, lib: ctypes.CDLL, path: Path, compiler: str, flags: List[str]):
        self.lib = lib
        self.path = path
        self.flags = list(flags)  # the optional flags of _FLAG_SETS it was built with (after _BASE_FLAGS)
        self.description = f"{compiler} {' '.join(flags) or '(no optional flags)'}"
        self.openmp = "-fopenmp" in flags
        for fn in (lib.vim2_scan_fwd, lib.vim2_scan_bwd, lib.vim2_channel_mixer_fwd, lib.vim2_channel_mixer_bwd):
            fn.restype = ctypes.c_int


_build_lock = threading.Lock()


@lru_cache(maxsize=None)
def _load() -> Tuple[Optional[_Library], Optional[str]]:
    """(library, None) or (None, reason). Compiles at most once per process (and once per machine)."""
    with _build_lock:
        compiler = _find_compiler()
        if compiler is None:
            return None, ("no C compiler found (looked for $CC, cc, gcc, clang); install one "
                          "(e.g. build-essential, Xcode command line tools) to use the compiled CPU kernels")
        source = b"\0".join(path.read_bytes() for path in (*_SOURCES, *_HEADERS))
        compiler_id = _compiler_id(compiler)
        errors = []
        for extra in _FLAG_SETS:
            flags = _BASE_FLAGS + extra
            key = hashlib.sha256(
                b"\0".join([source, compiler_id.encode(), " ".join(flags).encode(),
                            platform.machine().encode(), _cpu_model().encode()])
            ).hexdigest()[:16]
            target = cache_dir() / f"selective_scan_cpu-{key}{_library_suffix()}"
            if not target.exists():
                error = _compile(compiler, flags, target)
                if error is not None:
                    errors.append(f"[{' '.join(extra) or 'base flags'}] {error}")
                    continue
            try:
                return _Library(ctypes.CDLL(str(target)), target, Path(compiler).name, extra), None
            except OSError as exc:
                errors.append(f"[{' '.join(extra) or 'base flags'}] cannot load {target}: {exc}")
        names = ", ".join(path.name for path in _SOURCES)
        return None, f"compiling {names} with {compiler} failed: " + " | ".join(errors)


def _library_suffix() -> str:
    return {"Windows": ".dll", "Darwin": ".dylib"}.get(platform.system(), ".so")


def _compile(compiler: str, flags: List[str], target: Path, csrc: Path = _CSRC) -> Optional[str]:
    """Builds the library from the sources in ``csrc`` (default: this package's; tools/ab_cpu_kernels.py
    builds another revision's); None, or the compiler's complaint."""
    _log.info("vim2_kernels: compiling the CPU kernels into %s (once per machine, ~10 s)", target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build under a temporary name and rename: concurrent processes never load a partial file.
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=target.suffix)
        os.close(fd)
    except OSError as exc:
        return str(exc)
    try:
        sources = [str(csrc / path.name) for path in _SOURCES]
        result = subprocess.run([compiler, *flags, f"-I{csrc}", *sources, "-o", tmp, "-lm"],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            return (result.stderr or result.stdout).strip()[-500:] or f"exit status {result.returncode}"
        os.replace(tmp, target)
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library_info() -> str:
    """One line: where the compiled library is and how it was built, or why there is none."""
    library, reason = _load()
    if library is None:
        return f"unavailable: {reason}"
    return f"{library.path} ({library.description})"


def unavailable_reason(device: torch.device) -> Optional[str]:
    if torch.device(device).type != "cpu":
        return "the compiled kernels run on CPU tensors only"
    return _load()[1]


def saved_shape(batch: int, dim: int, seqlen: int, d_state: int) -> Tuple[int, ...]:
    """The state entering each CHUNK_SIZE-step chunk (scan order): (batch, dim, n_chunks, N) float32."""
    return (batch, dim, -(-max(seqlen, 1) // CHUNK_SIZE), d_state)


# ---------------------------------------------------------------------------------------------------
# argument marshalling
# ---------------------------------------------------------------------------------------------------

def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    """float32 with the same strides (a copy only for other dtypes); small params made contiguous."""
    if t is None:
        return None
    return t if t.dtype == torch.float32 else t.float()


def _ptr(t: Optional[Tensor]):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _seq_strides(t: Optional[Tensor], lead: int):
    """(b, d, s1, s2) of a (batch, dim, *Ls) tensor [lead = 2] or (b, g, n, s1, s2) [lead = 3]."""
    if t is None:
        return None
    st = list(t.stride())
    seq = st[lead:]
    if len(seq) == 1:
        seq = [0] + seq  # one-level sequence: L1 = 1
    return (ctypes.c_int64 * (lead + 2))(*(st[:lead] + seq))


def _threads() -> int:
    library, _ = _load()
    return torch.get_num_threads() if library is not None and library.openmp else 1


def _bc_step_major(dim: int, groups: int) -> bool:
    """Every LANES-row tile lies in one (batch, group): dB/dC partials are (.., L, N), else (.., N, L)."""
    return (dim // groups) % LANES == 0


def _shape_vector(u: Tensor, groups: int, d_state: int, softplus: bool, reverse: bool, threads: int,
                  dt_rank: int = 0, accumulate: bool = False):
    batch, dim, *Ls = u.shape
    L1, L2 = (1, Ls[0]) if len(Ls) == 1 else Ls
    values = dict(batch=batch, dim=dim, groups=groups, L1=L1, L2=L2, N=d_state, chunk=CHUNK_SIZE,
                  threads=threads, softplus=int(softplus), reverse=int(reverse),
                  bc_step_major=int(_bc_step_major(dim, groups)), dt_rank=dt_rank, accumulate=int(accumulate))
    return (ctypes.c_int64 * len(_SHAPE_FIELDS))(*(values[k] for k in _SHAPE_FIELDS))


def _library() -> ctypes.CDLL:
    library, reason = _load()
    if library is None:
        raise RuntimeError(f"the cpu selective-scan backend is unavailable: {reason}")
    return library.lib


def _check(status: int, what: str, d_state: int, dt_rank: int = 0) -> None:
    if status == 3:
        raise ValueError(f"the cpu selective-scan backend supports d_state (N) <= {MAX_D_STATE}, got {d_state}")
    if status == 4:
        raise ValueError(f"the cpu selective-scan backend supports a low-rank Δ of rank <= {MAX_DT_RANK}, "
                         f"got {dt_rank}")
    if status != 0:
        raise MemoryError(f"vim2_kernels cpu backend: {what} failed (status {status}: out of memory for "
                          f"its per-tile scratch buffers)")


def _params(A, D, delta_bias, initial_state):
    A = A.float().contiguous()
    D = None if D is None else D.float().contiguous()
    delta_bias = None if delta_bias is None else delta_bias.float().contiguous()
    initial_state = None if initial_state is None else initial_state.float().contiguous()
    return A, D, delta_bias, initial_state


# ---------------------------------------------------------------------------------------------------
# contract
# ---------------------------------------------------------------------------------------------------

def scan_forward(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus: bool, reverse: bool):
    lib = _library()
    batch, dim = u.shape[:2]
    d_state = A.shape[1]
    seqlen = math.prod(u.shape[2:])  # (not u[0, 0].numel(): that is 0 for dim = 0 too)
    u32, delta32, B32, C32, z32 = (_f32(t) for t in (u, delta, B, C, z))
    A32, D32, bias32, init32 = _params(A, D, delta_bias, initial_state)
    out = torch.empty_like(u32)  # u's layout (e.g. token-major): the kernel's lanes then store contiguously
    last = torch.empty((batch, dim, d_state), dtype=torch.float32)
    saved = torch.empty(saved_shape(batch, dim, seqlen, d_state), dtype=torch.float32)
    if seqlen == 0 or batch * dim == 0:
        last.copy_(init32 if init32 is not None else torch.zeros_like(last))
        return out.to(u.dtype), last, saved.zero_()
    status = lib.vim2_scan_fwd(
        _shape_vector(u, B.shape[1], d_state, delta_softplus, reverse, _threads()),
        _ptr(u32), _seq_strides(u32, 2), _ptr(delta32), _seq_strides(delta32, 2),
        _ptr(A32), _ptr(B32), _seq_strides(B32, 3), _ptr(C32), _seq_strides(C32, 3),
        _ptr(D32), _ptr(z32), _seq_strides(z32, 2), _ptr(bias32), _ptr(init32),
        _ptr(out), _seq_strides(out, 2), _ptr(last), _ptr(saved), None, None, None,
    )
    _check(status, "forward", d_state)
    return (out if u.dtype == torch.float32 else out.to(u.dtype)), last, saved


def scan_forward_lowrank(out: Tensor, u: Tensor, dts: Tensor, dt_weight: Tensor, A: Tensor, B: Tensor, C: Tensor,
                         D: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool, reverse: bool,
                         accumulate: bool, saved: Optional[Tensor] = None) -> None:
    """Forward with the Δ projection fused in, writing (or adding) into ``out``.

    Sequence-contract layouts (any strides, float32): u and out (batch, dim, *Ls); dts, B, C
    (batch, G, R or N, *Ls) with one group for dts; dt_weight (dim, R): Δ[b, d, t] = dts[b, 0, :, t] . dt_weight[d].
    ``saved``: None (no backward will follow), or a contiguous float32 ``saved_shape(...)`` tensor that
    receives the chunk states ``scan_backward`` needs (with Δ materialised for that route).
    """
    lib = _library()
    batch, dim = u.shape[:2]
    d_state, rank = A.shape[1], dt_weight.shape[1]
    if rank < 1:  # rank 0 would make the kernel read the (absent) full Δ
        raise ValueError(f"the low-rank Δ needs rank R >= 1, got dt_weight of shape {tuple(dt_weight.shape)}")
    if u.numel() == 0:
        if not accumulate:
            out.zero_()
        if saved is not None:
            saved.zero_()
        return
    A32, D32, bias32, _ = _params(A, D, delta_bias, None)
    w32 = dt_weight.float().contiguous()
    last = torch.empty((batch, dim, d_state), dtype=torch.float32)
    status = lib.vim2_scan_fwd(
        _shape_vector(u, B.shape[1], d_state, delta_softplus, reverse, _threads(), rank, accumulate),
        _ptr(u), _seq_strides(u, 2), None, None,
        _ptr(A32), _ptr(B), _seq_strides(B, 3), _ptr(C), _seq_strides(C, 3),
        _ptr(D32), None, None, _ptr(bias32), None,
        _ptr(out), _seq_strides(out, 2), _ptr(last), _ptr(saved), _ptr(dts), _seq_strides(dts, 3), _ptr(w32),
    )
    _check(status, "forward", d_state, rank)


def scan_backward(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, saved,
                  delta_softplus: bool, reverse: bool, *, du_out: Optional[Tensor] = None,
                  accumulate_du: bool = False, ddelta_out: Optional[Tensor] = None):
    """The backend contract's backward, plus output buffers (this backend only, see BACKWARD_INTO):
    ``du_out`` (float32, u's shape, any strides) receives du, or has it added when ``accumulate_du``;
    ``ddelta_out`` (float32, delta's shape) receives dΔ and may be ``delta`` itself (the kernel reads each
    Δ before it writes that dΔ). Without them both are fresh tensors in their input's layout."""
    lib = _library()
    batch, dim = u.shape[:2]
    groups, d_state = B.shape[1], A.shape[1]
    seqlen = math.prod(u.shape[2:])  # (not u[0, 0].numel(): that is 0 for dim = 0 too)
    u32, delta32, B32, C32, z32, dout32 = (_f32(t) for t in (u, delta, B, C, z, dout))
    A32, D32, bias32, _ = _params(A, D, delta_bias, initial_state)
    dlast = None if dlast_state is None else dlast_state.float().contiguous()
    saved_c = saved.contiguous()
    threads = _threads()

    # gradients in their input's layout (every element is written by the kernel)
    for name, out, like in (("du_out", du_out, u), ("ddelta_out", ddelta_out, delta)):
        if out is not None and (out.dtype != torch.float32 or out.shape != like.shape or out.device != like.device):
            raise ValueError(f"{name} must be a float32 tensor of shape {tuple(like.shape)} on {like.device}, "
                             f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    if accumulate_du and du_out is None:
        raise ValueError("accumulate_du needs du_out (the tensor to add du into)")
    du = torch.empty_like(u32) if du_out is None else du_out
    ddelta = torch.empty_like(delta32) if ddelta_out is None else ddelta_out
    dz = None if z is None else torch.empty_like(z32)
    dA_rows = torch.zeros((batch, dim, d_state), dtype=torch.float32)
    step_major = _bc_step_major(dim, groups)
    # the kernel's layout of the dB/dC partials; a step-major one is transposed to B's below
    bc_shape = (batch, groups, seqlen, d_state) if step_major else (batch, groups, d_state, seqlen)
    dB_parts = torch.zeros((threads, *bc_shape), dtype=torch.float32)
    dC_parts = torch.zeros((threads, *bc_shape), dtype=torch.float32)
    dD_rows = None if D is None else torch.zeros((batch, dim), dtype=torch.float32)
    dbias_rows = None if delta_bias is None else torch.zeros((batch, dim), dtype=torch.float32)
    dinit = None if initial_state is None else torch.zeros((batch, dim, d_state), dtype=torch.float32)
    if seqlen == 0 or batch * dim == 0:
        if dinit is not None and dlast is not None:
            dinit.copy_(dlast)
    else:
        status = lib.vim2_scan_bwd(
            _shape_vector(u, groups, d_state, delta_softplus, reverse, threads, accumulate=accumulate_du),
            _ptr(u32), _seq_strides(u32, 2), _ptr(delta32), _seq_strides(delta32, 2),
            _ptr(A32), _ptr(B32), _seq_strides(B32, 3), _ptr(C32), _seq_strides(C32, 3),
            _ptr(D32), _ptr(z32), _seq_strides(z32, 2), _ptr(bias32),
            _ptr(saved_c), _ptr(dout32), _seq_strides(dout32, 2), _ptr(dlast),
            _ptr(du), _seq_strides(du, 2), _ptr(ddelta), _seq_strides(ddelta, 2), _ptr(dz), _seq_strides(dz, 2),
            _ptr(dA_rows), _ptr(dB_parts), _ptr(dC_parts), _ptr(dD_rows), _ptr(dbias_rows), _ptr(dinit),
        )
        _check(status, "backward", d_state)

    def bc_grad(parts: Tensor, like: Tensor) -> Tensor:
        total = parts[0] if threads == 1 else parts.sum(0)
        if step_major:
            total = total.transpose(-1, -2).contiguous()
        return total.view(like.shape).to(like.dtype)

    return (
        du if du_out is not None else du.to(u.dtype),
        ddelta if ddelta_out is not None else ddelta.to(delta.dtype), dA_rows.sum(0).to(A.dtype),
        bc_grad(dB_parts, B), bc_grad(dC_parts, C),
        None if D is None else dD_rows.sum(0).to(D.dtype),
        None if z is None else dz.to(z.dtype),
        None if delta_bias is None else dbias_rows.sum(0).to(delta_bias.dtype),
        None if initial_state is None else dinit.to(initial_state.dtype),
    )
