"""The one flag vocabulary (cli/flags.py): every alias parses to the same dest in every subcommand, bad values
name the flag, and the CLI's small promises: --version, a busy port refused before loading, quiet pipes,
human UNTIL times. Parsing only: nothing here loads a model (the busy-port test starts `hearth serve`, which
must give up before it would)."""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone

import pytest

from hearthlm.cli import flags
from hearthlm.cli.main import build_parser

HEARTH = [sys.executable, "-m", "hearthlm.cli.main"]
PARSER = build_parser()


def parse(*argv: str) -> argparse.Namespace:
    return PARSER.parse_args(list(argv))


def parse_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2
    return capsys.readouterr().err


# (subcommand prefix, dest, spellings, value given, value parsed): each spelling gives the same parsed value
SERVE_LIKE = [("serve",), ("bench", "latency")]
ALIASES = [
    ("max_model_len", ["--max-model-len", "-c", "--ctx-size"], "8k", 8192),
    ("max_num_seqs", ["--max-num-seqs", "-np", "--parallel"], "4", 4),
    ("gpu_layers", ["--gpu-layers", "-ngl", "--n-gpu-layers"], "12", 12),
    ("threads", ["-t", "--threads"], "3", 3),
    ("quantization", ["--quantization", "-q"], "int8", "int8"),
]


@pytest.mark.parametrize("cmd", [("serve",), ("bench", "latency")])
@pytest.mark.parametrize("dest, spellings, given, parsed", ALIASES)
def test_engine_aliases_share_one_dest(cmd, dest, spellings, given, parsed):
    if cmd[0] == "bench" and dest == "gpu_layers":
        pytest.skip("bench builds its model itself: no --gpu-layers")
    for flag in spellings:
        assert getattr(parse(*cmd, flag, given), dest) == parsed, flag


def test_every_engine_flag_reaches_llm_kwargs():
    import inspect

    from hearthlm.llm import LLM

    args = parse("serve", "-c", "1024", "-np", "2", "--max-num-batched-tokens", "512", "--kv-cache-memory", "64M",
                 "--no-prefix-caching", "--kv-cache-dtype", "int8", "-q", "int4", "-ngl", "auto",
                 "--gpu-memory-utilization", "0.5", "--compile", "--device", "cpu", "--dtype", "bf16", "--seed", "7",
                 "--batch-invariant", "-t", "2", "--cpu-kernel", "avx2", "--weights", "dequantize", "--kernels",
                 "torch", "--gemv", "off", "--cpu-dense-memory", "0")
    kw = flags.engine_kwargs(args)
    assert kw == dict(max_model_len=1024, max_num_seqs=2, max_num_batched_tokens=512, kv_cache_memory=64 << 20,
                      enable_prefix_caching=False, kv_cache_dtype="int8", quantization="int4", gpu_layers="auto",
                      gpu_memory_utilization=0.5, cpu_compile=True, device="cpu", dtype="bfloat16", seed=7,
                      batch_invariant=True, threads=2, cpu_kernel="avx2", weights="dequantize", kernels="torch",
                      gemv="off", cpu_dense_memory=0)
    assert set(kw) <= set(inspect.signature(LLM.__init__).parameters)
    defaults = flags.engine_kwargs(parse("serve"))
    assert defaults["dtype"] == "auto" and defaults["threads"] is None and defaults["cpu_compile"] is False
    assert defaults["enable_prefix_caching"] is True and defaults["batch_invariant"] is False


def test_serve_config_gets_every_flag():
    from hearthlm.cli.serve_cmd import config_from_args

    cfg = config_from_args(parse("serve", "m", "--parallel", "3", "--ctx-size", "2k", "-t", "2", "--batch-invariant",
                                 "--served-model-name", "a", "b"))
    assert (cfg.max_num_seqs, cfg.max_model_len, cfg.threads, cfg.batch_invariant) == (3, 2048, 2, True)
    assert cfg.served_model_name == ["a", "b"] and cfg.model_name == "a"
    assert config_from_args(parse("serve", "m")).model_name == "m"
    assert config_from_args(parse("serve")).model_name == "smollm2"


def test_served_names_resolve_to_the_command_line_model():
    from hearthlm.serve.models import ServeConfig

    cfg = ServeConfig(model="some/path.gguf", served_model_name=["a", "b"])
    assert all(cfg.names_served_model(n) for n in ("a", "b", "", "tgi", "dummy", "TGI"))
    assert not cfg.names_served_model("some/path.gguf") and not cfg.names_served_model("smollm2")
    plain = ServeConfig()
    assert plain.names_served_model("smollm2") and plain.names_served_model("tgi")
    assert not plain.names_served_model("other")


