#!/usr/bin/env bash
# The GPU machine's stages for issue 18 (Torch-TensorRT), each one device call:
#   bash benchmarks/gpu.sh install-libs carry [".trt/libs"] (TensorRT-RTX's libraries into /tmp/trt)
#   bash benchmarks/gpu.sh install      carry [".trt/whl"]  (right after: the wheels; /tmp/trt/OK)
#     The tree (3.9 MiB) and .trt (62 MiB) do not travel together (64 MiB a call), and .trt/libs
#     carried by one call was gone in the next (which carried .trt/whl), so the first call
#     unpacks the libraries outside the tree; /tmp lives while the machine is warm.
#   bash benchmarks/gpu.sh small        carry [".whl"]   (GPU tests, the 1B preset: studies, table)
#   bash benchmarks/gpu.sh study7b      carry [".whl"]   (the seed's scenario, by default: since the
#                                                         tenth session attention=auto, in PyTorch
#                                                         on 2.11; with --confirm; ~7 min)
#   bash benchmarks/gpu.sh probe2       carry [".whl"]   (round 2 of the probe; native 7B at 8 GiB)
#   bash benchmarks/gpu.sh probe3       carry [".whl"]   (round 3: attention left to PyTorch)
#   bash benchmarks/gpu.sh study7b-torch carry [".whl"]  (the seed's scenario, attention=torch:
#                                                         up to 2.12 its engines share one context
#                                                         buffer; trials only, ~9 min)
#   bash benchmarks/gpu.sh study7b-torch-confirm carry [".whl"] (right after: resumes it from
#                                                         the compiled-module cache, confirms)
#   bash benchmarks/gpu.sh probe18k     carry [".whl"]   (trt_memory.py, attention=torch, 8 layers
#                                                         at batch 35, kernel_specialization lazy,
#                                                         none, eager; ~5 min)
#   bash benchmarks/gpu.sh test18       carry [".whl"]   (the real package's GPU tests: tiny-llama,
#                                                         both attentions; ~5 min)
#   bash benchmarks/gpu.sh probe18      carry [".whl"]   (trt_memory.py, attention=torch engines at
#                                                         budget 0 after the fix; ~2.5 min)
#   bash benchmarks/gpu.sh held18      carry [".whl"]   (benchmarks/trt_held.py: what holds the budget-0
#                                                         memory of the seed's engine; ~9 min)
#   bash benchmarks/gpu.sh table7b      carry [".whl"]   (benchmarks/engines.py at 8 GiB, both orders)
#   bash benchmarks/gpu.sh probe        carry [".whl"]   (benchmarks/trt_memory.py: where memory goes)
# Issue 21 (8-bit weights, native engine; needs no Torch-TensorRT, so no install stage):
#   bash benchmarks/gpu.sh quanttest    carry [".whl"]   (first: the GPU tests of 8-bit weights,
#                                                         CUDA graphs and fp8 on the device; ~2 min)
#   bash benchmarks/gpu.sh quant        carry [".whl"]   (benchmarks/quantized.py: none/int8/fp8,
#                                                         llama2-7b 8GiB, llama2-13b 16GiB,
#                                                         llama3-8b 12GiB; about 9 minutes)
#   bash benchmarks/gpu.sh native7b     carry [".whl"]   (the native engine's own study, llama2-7b at
#                                                         8 GiB: the timed path through the fork-server
#                                                         workers, against 146.4 tok/s; ~4 min)
# Issue 22 (the decode step's kernels, native engine; no install stage):
#   bash benchmarks/gpu.sh decode22     carry [".whl"]   (GPU tests of the compiled step, then
#                                                         llama2-7b fp16 resident: unfused, fused,
#                                                         compiled, autotuned, graph profiles; ~8 min)
#   bash benchmarks/gpu.sh decode22b    carry [".whl"]   (bf16 resident, fused vs compiled; streaming
#                                                         llama3-8b at 12 GiB, budget 0; ~6 min)
#   bash benchmarks/gpu.sh decode22c    carry [".whl"]   (GPU tests of the Triton attention and the
#                                                         compiled step; llama2-7b fp16 resident,
#                                                         batches 1, 8, 32: fused, compiled, triton,
#                                                         compiled-triton, every step timed; ~8 min)
#   bash benchmarks/gpu.sh decode22d    carry [".whl"]   (bf16 resident, fused vs compiled-triton;
#                                                         streaming llama3-8b at 12 GiB, budget 0:
#                                                         in-budget vs in-budget-compiled-triton)
#   bash benchmarks/gpu.sh decode22e    carry [".whl"]   (decode22c's tests and fp16 rows again after
#                                                         the in-place residual GEMMs and RMSNorm back
#                                                         in the compiled unit; decode22d's streaming)
#   bash benchmarks/gpu.sh decode22f    carry [".whl"]   (decode22e, shorter: the graphs' GPU tests,
#                                                         fused, compiled, compiled-triton; ~5 min)
#   bash benchmarks/gpu.sh decode22g    carry [".whl"]   (benchmarks/gemv.py: cuBLAS against the
#                                                         kernels' 12 tilings; their GPU tests;
#                                                         llama2-7b fp16 at batches 1, 8: fused,
#                                                         compiled-triton, with gemv=triton and
#                                                         triton-all, and every Triton kernel
#                                                         (attention=triton-rope too); ~9 min)
#   bash benchmarks/gpu.sh decode22h    carry [".whl"]   (bf16 at 1, 8, 32 and fp16 at 32: fused,
#                                                         compiled-triton, compiled-all-triton;
#                                                         streaming llama3-8b 12 GiB, budget 0; int8
#                                                         weights at 1, 8: fused, all-triton; ~9 min)
#   bash benchmarks/gpu.sh decode22i    carry [".whl"]   (gate-up as one cuBLAS GEMM or two halves;
#                                                         GPU tests of the host-arena fixes and the
#                                                         rope kernel; fp16 and bf16 at batches 1, 8:
#                                                         fused, compiled-triton, compiled-triton-rope
#                                                         with the rope kernel unsplit at 384, and
#                                                         compiled-triton-halves: gate-up as two
#                                                         cuBLAS GEMMs (gemv=cublas-halves); ~9 min)
#   bash benchmarks/gpu.sh study22 [OPTIONS] carry [".whl"] (item 3: the native study of llama2-7b
#                                                         at 8 GiB, today's step (compile=false
#                                                         attention=sdpa), then OPTIONS (default
#                                                         "compile=auto attention=auto": the default))
#   bash benchmarks/gpu.sh default22    carry [".whl"]   (the faster step as the default: its GPU
#                                                         tests; fp16, bf16 at batches 1, 8: fused
#                                                         (today's step) and default; ~8 min)
# One call for a session with little device time left (~9 min; no install stage):
#   bash benchmarks/gpu.sh short        carry [".whl"]   (issue 21's llama2-7b and llama3-8b rows;
#                                                         issue 22's GPU tests and batches 1, 32)
# Logs and results go to $OUT (the device tool brings them back); see ../shared/gpu/README.md.
set -uo pipefail
stage=$1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ "$stage" = install-libs ]; then  # what .trt/install.sh does, in two calls
  set -e
  rm -rf /tmp/trt && mkdir -p /tmp/trt/tensorrt_rtx_libs /tmp/trt/tensorrt_rtx
  cp .trt/libs/__init__.py /tmp/trt/tensorrt_rtx_libs/
  gunzip -c .trt/libs/libtensorrt_onnxparser_rtx.so.1.gz \
    > /tmp/trt/tensorrt_rtx_libs/libtensorrt_onnxparser_rtx.so.1
  python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
    .trt/libs/libtensorrt_rtx.so.1.xz /tmp/trt/tensorrt_rtx_libs/libtensorrt_rtx.so.1
  echo "libraries unpacked; now, at once: bash benchmarks/gpu.sh install (carry .trt/whl)"
  exit 0
