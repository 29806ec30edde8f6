"""Fixtures for kernel tests: gpu-marker skipping, a paged-batch builder, naive dense attention."""
from __future__ import annotations

import atexit
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

try:
    import hearthlm  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))


INTERPRETER_ONLY = "TRITON_INTERPRET=1"  # in the skip reason of every case that needs the interpreter
RUNNER = "under_interpreter"  # in the name of every test that runs a file's interpreter-only cases in a child


def interpreting() -> bool:
    """This process runs Triton kernels on the interpreter: TRITON_INTERPRET=1 was set before triton's import,
    triton is installed, and there is no CUDA device. Never imports triton itself (the parent stays free of it)."""
    import importlib.util

    from hearthlm.kernels._triton_utils import interpreting as interpret_requested  # the one read of the variable

    if torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        return False
    if "triton" in sys.modules:  # the mode was fixed at import
        return bool(sys.modules["triton"].knobs.runtime.interpret)
    return interpret_requested()


def children_interpret() -> bool:
    """run_interpreted starts a TRITON_INTERPRET=1 child here (and does not skip)."""
    import importlib.util

    return not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None and not interpreting()


CASES_TIMEOUT_S = 300  # per runner: keep the interpreted shapes tiny, the default suite runs them
_DONE = "@@hearthlm-interpreter-child-done"
# The child: import hearthlm.kernels first (test_cold_start_cpu asks whether triton came with it), then run one
# pytest session per request line (JSON argv), each followed by a line with _DONE and its exit status. The global
# RNG is reseeded per session as tests/conftest.py's import does in a fresh process.
_CHILD = f"""
import json, sys
import hearthlm.kernels as K
print("{_DONE}", json.dumps(["triton" in sys.modules, K.HAS_TRITON]), flush=True)
import pytest, torch
for line in sys.stdin:
    torch.manual_seed(0)
    try:
        rc = int(pytest.main(json.loads(line)))
    except BaseException:  # noqa: BLE001 - report it to the runner, serve the next one
        import traceback
        traceback.print_exc()
        rc = 3
    sys.stdout.flush()
    sys.stderr.flush()
    print("{_DONE}", rc, flush=True)
"""