def test_old_spellings_still_parse_but_are_hidden():
    plan = parse("plan", "--ctx", "128k", "--concurrency", "3", "--quant", "q4_k_m")
    assert (plan.max_model_len, plan.max_num_seqs, plan.quantization) == ("128k", "3", "q4_k_m")
    assert (parse("plan", "-c", "128k", "-np", "3", "-q", "q4_k_m").max_model_len, plan.max_num_seqs) == ("128k", "3")
    ppl = parse("perplexity", "m", "-f", "x", "--ctx", "128", "--batch", "2")
    assert (ppl.max_model_len, ppl.max_num_seqs) == (128, 2)
    assert (parse("perplexity", "m", "-f", "x", "-c", "128", "-np", "2").max_model_len, ppl.max_num_seqs) == (128, 2)
    assert parse("quantize", "m", "--to", "q8_0", "-o", "x").quantization == "q8_0"
    assert parse("quantize", "m", "-q", "q8_0", "-o", "x").quantization == "q8_0"
    assert parse("bench", "latency", "--batch", "1", "16").batch_sizes == [1, 16]
    assert parse("bench", "latency", "--batch-sizes", "4").batch_sizes == [4]
    helps = {cmd: PARSER._subparsers._group_actions[0].choices[cmd].format_help()
             for cmd in ("plan", "perplexity", "quantize", "bench", "serve")}
    for cmd, old in [("plan", "--ctx "), ("plan", "--concurrency"), ("plan", "--quant "), ("perplexity", "--ctx "),
                     ("perplexity", "--batch"), ("quantize", "--to"), ("bench", "--batch ")]:
        assert old not in helps[cmd], (cmd, old)
    for cmd in ("plan", "perplexity", "serve", "bench"):
        assert "-c N, --ctx-size N" in helps[cmd] and "-np N, --parallel N" in helps[cmd], cmd
    assert "-ngl N|auto" in helps["serve"] and "-t N, --threads N" in helps["serve"]
    assert "--batch-invariant" in helps["serve"] and "batch-invariant always" in helps["serve"]


def test_the_typed_spelling_names_the_error(capsys):
    from hearthlm.cli import plan_cmd

    rc = plan_cmd.run(parse("plan", "qwen3-0.6b", "--ctx", "lots"))
    assert rc == 1 and "--ctx must be a whole number" in capsys.readouterr().err
    rc = plan_cmd.run(parse("plan", "qwen3-0.6b", "-c", "lots"))
    assert rc == 1 and "-c must be a whole number" in capsys.readouterr().err


def test_dtype_defaults_to_auto_everywhere():
    assert parse("serve").dtype == "auto"
    assert parse("bench", "latency").dtype == "auto"
    ppl = parse("perplexity", "m", "-f", "x")
    assert (ppl.dtype, ppl.device) == ("auto", "auto")
    assert parse("perplexity", "m", "-f", "x", "--dtype", "float32").dtype == "float32"
    assert parse("bench", "latency", "-q", "q4_k_m").quantization == "q4_k_m"  # bench's extra layout


@pytest.mark.parametrize("argv, names", [
    (("serve", "--dtype", "f64"), "argument --dtype"),
    (("serve", "-c", "lots"), "argument --max-model-len/-c/--ctx-size"),
    (("serve", "-np", "0"), "argument --max-num-seqs/-np/--parallel"),
    (("serve", "-ngl", "x"), "argument --gpu-layers/-ngl/--n-gpu-layers"),
    (("serve", "-t", "0"), "argument -t/--threads"),
    (("serve", "-q", "int3"), "argument --quantization/-q"),
    (("serve", "--kv-cache-dtype", "fp4"), "argument --kv-cache-dtype"),
    (("serve", "--gpu-memory-utilization", "2"), "argument --gpu-memory-utilization"),
    (("serve", "--kv-cache-memory", "lots"), "argument --kv-cache-memory"),
    (("bench", "latency", "-q", "q9"), "argument --quantization/-q"),
])
def test_bad_values_are_argparse_errors_naming_the_flag(capsys, argv, names):
    assert names in parse_error(capsys, *argv)


def test_constants_match_the_engine_and_planner_tables():
    from hearthlm.cli import plan_cmd
    from hearthlm.config import CPU_KERNELS, GEMVS, KERNELS, KV_CACHE_DTYPES, WEIGHTS
    from hearthlm.loader.load import QUANTIZATIONS
    from hearthlm.plan.memory import DEVICE_PRESETS, KV_DTYPE_BYTES, QUANTS
    from hearthlm.plan.presets import PRESETS

    assert tuple(flags.QUANTIZATIONS) == tuple(QUANTIZATIONS)
    assert tuple(flags.KV_CACHE_DTYPES) == tuple(KV_CACHE_DTYPES)
    assert (flags.CPU_KERNELS, flags.WEIGHTS, flags.KERNELS, flags.GEMVS) == (CPU_KERNELS, WEIGHTS, KERNELS, GEMVS)
    assert plan_cmd.HELP_PRESETS == tuple(PRESETS) and plan_cmd.HELP_QUANTS == tuple(QUANTS)
    assert plan_cmd.HELP_KV_DTYPES == tuple(KV_DTYPE_BYTES) and plan_cmd.HELP_DEVICES == tuple(DEVICE_PRESETS)


