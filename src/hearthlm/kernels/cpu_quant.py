"""Native CPU kernel for group-quantized matmuls and attention (csrc/cpu_quant.c): x quantized to int8 on the
fly (a scale per 16 inputs, optionally a second pass over the rounding residuals), u8 x s8 dot products with
AVX-512 VNNI or AVX2, OpenMP threads from the runtime torch already loaded (the same libgomp, so the two never fight
over cores). It serves every x86-64 CPU with AVX2 + FMA + F16C; elsewhere its portable C loop is only a test
reference and PyTorch's int4 kernel runs.

ISA (EngineConfig.cpu_kernel, --cpu-kernel): `KERNELS` = auto | avx512vnni | avx2 | torch. auto is the best this
CPU has (`cpu_kernel_for`); torch is PyTorch's int4 kernel (not batch-invariant). Each ISA is its own build of the
same source (`ISA_FLAGS`: -march=native for avx512vnni, -march=x86-64-v3 for avx2, plus -mavxvnni where the CPU has
AVX-VNNI), so an AVX-512 machine runs the AVX2 library when asked (the tests do). The AVX2 build gives the AVX-512
build's bits (tests/test_cpu_kernel_isa.py). The engine picks one for its load (`using`); `library()` gives the
picked one (auto outside `using`).

The C source ships with the package and is compiled once per machine and ISA with the system C compiler (`cc`, or
$CC) into $HEARTH_HOME/kernels (default ~/.hearth/kernels), keyed by source, flags and CPU. Without a compiler the
engine keeps PyTorch's own int4 kernel (layers/quant_linear.py) and logs why once. The first build shows a one-line
status on stderr (a terminal; else an INFO log line). Its parallel regions use `set_threads`' count
(runtime/threads.py sets it with torch's).

Weights reach the kernel as layers/quant_linear.NativeWeight makes them: codes unsigned (signed ones + 128, the
offset folded into the min), 4-bit codes two a byte, in tiles of 16 rows as the C file's comment describes
(`interleave`); scale and min as fp16 (`tile_scales`).
"""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..config import CPU_KERNELS as KERNELS, normalize_cpu_kernel as normalize_kernel

log = logging.getLogger("hearthlm")

SOURCE = Path(__file__).with_name("csrc") / "cpu_quant.c"
GROUP = 32
TILE = 16  # output rows per tile
PRE_NONE, PRE_RMSNORM, PRE_SILU_MUL = 0, 1, 2  # csrc: the matmul input f(x)
FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=gnu11", "-shared", "-fPIC"]  # the avx512vnni build's
# what each ISA's build needs of the CPU (/proc/cpuinfo names), and its flags in place of FLAGS' -march=native
ISA_NEEDS = {"avx512vnni": ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "fma", "f16c"),
             "avx2": ("avx2", "fma", "f16c")}
ISA_FLAGS = {"avx512vnni": ["-march=native"], "avx2": ["-march=x86-64-v3", "-mtune=generic"]}
ISA_SIMD = {"avx512vnni": (1,), "avx2": (2, 3)}  # hl_simd() of a build that took the ISA's path


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("flags", "model name"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor()


def build(flags: list[str] | None = None, out_dir: Path | None = None, isa: str = "") -> Path:
    """Compile csrc/cpu_quant.c (cached) and return the shared library's path. Raises OSError/CalledProcessError."""
    flags = FLAGS if flags is None else flags
    cc = os.environ.get("CC", "cc")
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join([cc, *flags]).encode() + _cpu_id().encode()).hexdigest()[:16]
    if out_dir is None:
        from ..store.layout import hearth_home

        out_dir = hearth_home() / "kernels"
    out = out_dir / f"cpu_quant-{isa + '-' if isa else ''}{key}.so"
    if out.exists():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        start = time.perf_counter()
        _compile([cc, *flags, str(SOURCE), "-o", tmp, "-lm"])
        os.replace(tmp, out)  # atomic: concurrent builders leave one complete file
        log.info("built the native CPU kernel in %.1fs: %s", time.perf_counter() - start, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


STATUS = "hearthlm: compiling the native CPU kernel for this CPU (once per machine)"


def _status_stream():
    """stderr when it is a terminal (the build's one-line status goes there), else None."""
    try:
        return sys.stderr if sys.stderr is not None and sys.stderr.isatty() else None
    except (AttributeError, ValueError):
        return None


def _compile(cmd: list[str], stream=None, interval_s: float = 0.25) -> None:
    """Run the compiler; while it runs, a one-line status with the elapsed seconds on `stream` (default: stderr
    if a terminal), else an INFO log line. Raises CalledProcessError (with the compiler's stderr) or OSError."""
    stream = stream or _status_stream()
    if stream is None:
        log.info("%s ...", STATUS.removeprefix("hearthlm: "))
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        return
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while True:
            stream.write(f"\r{STATUS} ... {time.perf_counter() - start:.0f}s")
            stream.flush()
            try:
                stdout, stderr = proc.communicate(timeout=interval_s)
                break
            except subprocess.TimeoutExpired:
                continue
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        ok = proc.returncode == 0
        stream.write(f"\r{STATUS} ... {'done' if ok else 'failed'} in {time.perf_counter() - start:.1f}s\n")
        stream.flush()
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd, stdout, stderr)


