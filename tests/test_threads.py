"""CPU threads (runtime/threads.py): the physical-core count, EngineConfig.threads applied at engine start, and the
OpenMP wait policy set at `import hearthlm` (issue 16: good manners on a shared CPU)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from hearthlm.runtime import threads

from .conftest import default_model_available


def fake_sysfs(root, siblings: dict[int, str | None], core_ids: dict[int, tuple[str, str]] | None = None):
    """cpuN/topology with thread_siblings_list (None: no such file) and optionally physical_package_id/core_id."""
    for cpu, text in siblings.items():
        topo = root / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        if text is not None:
            (topo / "thread_siblings_list").write_text(text + "\n")
        if core_ids and cpu in core_ids:
            (topo / "physical_package_id").write_text(core_ids[cpu][0] + "\n")
            (topo / "core_id").write_text(core_ids[cpu][1] + "\n")
    return root


def test_cpu_list():
    assert threads._cpu_list("0-3,8\n") == {0, 1, 2, 3, 8}
    assert threads._cpu_list("5") == {5}


def test_physical_cores_counts_smt_siblings_once(tmp_path):
    # 4 cores x 2 threads, siblings numbered Linux-style: cpu i and i + 4 share a core
    sysfs = fake_sysfs(tmp_path, {i: f"{i % 4},{i % 4 + 4}" for i in range(8)})
    assert threads.physical_cores(set(range(8)), sysfs) == 4
    assert threads.physical_cores({0, 4}, sysfs) == 1  # both threads of one core
    assert threads.physical_cores({0, 1, 5}, sysfs) == 2  # the affinity mask decides, not the machine
    sysfs2 = fake_sysfs(tmp_path / "ranges", {i: f"{i - i % 2}-{i - i % 2 + 1}" for i in range(4)})
    assert threads.physical_cores({0, 1, 2, 3}, sysfs2) == 2


def test_physical_cores_fallbacks(tmp_path):
    # no thread_siblings_list: package + core_id; cpu 2 has no topology at all and counts alone
    sysfs = fake_sysfs(tmp_path, {0: None, 1: None}, core_ids={0: ("0", "7"), 1: ("0", "7")})
    assert threads.physical_cores({0, 1, 2}, sysfs) == 2
    assert threads.physical_cores({0, 1}, tmp_path / "missing") == 2  # nothing readable: one core per CPU


def test_default_threads_is_this_machines_physical_cores():
    n = threads.default_threads()
    assert 1 <= n <= len(threads.allowed_cpus()) <= (os.cpu_count() or n)


def test_set_wait_policy_guards():
    env: dict[str, str] = {}
    assert threads.set_wait_policy(env, {}) == str(threads.SPIN_COUNT)
    assert env == {"GOMP_SPINCOUNT": str(threads.SPIN_COUNT)}
    env = {}
    assert threads.set_wait_policy(env, {"torch": object()}) is None and env == {}  # too late: libgomp loaded
    for user in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "infinite"}):  # the user's setting wins
        env = dict(user)
        assert threads.set_wait_policy(env, {}) is None and env == user


def _torch_libgomp() -> str | None:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("torch")
    lib = Path(spec.origin).parent / "lib" / "libgomp.so.1" if spec and spec.origin else None
    return str(lib) if lib and lib.exists() else None


def _libgomp_env(code: str, **env) -> str:
    """stderr of `code` in a fresh interpreter with OMP_DISPLAY_ENV (libgomp prints its settings when it loads)."""
    base = {k: v for k, v in os.environ.items() if k not in threads.WAIT_ENV}
    out = subprocess.run([sys.executable, "-c", code], env={**base, "OMP_DISPLAY_ENV": "VERBOSE", **env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stderr


def test_import_hearthlm_bounds_libgomp_spin_before_torch_loads():
    """libgomp reads GOMP_SPINCOUNT once, when it loads (with torch): `import hearthlm` must set it before, without
    importing torch itself, and a user's own setting must reach libgomp unchanged. (torch's own libgomp is loaded
    directly: the same library and constructor as `import torch`, without torch's seconds of import.)"""
    gomp = _torch_libgomp()
    if gomp is None:
        pytest.skip("this torch build has no libgomp of its own")
    load = f"import sys, ctypes, hearthlm; assert 'torch' not in sys.modules; ctypes.CDLL({gomp!r})"
    assert f"GOMP_SPINCOUNT = '{threads.SPIN_COUNT}'" in _libgomp_env(load)
    assert "GOMP_SPINCOUNT = '123'" in _libgomp_env(load, GOMP_SPINCOUNT="123")