def test_serve_cmd_still_exports_the_old_helpers():
    from hearthlm.cli import serve_cmd

    p = argparse.ArgumentParser()
    serve_cmd.add_memory_args(p)
    serve_cmd.add_compile_arg(p)
    a = p.parse_args(["-ngl", "3", "--compile", "--kv-cache-dtype", "int8"])
    assert (a.gpu_layers, a.compile, a.kv_cache_dtype, a.quantization) == (3, True, "int8", "none")


def test_version_prints_without_torch():
    from importlib.metadata import version

    code = "import sys; from hearthlm.cli.main import main; main(['--version'])"
    out = subprocess.run([sys.executable, "-c", code + "\n"], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == f"hearth {version('hearthlm')}", out.stderr
    probe = ("import sys\nfrom hearthlm.cli.main import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n"
             "    pass\nprint('torch' in sys.modules, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.stderr.strip().endswith("False"), out.stderr


def test_busy_port_is_refused_fast_before_loading(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = dict(os.environ, HEARTH_HOME=str(tmp_path), HF_HUB_OFFLINE="1")
        t = time.monotonic()
        out = subprocess.run([*HEARTH, "serve", "--port", str(port)], capture_output=True, text=True, env=env,
                             timeout=30)
        took = time.monotonic() - t
    print(f"busy port refused in {took:.2f}s")
    assert out.returncode != 0 and took < 5, (took, out.stderr)
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr and "--port" in out.stderr
    assert "Traceback" not in out.stderr and "loaded" not in out.stderr


def test_closed_pipe_is_quiet(tmp_path):
    env = dict(os.environ, HEARTH_HOME=str(tmp_path))
    proc = subprocess.Popen([*HEARTH, "show", "smollm2", "--template"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # like `| head` that has read enough
    err = proc.stderr.read().decode()
    proc.wait(60)
    assert "BrokenPipeError" not in err and "Traceback" not in err, err


def test_ps_until_in_words():
    from hearthlm.cli.store_cmd import until

    now = time.time()

    def iso(dt: float) -> str:
        return datetime.fromtimestamp(now + dt, timezone.utc).isoformat()

    assert until(iso(299.6), now) == "4 minutes from now"
    assert until(iso(3600 * 2 + 5), now) == "2 hours from now"
    assert until(iso(1.5), now) == "1 second from now"  # (isoformat keeps microseconds only)
    assert until(iso(100 * 365 * 86400), now) == "Forever" and until(None) == "Forever"
    assert until(iso(-3), now) == "Stopping..."
    assert until("2030-01-01T00:00:00Z", datetime(2029, 12, 31, 23, 0, tzinfo=timezone.utc).timestamp()) == \
        "1 hour from now"


def test_kernel_and_memory_switches_reach_the_engine_config():
    """--weights/--kernels/--gemv/--cpu-dense-memory are EngineConfig fields (no environment variables), reached
    from the CLI through engine_kwargs and from the server through ServeConfig; bad values name the field."""
    from hearthlm.cli.main import build_parser
    from hearthlm.config import EngineConfig
    from hearthlm.errors import InvalidRequestError

    a = build_parser().parse_args(["serve", "m", "--weights", "quantized", "--kernels", "torch", "--gemv", "a16",
                                   "--cpu-dense-memory", "256M"])
    kw = flags.engine_kwargs(a)
    assert (kw["weights"], kw["kernels"], kw["gemv"], kw["cpu_dense_memory"]) == ("quantized", "torch", "a16",
                                                                                   256 << 20)
    cfg = EngineConfig(weights="Quantized", kernels="torch", gemv="OFF", cpu_dense_memory=0)
    assert (cfg.weights, cfg.kernels, cfg.gemv, cfg.cpu_dense_memory) == ("quantized", "torch", "off", 0)
    for field, bad in (("weights", "int4"), ("kernels", "cuda"), ("gemv", "a8"), ("cpu_dense_memory", -1)):
        with pytest.raises(InvalidRequestError) as e:
            EngineConfig(**{field: bad})
        assert e.value.param == field and field.replace("_", "-") in str(e.value) or field in str(e.value)