_threads = 0  # set_threads' count for the kernel's parallel regions; 0: OpenMP's default


def set_threads(n: int) -> None:
    """The native kernel's OpenMP team size (its parallel regions pass it explicitly: OpenMP keeps the default
    count per calling thread). Applies to the library now if it is loaded, else when it loads."""
    global _threads
    _threads = max(0, int(n))
    for lib in list(_loaded):
        lib.hl_set_threads(_threads)


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    c_int = ctypes.c_int
    lib.hl_qmatmul.argtypes = [p, i64, i64, i64, p, p, p, i64, c_int, p, i64, c_int, p, ctypes.c_float, c_int, c_int]
    lib.hl_qmatmul.restype = ctypes.c_int
    lib.hl_attention.argtypes = [p, i64, p, p, p, p, p, p, p, p, i64, i64, i64, i64, ctypes.c_float,
                                 ctypes.c_float, p, p]
    lib.hl_attention.restype = ctypes.c_int
    lib.hl_simd.restype = ctypes.c_int
    lib.hl_prepare_rows.argtypes = [c_int, p, i64, i64, i64, p, ctypes.c_float, p]
    lib.hl_prepare_rows.restype = None
    lib.hl_set_threads.argtypes = [c_int]
    lib.hl_set_threads.restype = None
    lib.hl_team_size.restype = c_int
    lib.hl_set_threads(_threads)
    _loaded.append(lib)
    return lib


_loaded: list[ctypes.CDLL] = []  # every library `load` gave: set_threads reaches them all


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as /proc/cpuinfo names them; elsewhere (no /proc) what torch's CPU capability
    implies (AVX512: VNNI assumed, the build then checks)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        cap = ""
    if cap.startswith("AVX512"):
        return frozenset(ISA_NEEDS["avx512vnni"] + ISA_NEEDS["avx2"])
    return frozenset(ISA_NEEDS["avx2"]) if cap == "AVX2" else frozenset()


def cpu_kernel_for(value: str = "auto", flags: frozenset[str] | None = None) -> str:
    """The ISA a cpu_kernel setting runs on this CPU: auto = the best it has (avx512vnni, avx2, else torch). An ISA
    the CPU lacks is an InvalidRequestError naming the missing features."""
    from ..errors import InvalidRequestError

    kernel = normalize_kernel(value)
    flags = cpu_flags() if flags is None else flags
    if kernel == "auto":
        return next((isa for isa, needs in ISA_NEEDS.items() if flags.issuperset(needs)), "torch")
    missing = [f for f in ISA_NEEDS.get(kernel, ()) if f not in flags]
    if missing:
        others = [k for k in KERNELS if k != kernel and k not in ISA_NEEDS or flags.issuperset(ISA_NEEDS.get(k, ()))]
        raise InvalidRequestError(f"cpu_kernel {kernel!r}: this CPU lacks {', '.join(missing)}; choose "
                                  f"{', '.join(others[:-1])} or {others[-1]} (--cpu-kernel)", param="cpu_kernel")
    return kernel