def test_spin_bound_is_not_inherited_by_child_processes():
    """Once torch has loaded libgomp, the engine takes back the GOMP_SPINCOUNT that `import hearthlm` set: a
    process it starts gets the user's environment; a user's own value stays."""
    code = ("import os, subprocess, sys, hearthlm, torch\n"
            "from hearthlm.runtime.threads import apply_threads\n"
            "before = os.environ.get('GOMP_SPINCOUNT'); apply_threads(1)\n"
            "child = subprocess.run([sys.executable, '-c', 'import os; print(os.environ.get(\"GOMP_SPINCOUNT\"))'],"
            " capture_output=True, text=True).stdout.strip()\n"
            "print(before, os.environ.get('GOMP_SPINCOUNT'), child)")
    base = {k: v for k, v in os.environ.items() if k not in threads.WAIT_ENV}
    for env, want in (({}, f"{threads.SPIN_COUNT} None None"), ({"GOMP_SPINCOUNT": "77"}, "77 77 77")):
        out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split("\n")[-2] == want


def test_engine_threads_applied(tiny):
    from hearthlm.config import EngineConfig
    from hearthlm.engine.engine import LLMEngine
    from hearthlm.kernels import cpu_quant

    before, before_native = torch.get_num_threads(), cpu_quant._threads
    try:
        torch.set_num_threads(2)
        LLMEngine(EngineConfig(model=tiny.path("llama"), dtype="float32", device="cpu", threads=1))
        assert torch.get_num_threads() == 1
        assert cpu_quant._threads == 1
        LLMEngine(EngineConfig(model=tiny.path("llama"), dtype="float32", device="cpu"))  # None: never raises
        assert torch.get_num_threads() == 1  # a count that was set lower, to more than the physical cores
        assert cpu_quant._threads == 1
    finally:
        torch.set_num_threads(before)
        cpu_quant.set_threads(before_native)


def _native_lib():
    from hearthlm.kernels import cpu_quant

    return cpu_quant.library()