fi
if [ "$stage" = install ]; then
  [ -f /tmp/trt/tensorrt_rtx_libs/libtensorrt_rtx.so.1 ] || { echo "run install-libs first"; exit 3; }
  set -e
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/trt .trt/whl/*.whl
  # The module that PyPI's tensorrt-rtx-cu13 metapackage installs, as it is there.
  printf 'from tensorrt_rtx_bindings import *\nfrom tensorrt_rtx_bindings import __version__\n' \
    > /tmp/trt/tensorrt_rtx/__init__.py
  PYTHONPATH=/tmp/trt python3 -c "import torch, tensorrt_rtx, torch_tensorrt; print('torch', torch.__version__, '| tensorrt_rtx', tensorrt_rtx.__version__, '| torch_tensorrt', torch_tensorrt.__version__)" 2>&1 | tail -1
  touch /tmp/trt/OK && echo installed
  exit 0
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
if [[ ! "$stage" =~ ^(quant|quanttest|native7b|decode22|decode22b|decode22c|decode22d|decode22e|decode22f|decode22g|decode22h|decode22i|study22|short)$ ]]; then
  [ -f /tmp/trt/OK ] || { echo "fresh machine: run the install stage first"; exit 3; }
fi
export PYTHONPATH=/tmp/site:/tmp/trt:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
step() {  # step NAME SECONDS COMMAND...: one logged, time-limited step
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" | tee "$OUT/$name.log"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
  echo "rc=${PIPESTATUS[0]} wall=$((SECONDS - t0))s" | tee -a "$OUT/$name.log"
}
case $stage in
  small)
    step trt-1b 240 python3 -m autotune run --model llama3.2-1b --engine tensorrt --device cuda \
      --gpu-memory-limit 2GiB --trials 6 --storage "sqlite:///$OUT/1b.db" --study trt-1b \
      --out "$OUT/trt-1b.json"
    step pytest-gpu 150 python3 -m pytest -q -m gpu tests/test_tensorrt_gpu.py tests/test_engine_contract.py
    ;;
  study7b)
    step trt-7b 520 python3 -m autotune run --model llama2-7b --engine tensorrt \
      --gpu-memory-limit 8GiB --trials 4 --storage "sqlite:///$OUT/7b.db" --study trt-7b \
      --out "$OUT/trt-7b.json"
    step report-7b 40 python3 -m autotune report --out "$OUT/report-7b" --storage "sqlite:///$OUT/7b.db" --study trt-7b
    ;;
  probe)
    probe="python3 benchmarks/trt_memory.py --model llama2-7b"  # timeout runs programs, not functions
    step probe-base 200 $probe --variants base --layers 2,4 --max-batch 17,8 --json "$OUT/probe-base.json"
    step probe-kplain 80 $probe --variants kplain --layers 4 --json "$OUT/probe-kplain.json"
    step probe-chunk 80 $probe --variants base --layers 4 --chunk 8 --json "$OUT/probe-chunk.json"
    step probe-bmm 120 $probe --variants bmm --layers 4 --json "$OUT/probe-bmm.json"
    ;;
  probe2)  # round 2: keys untransposed (per layer: 2 and 4 layers), with chunk 8; pbmm
    probe="python3 benchmarks/trt_memory.py --model llama2-7b"
    step probe-kplain 150 $probe --variants kplain --layers 2,4 --json "$OUT/probe-kplain.json"
    step probe-kplain-chunk 80 $probe --variants kplain --layers 4 --chunk 8 --json "$OUT/probe-kplain-chunk.json"
    step probe-pbmm 170 $probe --variants pbmm --layers 4 --json "$OUT/probe-pbmm.json"
    step native-7b 220 python3 -m autotune run --model llama2-7b --gpu-memory-limit 8GiB \
      --storage "sqlite:///$OUT/native7b.db" --study native-7b --out "$OUT/native-7b.json"
    ;;
  probe3)  # round 3: --engine-option attention=torch (4 layers, then all 32 at max batch 32)
    probe="python3 benchmarks/trt_memory.py --model llama2-7b"
    step probe-torch 120 $probe --variants torch --layers 2,4 --json "$OUT/probe-torch.json"
    step probe-torch-32 300 $probe --variants torch --layers 32 --max-batch 32 --json "$OUT/probe-torch-32.json"
    ;;
  probe18)  # issue 18 after the fix: per-call engines, budgets set as the engine sets them
    step probe-torch-fixed 300 python3 benchmarks/trt_memory.py --model llama2-7b --variants torch \
      --layers 2,4,8 --json "$OUT/probe-torch-fixed.json"
    ;;
  probe18k)  # TensorRT-RTX's kernel specialization: memory and speed, 8 layers at batch 35
    for k in lazy none eager; do
      step "probe-torch-$k" 150 python3 benchmarks/trt_memory.py --model llama2-7b \
        --variants torch --layers 8 --max-batch 35 --kernel-specialization $k \
        --json "$OUT/probe-torch-$k.json"
    done
    ;;
  test18)  # the real package's GPU tests (attention=torch: the shared context buffer), tiny-llama
    step pytest-trt-gpu 400 python3 -m pytest -q -m gpu --durations=0 tests/test_tensorrt_gpu.py tests/test_engine_contract.py
    ;;
  study7b-torch|study7b-torch-confirm)
    # The seed's scenario with attention in PyTorch. Compile (~210 s), load and trials do not
    # leave the confirmation room in one call (575 s on 2026-12-06), so the first call stops
    # before it, and the second, right after (the machine warm: the study in /tmp, the compiled
    # module in ~/.cache), resumes the study from the cache and confirms.
    confirm=--no-confirm
    if [ "$stage" = study7b-torch-confirm ]; then confirm=--confirm; else rm -f /tmp/7b-torch.db*; fi
    step "trt-7b-${stage#study7b-}" 575 python3 -m autotune run --model llama2-7b \
      --engine tensorrt --engine-option attention=torch --gpu-memory-limit 8GiB --trials 4 \
      $confirm --storage "sqlite:////tmp/7b-torch.db" --study trt-7b-torch \
      --out "$OUT/trt-7b-torch.json"
    cp /tmp/7b-torch.db* "$OUT/" 2>/dev/null || echo "no study database was written"
    ;;
  held18)  # where the budget-0 memory goes: trt_held.py, compiling, then from the cache with
    # kernel_specialization=none (TensorRT-RTX compiles no kernel per shape)
    step held-lazy 390 python3 benchmarks/trt_held.py --json "$OUT/held-lazy.json"
    step held-none 170 python3 benchmarks/trt_held.py --kernel-specialization none \
      --json "$OUT/held-none.json"
    ;;
  table7b)
    step table-7b 590 python3 benchmarks/engines.py --model llama2-7b --limit 8GiB \
      --repeats 1 --decode-steps 8 --engines tensorrt,native --json "$OUT/table-7b.json"
    ;;
  native7b)
    step native-7b 300 python3 -m autotune run --model llama2-7b --gpu-memory-limit 8GiB \
      --storage "sqlite:///$OUT/native7b.db" --study native-7b --out "$OUT/native-7b.json"
    ;;
  quanttest)
    step quant-gpu-tests 150 python3 -m pytest -q -m gpu tests/test_quantization.py \
      tests/test_native_engine.py tests/test_streaming.py
    step quant-smoke-7b 150 python3 benchmarks/quantized.py --model llama2-7b --limit 8GiB \
      --fractions 0,0.5 --osl 64 --decode-steps 8 --accuracy-steps 8 --json "$OUT/quant-smoke-7b.json"
    ;;
  quant)
    quant="python3 benchmarks/quantized.py --precisions none,int8,fp8 --isl 128 --osl 256 --decode-steps 16 --repeats 1"
    step quant-llama2-7b 165 $quant --model llama2-7b --limit 8GiB --json "$OUT/quant-llama2-7b.json"
    step quant-llama2-13b 215 $quant --model llama2-13b --limit 16GiB --fractions 0,0.2,0.4,0.6 \
      --json "$OUT/quant-llama2-13b.json"
    step quant-llama3-8b 165 $quant --model llama3-8b --limit 12GiB --json "$OUT/quant-llama3-8b.json"
    ;;
  short)
    quant="python3 benchmarks/quantized.py --precisions none,int8,fp8 --isl 128 --osl 256 --decode-steps 16 --repeats 1"
    step quant-llama2-7b 165 $quant --model llama2-7b --limit 8GiB --json "$OUT/quant-llama2-7b.json"
    step quant-llama3-8b 165 $quant --model llama3-8b --limit 12GiB --json "$OUT/quant-llama3-8b.json"
    step decode22-tests 60 python3 -m pytest -q -m gpu tests/test_native_engine.py -k compiled
    step decode22-short 140 python3 benchmarks/decode.py --parts resident --batches 1,32 \
      --variants fused,compiled,autotuned --repeats 3 --json "$OUT/decode22-short.json"
    ;;
  decode22)
    step triton 30 python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
    step decode22-tests 120 python3 -m pytest -q -m gpu tests/test_native_engine.py -k compiled
    step decode22-fp16 400 python3 benchmarks/decode.py --parts resident --graph-profile \
      --json "$OUT/decode22-fp16.json"
    ;;
  decode22b)
    step decode22-bf16 240 python3 benchmarks/decode.py --parts resident --dtype bfloat16 \
      --variants fused,compiled --json "$OUT/decode22-bf16.json"
    step decode22-stream 300 python3 benchmarks/decode.py --parts streaming \
      --variants embed-head-in-budget,in-budget-compiled --json "$OUT/decode22-stream.json"
    ;;
  decode22c)
    step decode22c-tests 150 python3 -m pytest -q -m gpu tests/test_attention.py \
      tests/test_native_engine.py -k "compiled or triton or kernel"
    step decode22c-fp16 420 python3 benchmarks/decode.py --parts resident --graph-profile \
      --variants fused,compiled,triton,compiled-triton --decode-steps 256 --repeats 3 \
      --json "$OUT/decode22c-fp16.json"
    ;;
  decode22d)
    step decode22d-bf16 220 python3 benchmarks/decode.py --parts resident --dtype bfloat16 \
      --batches 1,32 --variants fused,compiled-triton --decode-steps 256 --repeats 3 \
      --json "$OUT/decode22d-bf16.json"
    step decode22d-stream 330 python3 benchmarks/decode.py --parts streaming \
      --variants embed-head-in-budget,in-budget-compiled-triton --osl 64 --repeats 2 \
      --json "$OUT/decode22d-stream.json"
    ;;
  decode22e)
    step decode22e-tests 150 python3 -m pytest -q -m gpu tests/test_attention.py \
      tests/test_native_engine.py -k "compiled or triton or kernel or graphs_equal"
    step decode22e-fp16 300 python3 benchmarks/decode.py --parts resident --graph-profile \
      --variants fused,compiled,triton,compiled-triton --decode-steps 256 --repeats 3 \
      --shortcut-check 32 \
      --json "$OUT/decode22e-fp16.json"
    step decode22e-stream 200 python3 benchmarks/decode.py --parts streaming \
      --variants embed-head-in-budget,in-budget-compiled-triton --osl 64 --repeats 2 \
      --json "$OUT/decode22e-stream.json"
    ;;
  decode22f)
    step decode22f-tests 70 python3 -m pytest -q -m gpu tests/test_native_engine.py -k graphs
    step decode22f-fp16 170 python3 benchmarks/decode.py --parts resident --graph-profile \
      --variants fused,compiled,compiled-triton --decode-steps 256 --repeats 3 \
      --shortcut-check 32 --json "$OUT/decode22f-fp16.json"
    step decode22f-stream 170 python3 benchmarks/decode.py --parts streaming \
      --variants embed-head-in-budget,in-budget-compiled-triton --osl 64 --repeats 2 \
      --json "$OUT/decode22f-stream.json"
    ;;
  decode22g)
    step decode22g-sweep 170 python3 benchmarks/gemv.py --block-n 16,32 --block-k 128,256 \
      --warps 4 --stages 3,4,5 --json "$OUT/decode22g-sweep.json"
    step decode22g-tests 120 python3 -m pytest -q -m gpu tests/test_gemv.py tests/test_attention.py \
      -k "gemv or norm or rope or every"
    # Two runs of at most 4 resident llama2-7b engines (13.5 GB each): 6 at once need about
    # 90 GB, more than an H100 holds. Each has the fused baseline its ratios refer to.
    step decode22g-float16a 110 python3 benchmarks/decode.py --parts resident --batches 1,8 \
      --graph-profile --decode-steps 256 --repeats 3 \
      --variants fused,compiled-triton,compiled-triton-gemv --json "$OUT/decode22g-float16a.json"
    step decode22g-float16b 140 python3 benchmarks/decode.py --parts resident --batches 1,8 \
      --graph-profile --decode-steps 256 --repeats 3 \
      --variants fused,compiled-triton-gemv-all,all-triton,compiled-all-triton \
      --json "$OUT/decode22g-float16b.json"
    ;;
  decode22i)  # after the H100 run: the rope kernel unsplit on short caches; the fixes' GPU tests
    step decode22i-gateup 60 python3 benchmarks/gemv.py --kernels norm --rows 1,8,16 \
      --block-n 32 --block-k 128 --warps 4 --stages 3 --json "$OUT/decode22i-gateup.json"
    step decode22i-tests 150 python3 -m pytest -q -m gpu tests/test_streaming.py \
      tests/test_attention.py tests/test_gemv.py -k "registration or dropped or rope or halves"
    step decode22i-float16 170 python3 benchmarks/decode.py --parts resident --batches 1,8 \
      --graph-profile --decode-steps 256 --repeats 3 \
      --variants fused,compiled-triton,compiled-triton-rope,compiled-triton-halves \
      --json "$OUT/decode22i-float16.json"
    step decode22i-bfloat16 160 python3 benchmarks/decode.py --parts resident --dtype bfloat16 \
      --batches 1,8 --decode-steps 256 --repeats 3 \
      --variants fused,compiled-triton,compiled-triton-rope,compiled-triton-halves \
      --json "$OUT/decode22i-bfloat16.json"
    ;;
  default22)  # the faster step as the default: its GPU tests, then it beside today's step
    step default22-tests 200 python3 -m pytest -q -m gpu tests/test_native_engine.py \
      tests/test_attention.py -k "default_step or graphs_equal_eager or triton_attention_generates"
    for dtype in float16 bfloat16; do
      step "default22-$dtype" 150 python3 benchmarks/decode.py --parts resident --dtype $dtype \
        --batches 1,8 --decode-steps 256 --repeats 3 --variants fused,default \
        --json "$OUT/default22-$dtype.json"
    done
    ;;
  decode22h)
    step decode22h-bfloat16 170 python3 benchmarks/decode.py --parts resident --dtype bfloat16 \
      --batches 1,8,32 --decode-steps 256 --repeats 3 \
      --variants fused,compiled-triton,compiled-all-triton --json "$OUT/decode22h-bfloat16.json"
    step decode22h-float16 120 python3 benchmarks/decode.py --parts resident --batches 32 \
      --decode-steps 256 --repeats 3 --variants fused,compiled-triton,compiled-all-triton \
      --json "$OUT/decode22h-float16.json"
    step decode22h-stream 150 python3 benchmarks/decode.py --parts streaming --osl 64 --repeats 2 \
      --variants embed-head-in-budget,in-budget-compiled-all-triton --json "$OUT/decode22h-stream.json"
    step decode22h-int8 100 python3 benchmarks/decode.py --parts resident --quantization int8 \
      --batches 1,8 --decode-steps 256 --repeats 3 --variants fused,all-triton \
      --json "$OUT/decode22h-int8.json"
    ;;
  study22)  # optional second argument: the faster path's engine options, space-separated
    # "today": the step before issue 22, pinned (since then the default is the faster one).
    faster=(${2:-compile=auto attention=auto})
    for variant in today faster; do
      options=(--engine-option compile=false --engine-option attention=sdpa)
      if [ "$variant" = faster ]; then
        options=()
        for o in "${faster[@]}"; do options+=(--engine-option "$o"); done
      fi
      step "study22-$variant" 285 python3 -m autotune run --model llama2-7b --gpu-memory-limit 8GiB \
        "${options[@]}" --storage "sqlite:///$OUT/study22.db" --study "native-7b-$variant" \
        --out "$OUT/study22-$variant.json"
    done
    ;;
esac