def isa_flags(isa: str, flags: frozenset[str] | None = None) -> list[str]:
    """The compiler flags of an ISA's build: FLAGS with -march=native replaced (avx2: x86-64-v3, and AVX-VNNI's
    256-bit vpdpbusd where the CPU has it)."""
    extra = list(ISA_FLAGS[isa])
    if isa == "avx2" and "avx_vnni" in (cpu_flags() if flags is None else flags):
        extra.append("-mavxvnni")
    return [f for f in FLAGS if f != "-march=native"][:1] + extra + FLAGS[2:]


_selected: contextvars.ContextVar[str] = contextvars.ContextVar("hearthlm_cpu_kernel", default="auto")


@contextlib.contextmanager
def using(kernel: str):
    """Within it, `library()` (so NativeWeight.supports, the weights it packs and their attention) gives the
    kernel `kernel` picks (cpu_kernel_for: an ISA the CPU lacks raises InvalidRequestError here)."""
    isa = cpu_kernel_for(kernel)
    token = _selected.set(normalize_kernel(kernel))
    try:
        yield isa
    finally:
        _selected.reset(token)


def library(kernel: str | None = None) -> ctypes.CDLL | None:
    """The compiled kernel for `kernel` (None: the one `using` picked, else auto), or None: torch, or no working
    compiler (logged once). auto falls back to the next ISA when a build fails."""
    value = normalize_kernel(kernel if kernel is not None else _selected.get())
    isa = cpu_kernel_for(value)
    if value != "auto" or isa == "torch":
        return _library(isa)
    flags, order = cpu_flags(), list(ISA_NEEDS)
    for cand in order[order.index(isa):]:
        lib = _library(cand) if flags.issuperset(ISA_NEEDS[cand]) else None
        if lib is not None:
            return lib
    return None