class InterpreterChild:
    """One TRITON_INTERPRET=1 process for the whole session (triton picks interpreter vs compiler at import): each
    runner sends it a pytest command line and reads back that session's output and exit status, so torch, triton
    and hearthlm are imported once, not once per runner. Replaced by a fresh one after a timeout or a crash."""

    def __init__(self) -> None:
        root = Path(__file__).resolve().parents[2]
        env = dict(os.environ, TRITON_INTERPRET="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root / "src"), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen([sys.executable, "-u", "-c", _CHILD], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                     env=env, cwd=root)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        atexit.register(self.close)
        status, out = self._reply(CASES_TIMEOUT_S)
        # [triton in sys.modules, HAS_TRITON] after `import hearthlm.kernels`; None: the child did not start (out)
        self.imports: list[bool] | None = json.loads(status) if status is not None else None
        self.start_output = out

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _reply(self, timeout: float) -> tuple[str | None, str]:
        """(the status after _DONE, or None on a timeout or the child's exit; the output before it)."""
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.proc.kill()
                self.proc.wait()
                out.append(f"\n[no reply within {timeout} s: the interpreter child was stopped]\n")
                return None, "".join(out)
            if line is None:
                out.append(f"\n[the interpreter child exited with status {self.proc.wait()}]\n")
                return None, "".join(out)
            if line.startswith(_DONE):
                return line[len(_DONE):].strip(), "".join(out)
            out.append(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def pytest(self, args: list[str], timeout: float = CASES_TIMEOUT_S) -> tuple[int | None, str]:
        """Run `pytest args` in the child: (exit status, or None on a timeout or crash; its output)."""
        try:
            self.proc.stdin.write(json.dumps(args) + "\n")
            self.proc.stdin.flush()
        except OSError:  # it has exited: _reply collects its last words
            pass
        status, out = self._reply(timeout)
        return (int(status) if status is not None else None), out

    def close(self) -> None:
        """End the child: it exits at the end of its input."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


_child: InterpreterChild | None = None
_runners_left: int | None = None  # selected runners yet to run (set at collection): the last one ends the child


def interpreter_child() -> InterpreterChild:
    """The session's TRITON_INTERPRET=1 child, started on first use (again after a timeout or a crash)."""
    global _child
    if _child is None or not _child.alive():
        _child = InterpreterChild()
    return _child


def run_interpreted(test_file: Path, keyword: str | None = None) -> None:
    """Run test_file (only tests matching keyword) with TRITON_INTERPRET=1, in the session's interpreter child:
    triton picks interpreter vs compiler at import. Fails with the child's report if a case fails; skips when the
    interpreter is unavailable."""
    if not children_interpret():
        if torch.cuda.is_available():
            pytest.skip("CUDA present: the gpu-marked tests cover the kernels")
        if interpreting():
            pytest.skip("already interpreted in this process")
        pytest.skip("triton is not installed")
    global _runners_left
    child = interpreter_child()
    try:
        if child.imports is None:
            pytest.fail(f"the interpreter child did not start:\n{child.start_output[-4000:]}")
        selection = f"not {RUNNER}" + (f" and ({keyword})" if keyword else "")  # runners would skip there
        args = ["-q", "-p", "no:cacheprovider", "--durations=5", str(test_file), "-k", selection]
        rc, out = child.pytest(args)
    finally:
        if _runners_left is not None:
            _runners_left -= 1
            if _runners_left <= 0:
                child.close()
    tail = out[-4000:]
    if rc is None:
        pytest.fail(f"interpreted cases of {test_file.name} (-k {keyword!r}) did not finish:\n{tail}")
    if rc == 5 or (" skipped" in tail and " passed" not in tail):
        pytest.skip(f"triton interpreter unavailable here:\n{tail}")
    assert rc == 0, tail


def _interpreter_only(item: pytest.Item) -> bool:
    return any(INTERPRETER_ONLY in str(m.kwargs.get("reason", "")) and m.args and all(bool(a) for a in m.args)
               for m in item.iter_markers("skipif"))


@pytest.hookimpl(trylast=True)  # after -k / -m: a case is moved only if its runner was selected too
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Interpreter-only cases whose file's runner is selected too run through it in the interpreter child: deselect
    them here instead of reporting each as skipped (the runner fails if any of them fails). Applies to the
    whole session once this conftest is loaded (tests/kernels collected)."""
    global _runners_left
    if not children_interpret():
        return
    _runners_left = sum(RUNNER in item.name for item in items)
    tests = Path(__file__).resolve().parents[1]  # runners elsewhere in tests/ use run_interpreted too
    covered = set()
    for item in items:
        if RUNNER in item.name and Path(item.path).resolve().is_relative_to(tests):
            target = getattr(item.module, "INTERPRETED_FILE", None)
            covered.add(Path(target).resolve() if target else Path(item.path).resolve())
    moved = [i for i in items if Path(i.path).resolve() in covered and RUNNER not in i.name and _interpreter_only(i)]
    if moved:
        config.hook.pytest_deselected(items=moved)
        gone = set(moved)
        items[:] = [i for i in items if i not in gone]


@pytest.fixture(autouse=True)
def _skip_gpu_without_cuda(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


class PagedBatch:
    """Contiguous per-sequence K/V plus the same data scattered into a paged cache.

    Block ids are a random permutation (non-contiguous, out of order); unowned cache slots hold noise
    so that reading outside a sequence's blocks shows up as an error; tables are padded with 0.
    """

    def __init__(self, seq_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, device: str, seed: int = 0, spare_blocks: int = 3):
        g = torch.Generator().manual_seed(seed)
        blocks_per_seq = [-(-n // block_size) for n in seq_lens]
        num_blocks = sum(blocks_per_seq) + spare_blocks
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        k_cache = torch.randn(shape, generator=g).to(dtype)  # built on CPU, moved once
        v_cache = torch.randn(shape, generator=g).to(dtype)
        perm = torch.randperm(num_blocks, generator=g)
        tables = torch.zeros(len(seq_lens), max(blocks_per_seq + [1]) + 2, dtype=torch.int32)
        self.k: list[torch.Tensor] = []  # [seq_len, num_kv_heads, head_dim] each
        self.v: list[torch.Tensor] = []
        used = 0
        for i, n in enumerate(seq_lens):
            ids = perm[used:used + blocks_per_seq[i]]
            used += blocks_per_seq[i]
            tables[i, :len(ids)] = ids.to(torch.int32)
            k = torch.randn(n, num_kv_heads, head_dim, generator=g).to(dtype)
            v = torch.randn(n, num_kv_heads, head_dim, generator=g).to(dtype)
            pos = torch.arange(n)
            slots = ids[pos // block_size] * block_size + pos % block_size
            k_cache.view(-1, num_kv_heads, head_dim)[slots] = k
            v_cache.view(-1, num_kv_heads, head_dim)[slots] = v
            self.k.append(k.to(device))
            self.v.append(v.to(device))
        self.k_cache, self.v_cache = k_cache.to(device), v_cache.to(device)
        self.block_tables = tables.to(device)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, scale: float,
                    softcap: float | None, window: int | None) -> torch.Tensor:
    """Naive float64 attention for one sequence. q: [Lq, H, D]; k, v: [T, KVH, D] -> [Lq, H, D] fp64."""
    group = q.shape[1] // k.shape[1]
    kd = k.double().repeat_interleave(group, dim=1)
    vd = v.double().repeat_interleave(group, dim=1)
    s = torch.einsum("qhd,thd->hqt", q.double(), kd) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    k_pos = torch.arange(k.shape[0], device=q.device)
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqt,thd->qhd", torch.softmax(s, dim=-1), vd)


@pytest.fixture
def dense() -> Callable[..., torch.Tensor]:
    return dense_attention


def decode_case_fn(seq_lens: list[int], num_heads: int = 8, num_kv_heads: int = 2, head_dim: int = 32,
                   block_size: int = 16, dtype: torch.dtype = torch.float32, device: str = "cpu",
                   seed: int = 0) -> tuple[PagedBatch, torch.Tensor]:
    pb = PagedBatch(seq_lens, num_kv_heads, head_dim, block_size, dtype, device, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=g).to(dtype).to(device)
    return pb, q


def prefill_case_fn(seq_lens: list[int], q_lens: list[int], num_heads: int = 8, num_kv_heads: int = 2,
                    head_dim: int = 32, block_size: int = 16, dtype: torch.dtype = torch.float32,
                    device: str = "cpu", seed: int = 0) -> tuple[PagedBatch, torch.Tensor, torch.Tensor]:
    pb = PagedBatch(seq_lens, num_kv_heads, head_dim, block_size, dtype, device, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=g).to(dtype).to(device)
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32).to(device)
    return pb, q, cu


@pytest.fixture
def decode_case() -> Callable[..., tuple[PagedBatch, torch.Tensor]]:
    """(seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, device) -> (batch, q [S, H, D])."""
    return decode_case_fn


@pytest.fixture
def prefill_case() -> Callable[..., tuple[PagedBatch, torch.Tensor, torch.Tensor]]:
    """(seq_lens, q_lens, ...) -> (batch, q [sum(q_lens), H, D], cu_seqlens_q [S + 1] int32)."""
    return prefill_case_fn