def test_native_kernel_team_size_is_explicit():
    """The kernel's parallel regions take set_threads' count on any calling thread (OpenMP's default count is
    per thread, and a new thread starts from the process default), and its results do not depend on it."""
    import threading

    from hearthlm.kernels import cpu_quant

    lib = _native_lib()
    if lib is None:
        pytest.skip("no native CPU kernel here")
    before = cpu_quant._threads
    try:
        cpu_quant.set_threads(1)
        seen = []
        t = threading.Thread(target=lambda: seen.append(lib.hl_team_size()))  # a fresh OpenMP ICV: 2+ threads
        t.start()
        t.join()
        assert lib.hl_team_size() == 1 and seen == [1]
        cpu_quant.set_threads(2)
        assert lib.hl_team_size() == 2
        g = torch.Generator().manual_seed(0)
        n, k = 128, 512
        w = cpu_quant.pack(torch.randint(0, 16, (n, k), generator=g), torch.rand(n, k // 32, generator=g) * 0.01,
                           -torch.rand(n, k // 32, generator=g) * 0.05, 4)
        x = torch.randn(8, k, generator=g)
        outs = []
        for count in (1, 2):
            cpu_quant.set_threads(count)
            outs.append(cpu_quant.qmatmul(x, *w, out=torch.empty(8, n), lib=lib).clone())
        assert torch.equal(outs[0], outs[1])
    finally:
        cpu_quant.set_threads(before)


def test_kernel_build_status_line():
    """The first native-kernel build shows one status line (elapsed seconds, then done/failed) on a terminal."""
    import io

    from hearthlm.kernels import cpu_quant

    out = io.StringIO()
    cpu_quant._compile([sys.executable, "-c", "import time; time.sleep(0.3)"], stream=out, interval_s=0.05)
    text = out.getvalue()
    assert text.startswith("\r" + cpu_quant.STATUS) and text.count("\n") == 1 and "done in" in text
    out = io.StringIO()
    with pytest.raises(subprocess.CalledProcessError) as e:
        cpu_quant._compile([sys.executable, "-c", "import sys; sys.exit('no compiler')"], stream=out)
    assert "failed in" in out.getvalue() and "no compiler" in e.value.stderr


def _write_proc(root, busy: list[int], own: int) -> None:
    """A fake /proc: per-CPU busy ticks (all user time) and this process's own utime."""
    (root / "self").mkdir(parents=True, exist_ok=True)
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"] + [f"cpu{i} {b} 0 0 1000 0 0 0 0 0 0" for i, b in enumerate(busy)]
    (root / "stat").write_text("\n".join(lines) + "\nintr 0\n")
    fields = ["S"] + ["0"] * 10 + [str(own), "0"] + ["0"] * 30
    (root / "self" / "stat").write_text("123 (python (x)) " + " ".join(fields) + "\n")


def test_cpu_share_follows_the_neighbours_load(tmp_path, monkeypatch):
    applied = []
    monkeypatch.setattr(threads, "_set_kernel_threads", applied.append)
    share = threads.CpuShare(2, cpus={0, 1}, interval_s=0.1, proc=tmp_path)
    hz = share._hz

    def window(t: float, others: float, own: float = 1.0):  # one second: others' and our cores' worth of ticks
        busy = [b + int((others + own) * hz / 2) for b in window.busy]
        window.busy, window.own = busy, window.own + int(own * hz)
        _write_proc(tmp_path, busy, window.own)
        return share.poll(now=t)

    window.busy, window.own = [0, 0], 0
    assert window(0.0, 0) is None  # the first sample only starts a window
    assert window(0.05, 0, 0) is None  # inside interval_s: not read
    assert window(1.0, 1.0) == 1 and share.threads == 1 and applied == [1]  # a busy neighbour: one thread
    assert abs(share.others_cores - 1.0) < 0.05
    assert window(2.0, 0.15) is None  # hysteresis: a trace of load keeps one thread
    assert window(3.0, 0.0) == 2 and applied == [1, 2]  # gone: all threads again
    assert window(4.0, 0.1) is None  # noise floor
    assert window(5.0, 3.0) == 1  # more load than CPUs: still one thread
    one = threads.CpuShare(1, cpus={0, 1}, proc=tmp_path)
    assert one.poll(now=0.0) is None and one.poll(now=9.0) is None  # nothing to adapt


def test_cpu_share_without_proc_keeps_the_count(tmp_path):
    share = threads.CpuShare(2, cpus={0, 1}, proc=tmp_path / "none")
    assert share.poll(now=0.0) is None and share.poll(now=1.0) is None and share.threads == 2


def test_native_kernel_bits_do_not_depend_on_its_thread_count():
    """CpuShare changes the native kernel's team between steps: every count must give the same tokens and
    logprobs (the default model: its matmuls and attention run in the kernel)."""
    from hearthlm import LLM, SamplingParams
    from hearthlm.kernels import cpu_quant

    if not default_model_available() or _native_lib() is None:
        pytest.skip("needs the default model and the native CPU kernel")
    before, before_native = torch.get_num_threads(), cpu_quant._threads
    llm = LLM(device="cpu", max_model_len=256, num_kv_blocks=64, threads=2)
    llm.engine._cpu_share = None  # the test sets the count
    sp = SamplingParams(temperature=0.8, seed=3, max_tokens=8, logprobs=3)
    prompts = ["Once upon a time in a quiet village, there lived an old clockmaker who", "Hi"]
    try:
        outs = []
        for n in (1, 2):
            cpu_quant.set_threads(n)
            outs.append([(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in
                         llm.generate(prompts, sp, use_tqdm=False)])
        assert outs[0] == outs[1]
    finally:
        torch.set_num_threads(before)
        cpu_quant.set_threads(before_native)