@functools.cache
def _library(isa: str) -> ctypes.CDLL | None:
    """One ISA's build, loaded (cached), or None (torch; the build failed or took another path: logged)."""
    if isa not in ISA_FLAGS:
        return None
    detail = ""
    flags = isa_flags(isa)
    tries = [flags, [f for f in flags if f != "-fopenmp"]]  # compilers without OpenMP: single-threaded
    if isa == "avx2":  # compilers that do not know x86-64-v3
        tries.append([f for f in flags if not f.startswith(("-march", "-mtune"))] + ["-mavx2", "-mfma", "-mf16c"])
    for fl in tries:
        try:
            lib = load(build(fl, isa=isa))
        except (OSError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            continue
        if lib.hl_simd() not in ISA_SIMD[isa]:  # the portable loop is a reference, slower than PyTorch's int4
            log.info("native CPU kernel (%s): this CPU (or compiler) lacks it; quantized CPU matmuls use PyTorch's "
                     "int4 kernel", isa)
            return None
        if "-fopenmp" not in fl:
            log.warning("native CPU kernel (%s) built without -fopenmp (%s)", isa, detail.strip()[:200])
        return lib
    log.warning("native CPU kernel (%s) unavailable (%s); quantized CPU matmuls use PyTorch's int4 kernel. "
                "Install a C compiler (gcc or clang) for the faster path.", isa, detail.strip()[:300])
    return None


def interleave(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[N, K] unsigned codes (0..15 for bits 4, 0..255 for 8; N % 16 == 0) -> [N * K * bits // 8] uint8 in the C
    kernel's layout: tiles of 16 rows, per group 8 vectors [16 rows][4 codes] (bits 4: vector i + 4 in the high
    nibbles of vector i)."""
    return torch.from_numpy(interleave_np(codes.to(torch.uint8).numpy(), bits))


def interleave_np(codes: np.ndarray, bits: int) -> np.ndarray:
    """`interleave` on a numpy [N, K] array of uint8 codes (int8: the signed codes, stored + 128), in one
    thread: a vector of 4 codes moves as one uint32 (and 4-bit codes join two a byte before the move)."""
    n, k = codes.shape
    c = np.ascontiguousarray(codes)
    if c.dtype == np.int8:
        c = c.view(np.uint8) ^ np.uint8(0x80)  # code + 128, as pack's int16 arithmetic gives it
    v = c.view(np.uint8).view(np.uint32).reshape(n // TILE, TILE, k // GROUP, GROUP // 4)
    if bits == 4:  # nibbles <= 15: the shift never carries into the next byte
        v = v[..., :4] | (v[..., 4:] << np.uint32(4))
    return np.ascontiguousarray(v.transpose(0, 2, 3, 1)).view(np.uint8).reshape(-1)


def pack(codes: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor, bits: int
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Group-quantized W (codes [N, K]: 4/5-bit unsigned or int8 signed; scale, mins [N, K / 32]) -> the kernel's
    (codes, scale, mins, bits): signed codes + 128 with the offset folded into the min, 4-bit codes two a byte."""
    if codes.dtype == torch.int8:  # w = (code + 128) * s + (min - 128 s)
        mins = mins - 128 * scale
    bits = 4 if bits == 4 else 8
    c = codes if codes.dtype in (torch.int8, torch.uint8) else codes.to(torch.uint8)
    return torch.from_numpy(interleave_np(c.numpy(), bits)), tile_scales(scale), tile_scales(mins), bits


def tile_scales(t: torch.Tensor | np.ndarray) -> torch.Tensor:
    """[N, G] per-group scale or min (float32, or already fp16) -> fp16 [N / 16, G, 16], the kernel's order."""
    a = t.numpy() if isinstance(t, torch.Tensor) else t
    n, g = a.shape
    with np.errstate(over="ignore"):
        a = a.astype(np.float16, copy=False)
    return torch.from_numpy(np.ascontiguousarray(a.reshape(n // TILE, TILE, g).transpose(0, 2, 1)))


def input_function(norm: tuple[torch.Tensor, float] | None, silu_mul: bool) -> tuple[int, int | None, float]:
    """The C calls' (pre, norm weight pointer, eps) for f(x): RMSNorm with norm = (weight [K], eps), SiLU * mul of
    x's two halves, or x itself."""
    if norm is not None:
        return PRE_RMSNORM, norm[0].data_ptr(), norm[1]
    return (PRE_SILU_MUL if silu_mul else PRE_NONE), None, 0.0


def qmatmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor, bits: int,
            out: torch.Tensor, accumulate: bool = False, norm: tuple[torch.Tensor, float] | None = None,
            silu_mul: bool = False, residual: bool = False, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """out (+)= f(x) @ W^T, all float32, W in `interleave`'s layout (codes uint8, scale and mins from
    `tile_scales`). x: [M, K] (silu_mul: [M, 2K], f = silu(x[:, :K]) * x[:, K:]; norm: (weight [K], eps),
    f = RMSNorm; else f = identity), unit column stride; out: [M, N], unit column stride. residual: a second pass
    over x's int8 rounding residuals (x to within 1/256 of a quantization step; twice the dot products)."""
    m, n = out.shape
    k = scale.shape[1] * GROUP
    assert scale.shape == (n // TILE, k // GROUP, TILE) and n % TILE == 0, (scale.shape, n)
    assert x.dtype == out.dtype == torch.float32 and x.stride(-1) == 1 and out.stride(-1) == 1, (x.dtype, x.stride())
    assert x.shape[0] == m and x.shape[1] == (2 * k if silu_mul else k), (x.shape, k)
    if m:
        pre, w, eps = input_function(norm, silu_mul)
        rc = (lib or library()).hl_qmatmul(x.data_ptr(), m, x.stride(0), k, codes.data_ptr(), scale.data_ptr(),
                                           mins.data_ptr(), n, bits, out.data_ptr(), out.stride(0), pre, w, eps,
                                           accumulate, residual)
        if rc:
            raise MemoryError("native CPU matmul: out of memory for the quantized activations")
    return out


def key_ranges(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mask: [R, L] bool (True: attend) or additive (0 / -inf), each row's attended keys one contiguous run ->
    (first, count): int64 [R]. Raises ValueError for a row whose keys are not one run."""
    m = mask if mask.dtype == torch.bool else mask == 0
    count = m.sum(-1)
    first = m.to(torch.uint8).argmax(-1)
    idx = torch.arange(m.shape[-1], device=m.device)
    if not bool((m == ((idx >= first[:, None]) & (idx < (first + count)[:, None]))).all()):
        raise ValueError("native CPU attention: a row's keys must be one contiguous run")
    return first.long(), count.long()


class RowAttention:
    """Attention for any rows over float32 paged pools, RoPE and the rows' K/V writes included: the step's
    arguments prepared once, then one call per layer of the KV group. Row t attends key_count[t] slots from
    key_slots[key_start[t]] on (its valid keys in position order): its bits depend on its own q and keys only.
    cos, sin: [T, 1, head_dim] (layers/rotary.Rotary.cos_sin); slot_mapping: [T] int64; key_slots: flat int64."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor, key_slots: torch.Tensor,
                 key_start: torch.Tensor, key_count: torch.Tensor, num_heads: int, kv_heads: int, head_dim: int,
                 scale: float, softcap: float | None, lib: ctypes.CDLL | None = None):
        t = slot_mapping.shape[0]
        assert key_slots.dtype == slot_mapping.dtype == key_start.dtype == key_count.dtype == torch.int64
        assert cos.dtype == sin.dtype == torch.float32 and key_start.shape == key_count.shape == (t,)
        keep = [cos.reshape(t, head_dim).contiguous(), sin.reshape(t, head_dim).contiguous(),
                slot_mapping.contiguous(), key_slots.reshape(-1).contiguous(), key_start.contiguous(),
                key_count.contiguous()]
        self._keep = keep  # the pointers below stay valid while this object lives
        self.rows, self.width, self.kv_heads, self.head_dim = t, num_heads * head_dim, kv_heads, head_dim
        self._call = (lib or library()).hl_attention
        self._args = (*(k.data_ptr() for k in keep[2:]), t, num_heads, kv_heads, head_dim, scale, softcap or 0.0)
        self._rope = (keep[0].data_ptr(), keep[1].data_ptr())

    def __call__(self, qkv: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                 sinks: torch.Tensor | None = None) -> torch.Tensor:
        """qkv: [T, (heads + 2 kv_heads) * head_dim] float32 rows (unit column stride) from the fused projection;
        pools: [blocks, block_size, kv_heads, head_dim] float32, contiguous; sinks: [heads] float32 contiguous or
        None (attention sinks: one more softmax logit per head, with a zero value). -> [T, heads * head_dim]."""
        out = torch.empty(self.rows, self.width, dtype=torch.float32)
        if self._call(qkv.data_ptr(), qkv.stride(0), *self._rope, k_pool.data_ptr(), v_pool.data_ptr(), *self._args,
                      None if sinks is None else sinks.data_ptr(), out.data_ptr()):
            raise MemoryError("native CPU attention: out of memory")
        return out

    def accepts(self, qkv: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> bool:
        return qkv.dtype == torch.float32 and qkv.stride(-1) == 1 and qkv.shape[0] == self.rows and all(
            p.dtype == torch.float32 and p.is_contiguous() and p.shape[2:] == (self.kv_heads, self.head_dim)
            for p in (k_pool, v_pool))


def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_pool: torch.Tensor,
                     v_pool: torch.Tensor, slot_mapping: torch.Tensor, key_slots: torch.Tensor,
                     mask: torch.Tensor | None, num_heads: int, scale: float, softcap: float | None,
                     lib: ctypes.CDLL | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """RowAttention for one layer, one query per sequence: key_slots [B, L], mask [B, L] additive (each row's
    0 entries one run) or None -> [B, heads * head_dim]."""
    b, length = key_slots.shape
    if mask is None:
        first, count = torch.zeros(b, dtype=torch.long), torch.full((b,), length, dtype=torch.long)
    else:
        first, count = key_ranges(mask.reshape(b, length))
    att = RowAttention(cos, sin, slot_mapping, key_slots, first + torch.arange(b) * length, count, num_heads,
                       k_pool.shape[2], k_pool.shape[3], scale, softcap, lib)
    assert att.accepts(qkv, k_pool, v_pool)
    return att(qkv, k_pool, v_pool, sinks)


def prepare_rows(x: torch.Tensor, k: int, norm: tuple[torch.Tensor, float] | None = None, silu_mul: bool = False,
                 lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """qmatmul's f(x) alone, [M, K] float32 (for tests)."""
    out = torch.empty(x.shape[0], k, dtype=torch.float32)
    pre, w, eps = input_function(norm, silu_mul)
    (lib or library()).hl_prepare_rows(pre, x.data_ptr(), x.shape[0], x.stride(0), k, w, eps, out.data_ptr())
    return out


__all__ = ["RowAttention", "build", "decode_attention", "input_function", "interleave", "key_ranges", "library",
           "load", "pack", "prepare_rows", "qmatmul", "set_threads", "tile_scales"]
