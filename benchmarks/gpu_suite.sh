#!/usr/bin/env bash
# The GPU numbers in BENCHMARKS.md: run from the repo root on a CUDA machine. Logs go to ${OUT:-.}.
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
if [ -d .whl ]; then  # server dependencies carried as wheels onto machines without a package index
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
OUT=${OUT:-.}
B="python3 -m hearthlm.cli.main bench"
python3 -c "import torch, triton, transformers; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee $OUT/versions.log
timeout 120 python3 -m pytest -q tests/test_gpu.py 2>&1 | tail -5 | tee $OUT/gpu_tests.log
timeout 90 $B latency --preset qwen3-0.6b --batch 1 --output-len 256 --baseline hf 2>&1 | tee $OUT/lat_qwen.log
timeout 150 $B latency --preset llama-3.2-1b --batch 1 16 64 128 --input-len 512 --output-len 128 --baseline hf --hf-max-batch 1 2>&1 | tee $OUT/lat_1b.log
timeout 120 $B latency --preset llama-3.1-8b --batch 1 --output-len 128 --baseline hf --max-num-seqs 16 2>&1 | tee $OUT/lat_8b.log
# add --baseline hf-cb for HF's continuous batching on the same workload (about 200 s more)
timeout 120 $B throughput --preset qwen3-0.6b --num-requests 256 2>&1 | tee $OUT/throughput.log
timeout 90 $B prefix --preset llama-3.2-1b --prefix-len 2000 --num-requests 64 2>&1 | tee $OUT/prefix.log
DIR=/tmp/hearth-1b
timeout 150 $B coldstart --preset llama-3.2-1b --model $DIR 2>&1 | tail -3 | tee $OUT/coldstart.log
python3 -m hearthlm.cli.main serve $DIR --port 11499 --max-model-len 4096 > $OUT/serve.log 2>&1 &
for i in $(seq 1 90); do curl -s 127.0.0.1:11499/health >/dev/null && break; sleep 1; done
timeout 120 $B serving --url http://127.0.0.1:11499 --concurrency 16 --num-requests 64 --input-len 128 --output-len 128 2>&1 | tee $OUT/serving.log
kill %1 2>/dev/null; true
