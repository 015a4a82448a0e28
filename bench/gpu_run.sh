#!/usr/bin/env bash
# The full-size CUDA run on the lent H100 (../shared/gpu/README.md says how the machine gets onnxruntime-gpu; prepare
# with `bash ../shared/gpu/prepare_ortgpu.sh open-clip-torch==3.3.0`: the tokenizers' vocabulary comes from it):
#   bash bench/gpu_run.sh start    copy the repo to /tmp/sdxl/repo, start build + --optimize --provider cuda + benchmark
#                                  in the background (the UNet fusion alone takes ~10 min); VARIANTS=a,b picks the
#                                  benchmark's variants, UNET_VARIANTS=a@sdpa_kernel=8,... adds a UNet-only run after
#                                  it, LAST_VARIANTS=c,d a last whole-pipeline run, FP16_VAE_VARIANTS=e and
#                                  FP32_VAE_VARIANTS=f runs with the whole VAE decoder in fp16 / fp32
#                                  (bench/experiments/vae_variant.py), VARIANTS=none no benchmark; MEMORY_FIT=g,h runs
#                                  bench/memory_fit.py with those variants (budgets: MEMORY_BUDGETS, more tool
#                                  options for every trial: MEMORY_FIT_ARGS="--use_fp16_fixed_vae DIR" or
#                                  "--low_vram"; MEMORY_FIT_RUNS=2: two runs per process, as the window makes them;
#                                  first images kept in /tmp/sdxl/fit_images); while the CPU
#                                  builds, the GPU runs the gpu-marked tests, times the provider probe and tries
#                                  memory_fit.py on the tiny model (and bench/experiments/fp8_gemm.py with FP8=1: "side" job)
#   bash bench/gpu_run.sh controlnet  the model's build, the UNet with residual inputs and a full-size ControlNet built at
#                                  once (bench/controlnet.py --parallel_builds), then a ControlNet's cost per step
#                                  (1024², 20 steps; none / 1 / 2 ControlNets) in the background (controlnet.log),
#                                  the gpu-marked graph tests beside it (controlnet_tests.log)
#   bash bench/gpu_run.sh less_work  the model's build and DeepCache's graphs at once (bench/parallel_builds.py), then
#                                  bench/caching.py speed rows (less_work.log, caching_speed.jsonl): 4 steps with
#                                  the model's and a tiny VAE, 20 steps --cfg_cutoff 0.6 / both / off, batch 8
#                                  throughput, 30 steps, interval 2, batch 2 and 4; among them the
#                                  CUDA runners' gpu-marked tests (controlnet_tests.log), the UNet alone with one
#                                  CUDA graph per batch (bench/experiments/plain_step.py) and the denoising loop's
#                                  overhead (bench/benchmark.py --profile, loop_profile.json); all gpu-marked tests
#                                  beside the builds unless NO_TESTS=1
#                                  (CARRIED=1: builds carried from the CPU machine, no build here; see `carried`;
#                                  ROWS="profile;graphs": those rows only; `overhead`: the loop's time per step
#                                  beside the replay, bench/experiments/loop_overhead.py)
#   bash bench/gpu_run.sh stack    the Python stack without onnxruntime-gpu (carrying .gpuwheel); `ort` adds
#                                  onnxruntime-gpu once .gpu1 ... .gpu5 are in /tmp/parts: a build can start before it
#   bash bench/gpu_run.sh carried  builds made here and carried as graphs (bench/carry_build.py pack -> .carry,
#                                  .carry-vae) written out with fresh weights
#   bash bench/gpu_run.sh wait S   up to S seconds until less_work.log says DONE (or has UNTIL=text), then its tail
#   bash bench/gpu_run.sh tiny_loop  the tiny model: the loop's overhead (bench/benchmark.py --profile at 1024²), then
#                                  the gpu-marked tests, in the foreground (a few minutes: for a short lent session)
#   bash bench/gpu_run.sh loras    build + --optimize --provider cuda, then bench/loras.py (run-time LoRA switches,
#                                  s/step with and without; 1024², 20 steps), in the background (loras.log)
#   bash bench/gpu_run.sh tests    run the gpu-marked tests (tiny model) in the foreground
#   bash bench/gpu_run.sh survey   one run for every figure of the H200 issue, in the background: base and refiner
#                                  builds + --optimize in parallel on the CPU while the GPU runs the gpu-marked tests
#                                  and the PyTorch peers (eager, torch.compile); then the tool's variant, few-step
#                                  images (bench/few_step.py), --low_vram and the base -> refiner hand-off by the CLI
#   bash bench/gpu_run.sh train    train the demo model on the GPU in the background (sd_utils/demo_model/train.py)
#   bash bench/gpu_run.sh cputrain train the demo model on this machine's CPU (GPU hidden), then its quality check
#   bash bench/gpu_run.sh status   the background jobs' logs so far; copies results to $OUT
# Everything lives under /tmp/sdxl, which survives between commands sent to the same warm machine.
# A lease with carried builds, one call each: carrying .gpuwheel `bash bench/gpu_run.sh stack`; carrying .gpu1 ...
# .gpu4 `mkdir -p /tmp/parts && cp .gpuN/* /tmp/parts/`; carrying .gpu5 and .carry `cp .gpu5/* /tmp/parts/ && bash
# bench/gpu_run.sh ort && bash bench/gpu_run.sh carried && CARRIED=1 NO_TESTS=1 bash bench/gpu_run.sh less_work`;
# carrying .carry-vae `bash bench/gpu_run.sh carried`; then `bash bench/gpu_run.sh wait 500` calls back to back. The
# machine goes back after ~30 s without a call, /tmp/sdxl with it: keep a call in flight while thinking.
set -euo pipefail
MODEL=${MODEL:-random-sdxl-base}
WORK=/tmp/sdxl
export OLIVE_DISABLE_TELEMETRY=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site

# this checkout, without models and wheels, to $WORK/repo (which survives between commands), and the provider check
copy_repo() {
  mkdir -p "$WORK"
  rm -rf "$WORK/repo" && mkdir "$WORK/repo"
  tar --exclude='./.gpu*' --exclude='./.carry*' --exclude='./.git' --exclude='./models' --exclude='./cache' -cf - . | tar -xf - -C "$WORK/repo"
  cd "$WORK/repo"
  python3 -c "import onnxruntime as o; getattr(o, 'preload_dlls', lambda: 0)(); print(o.__version__, o.get_available_providers())"
}

case "${1:-}" in
  stack)
    # the project's Python stack without onnxruntime-gpu (carrying .gpuwheel): a CUDA build needs no CUDA provider, so
    # `NO_TESTS=1 bash bench/gpu_run.sh less_work` can start right after it while .gpu1 ... .gpu5 travel; then `ort`
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpuwheel/*.whl
    ;;
  carried)
    # the builds made on the CPU machine and carried without their weights (bench/carry_build.py; carrying .carry
    # and/or .carry-vae), with the built-in model's folder less its weights: their weights written again; after `stack`
    mkdir -p "$WORK"
    for folder in .carry .carry-vae; do
      [ -d "$folder" ] && python3 bench/carry_build.py unpack "$folder" "$WORK/models"
    done
    df -h /tmp | tail -n 1
    ;;
  ort)
    # onnxruntime-gpu alone from /tmp/parts (after `stack`): running builds keep the onnxruntime they imported
    whl=/tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
    cat /tmp/parts/part* > "$whl"
    grep -o "[0-9a-f]\{64\}" .gpuwheel/install.sh | sed "s|\$|  $whl|" | sha256sum -c -
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$whl"
    python3 -c "import torch, onnxruntime as o; o.preload_dlls(); print(o.__version__, o.get_available_providers())"
    ;;
  wait)
    # up to $2 seconds, until the less_work log says DONE (or holds $UNTIL); then its tail, results copied to $OUT
    for _ in $(seq "${2:-500}"); do
      grep -q "less_work DONE" "$WORK/less_work.log" 2>/dev/null && break
      [ -n "${UNTIL:-}" ] && grep -q -- "$UNTIL" "$WORK/less_work.log" 2>/dev/null && break
      sleep 1
    done
    tail -n "${LINES_SHOWN:-25}" "$WORK/less_work.log" || true
    df -h /tmp | tail -n 1
    bash bench/gpu_run.sh status > /dev/null
    ;;
  controlnet)
    copy_repo
    setsid nohup bash bench/gpu_run.sh controlnet_job > "$WORK/controlnet.log" 2>&1 < /dev/null &
    setsid nohup bash bench/gpu_run.sh controlnet_tests > "$WORK/controlnet_tests.log" 2>&1 < /dev/null &
    ;;
  controlnet_job)
    cd "$WORK/repo"
    echo "== builds (3 processes) + bench/controlnet.py $(date +%T)"
    python3 bench/controlnet.py --model_id "$MODEL" --provider cuda --models_dir "$WORK/models" --cache_dir \
      "$WORK/cache" --size 1024 --steps 20 --repeats 3 --parallel_builds 2>&1 | grep --line-buffered -E "^\{|rror|built|optimized" || true
    echo "== controlnet DONE $(date +%T)"
    ;;
  controlnet_tests)
    cd "$WORK/repo"
    python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_graphs.py 2>&1 | tail -n 15
    echo "== tests DONE $(date +%T)"
    ;;
  less_work)
    copy_repo
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    setsid nohup bash bench/gpu_run.sh less_work_job > "$WORK/less_work.log" 2>&1 < /dev/null &
    [ -n "${NO_TESTS:-}" ] || setsid nohup bash bench/gpu_run.sh controlnet_tests > "$WORK/controlnet_tests.log" 2>&1 < /dev/null &
    ;;
  less_work_job)
    cd "$WORK/repo"
    speed=(python3 bench/caching.py speed --model_id "$MODEL" --provider cuda --models_dir "$WORK/models"
      --cache_dir "$WORK/cache" --size 1024 --repeats 2)
    if [ -z "${CARRIED:-}" ]; then
      echo "== builds: the model's and DeepCache's graphs at once $(date +%T)"
      "${speed[@]}" --parallel_builds --steps_list= --cutoffs= --intervals 3 2>&1 | grep --line-buffered -E \
        "^\{|rror|built|optimized" || true
    fi
    while pgrep -f "gpu_run.sh controlnet_tests" > /dev/null; do sleep 5; done  # the GPU to itself
    build=$(dirname "$(ls -d "$WORK"/models/optimized/"$MODEL"-*/unet_refresh | head -n 1)")  # the DeepCache build
    # the rows by what they are worth, should the lent time end first (caching_speed.jsonl gets each as it comes); the
    # gpu-marked tests of the CUDA runners and the loop's profile among them
    # (sessions 20-22 measured every row once but the loop's GPU timeline in `profile`: what is left first)
    rows=(overhead profile graphs "--steps_list= --tiny_vae_steps 4 --repeats 3" tests "--steps_list 20 --cases 0.6:1,1:1"
      "--steps_list 20 --cases 0.6:3" "--steps_list= --batches 8 --cases 0.6:3"
      "--steps_list 30 --cutoffs= --intervals 3"
      "--steps_list 20 --cutoffs= --intervals 2 --no_baseline" "--steps_list= --batches 2,4 --cutoffs= --intervals=")
    [ -n "${ROWS:-}" ] && IFS=';' read -ra rows <<< "$ROWS"
    for row in "${rows[@]}"; do
      echo "== $row $(date +%T)"
      case "$row" in
        tests)
          python3 -m pytest -q -m gpu -p no:cacheprovider -p no:warnings --tb=short --show-capture=no \
            tests/test_gpu_graphs.py -k "${TESTS_K:-deep_cache or controlnet or heuristic or cutoff}" 2>&1 | tail -n 40 > "$WORK/controlnet_tests.log" || true
          tail -n 3 "$WORK/controlnet_tests.log"
          ;;
        graphs)
          # the UNet alone at batch 2 / 1 / 2 (--cfg_cutoff's batches): a session per batch, each its own CUDA graph,
          # on one copy of the weights, against a static session per batch (GRAPH_VARIANTS=...,free_graphs adds one
          # session replaying a graph per batch, which in session 22 ran a full-size image 10 minutes without ending)
          timeout 300 python3 bench/experiments/plain_step.py --model_dir "$WORK/models/builtin/$MODEL" --onnx_dir "$build" \
            --variants "${GRAPH_VARIANTS:-static,shared_graphs}" \
            2>&1 | grep -E "^\{|rror" | tee -a "$WORK/caching_speed.jsonl" || true
          ;;
        overhead)
          # where the loop's time per step goes beside the replay (bench/experiments/loop_overhead.py)
          timeout 300 python3 bench/experiments/loop_overhead.py --model_dir "$WORK/models/builtin/$MODEL" --onnx_dir "$build" \
            2>&1 | grep -E "^\{|rror" | tee -a "$WORK/caching_speed.jsonl" || true
          ;;
        profile)
          python3 bench/benchmark.py --model_dir "$WORK/models/builtin/$MODEL" --onnx_dir "$build" \
            --variants ort_optimized_cudagraph --profile --steps 30 --image_runs 3 > "$WORK/loop_profile.json" || true
          python3 bench/experiments/null_loop.py --model_dir "$WORK/models/builtin/$MODEL" --onnx_dir "$build" \
            --provider cuda --size 1024 --profile 2>&1 | grep -E "^\{|rror" | tee -a "$WORK/caching_speed.jsonl" || true
          ;;
        *)
          # shellcheck disable=SC2086 # the row's options, split
          "${speed[@]}" $row 2>&1 | grep --line-buffered -E "^\{|rror" | tee -a "$WORK/caching_speed.jsonl" || true
          ;;
      esac
    done
    echo "== less_work DONE $(date +%T)"
    ;;
  tiny_loop)
    # when the lent time is too short for a full-size build: the gpu-marked tests, then the denoising loop's own
    # overhead on the tiny model (its UNet step is short, so what the loop adds per step shows)
    copy_repo
    python3 stable_diffusion_xl.py --optimize --model_id tiny --provider cuda --models_dir "$WORK/models" \
      --cache_dir "$WORK/cache" 2>&1 | tail -n 1
    build=$(ls -d "$WORK"/models/optimized/tiny-* | head -n 1)
    python3 bench/benchmark.py --model_dir "$WORK/models/builtin/tiny" --onnx_dir "$build" --size "${SIZE:-1024}" \
      --variants ort_optimized_cudagraph --profile --steps 30 --image_runs 5 > "$WORK/loop_profile.json" || true
    [ -n "${OUT:-}" ] && cp "$WORK/loop_profile.json" "$OUT/"
    python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_graphs.py 2>&1 | tail -n 15
    ;;
  loras)
    copy_repo
    setsid nohup bash bench/gpu_run.sh loras_job > "$WORK/loras.log" 2>&1 < /dev/null &
    ;;
  loras_job)
    cd "$WORK/repo"
    echo "== optimize $(date +%T)"
    python3 stable_diffusion_xl.py --optimize --model_id "$MODEL" --provider cuda --models_dir "$WORK/models" \
      --cache_dir "$WORK/cache" 2>&1 | grep --line-buffered -E "^\[|optimized|rror|done in" || true
    echo "== loras $(date +%T)"
    python3 bench/loras.py --model_id "$MODEL" --provider cuda --models_dir "$WORK/models" --size 1024 --steps 20 \
      --rank 32 --repeats 3 2>&1 | grep --line-buffered -E "^\{|rror" || true
    echo "== loras DONE $(date +%T)"
    ;;
  start)
    copy_repo
    setsid nohup bash bench/gpu_run.sh pipeline > "$WORK/pipeline.log" 2>&1 < /dev/null &
    setsid nohup bash bench/gpu_run.sh side > "$WORK/side.log" 2>&1 < /dev/null &
    ;;
  side)
    cd "$WORK/repo"
    echo "== gpu tests $(date +%T)"
    python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_graphs.py tests/test_memory.py 2>&1 | tail -n 15
    echo "== provider probe $(date +%T)"
    python3 -c "
import time, torch, onnxruntime
onnxruntime.preload_dlls()
from sd_utils.providers import PROVIDERS, start_problem
for run in range(3):
    started = time.perf_counter(); problem = start_problem(PROVIDERS['cuda'])
    print('probe', run, problem, round(time.perf_counter() - started, 3), 's')"
    if [ -n "${MEMORY_FIT:-}" ]; then
      echo "== memory_fit.py on the tiny model $(date +%T)"
      python3 stable_diffusion_xl.py --optimize --model_id tiny --provider cuda --models_dir "$WORK/tiny_models" \
        --cache_dir "$WORK/tiny_cache" 2>&1 | tail -n 2
      python3 bench/memory_fit.py --models_dir "$WORK/tiny_models" --model_id tiny --size 128 --budgets 4,0.05 \
        --variants default > "$WORK/memory_fit_tiny.json"
    fi
    if [ -n "${FP8:-}" ]; then
      echo "== fp8 GEMMs $(date +%T)"
      until [ -f "$WORK/models/builtin/$MODEL/unet/config.json" ]; do sleep 5; done
      python3 bench/experiments/fp8_gemm.py --model_dir "$WORK/models/builtin/$MODEL" > "$WORK/fp8_gemm.json"
    fi
    echo "== side DONE $(date +%T)"
    ;;
  survey)
    copy_repo
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader
    setsid nohup bash bench/gpu_run.sh survey_cpu random-sdxl-base > "$WORK/optimize_base.log" 2>&1 < /dev/null &
    setsid nohup bash bench/gpu_run.sh survey_cpu random-sdxl-refiner > "$WORK/optimize_refiner.log" 2>&1 < /dev/null &
    setsid nohup bash bench/gpu_run.sh survey_gpu > "$WORK/pipeline.log" 2>&1 < /dev/null &
    ;;
  survey_cpu)
    cd "$WORK/repo"
    timer=""
    [ -x /usr/bin/time ] && timer="/usr/bin/time -v"
    $timer python3 stable_diffusion_xl.py --optimize --model_id "$2" --provider cuda \
      --models_dir "$WORK/models" --cache_dir "$WORK/cache_$2" 2>&1 | grep --line-buffered -vE "TracerWarning|^\s+(if|assert) "
    echo "== optimize $2 DONE $(date +%T)"
    ;;
  survey_gpu)
    cd "$WORK/repo"
    echo "== gpu tests $(date +%T)"
    python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_graphs.py tests/test_memory.py 2>&1 | tail -n 15
    until [ -f "$WORK/models/builtin/$MODEL/vae/config.json" ]; do sleep 5; done
    sleep 20  # the weights are written after the configs
    echo "== PyTorch peers $(date +%T)"
    python3 bench/benchmark.py --model_dir "$WORK/models/builtin/$MODEL" --variants torch_fp16,torch_compile \
      > "$WORK/benchmark_torch.json"
    until grep -q "^== optimize .* DONE" "$WORK/optimize_base.log"; do sleep 5; done
    optimized=$(ls -d "$WORK"/models/optimized/*base* | head -n 1)
    unoptimized=$(ls -d "$WORK"/models/unoptimized/*base* | head -n 1)
    echo "== the tool's variant $(date +%T): $optimized"
    python3 bench/benchmark.py --model_dir "$WORK/models/builtin/$MODEL" --onnx_dir "$optimized" \
      --unoptimized_dir "$unoptimized" --variants ort_optimized_cudagraph > "$WORK/benchmark.json"
    echo "== few-step $(date +%T)"
    python3 bench/few_step.py --onnx_dir "$optimized" --model_dir "$WORK/models/builtin/$MODEL" > "$WORK/few_step.json"
    echo "== --low_vram $(date +%T)"
    timer=""
    [ -x /usr/bin/time ] && timer="/usr/bin/time -v"
    start=$(date +%s)
    $timer python3 stable_diffusion_xl.py --model_id "$MODEL" --provider cuda --models_dir "$WORK/models" \
      --cache_dir "$WORK/cache_$MODEL" --prompt "a cat" --num_inference_steps 30 --seed 1 --low_vram \
      --output_dir "$WORK/out_low_vram" 2>&1 | grep -E "Generated|error|Maximum resident|Elapsed"
    echo "low_vram run took $(( $(date +%s) - start )) s"
    until grep -q "^== optimize .* DONE" "$WORK/optimize_refiner.log"; do sleep 5; done
    echo "== base -> refiner $(date +%T)"
    start=$(date +%s)
    $timer python3 stable_diffusion_xl.py --model_id "$MODEL" --refiner_model_id random-sdxl-refiner \
      --provider cuda --models_dir "$WORK/models" --cache_dir "$WORK/cache_$MODEL" --prompt "a cat" \
      --num_inference_steps 30 --seed 1 --output_dir "$WORK/out_refiner" 2>&1 | grep -E "Generated|error|Maximum resident|Elapsed"
    echo "hand-off run took $(( $(date +%s) - start )) s"
    nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
    echo "== DONE $(date +%T)"
    ;;
  tests)
    cd "$WORK/repo"
    python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_graphs.py tests/test_memory.py 2>&1 | tail -n 15
    ;;
  pipeline)
    cd "$WORK/repo"
    echo "== optimize $(date +%T)"
    timer=""
    [ -x /usr/bin/time ] && timer="/usr/bin/time -v"
    $timer python3 stable_diffusion_xl.py --optimize --model_id "$MODEL" --provider cuda \
      --models_dir "$WORK/models" --cache_dir "$WORK/cache" 2>&1 | grep --line-buffered -vE "TracerWarning|^\s+(if|assert) "
    python3 bench/experiments/fused_ops.py "$WORK/models/optimized/$MODEL" > "$WORK/fused_ops.json"
    df -h "$WORK"
    for precision in fp16 fp32; do
      variants=FP${precision#fp}_VAE_VARIANTS
      [ -n "${!variants:-}" ] || continue
      echo "== $precision VAE decoder $(date +%T)"
      rm -rf "$WORK/${precision}vae"
      python3 bench/experiments/vae_variant.py --precision $precision --model_dir "$WORK/models/builtin/$MODEL" \
        --onnx_dir "$WORK/models/optimized/$MODEL" --out "$WORK/${precision}vae" 2>&1 | tail -n 2
    done
    # the GPU to itself
    while pgrep -f "sd_utils.demo_model.train|gpu_run.sh side" > /dev/null; do sleep 5; done
    dirs=(--model_dir "$WORK/models/builtin/$MODEL" --onnx_dir "$WORK/models/optimized/$MODEL"
      --unoptimized_dir "$WORK/models/unoptimized/$MODEL")
    if [ -n "${MEMORY_FIT:-}" ]; then
      if [[ "${MEMORY_FIT_ARGS:-}" == *--use_fp16_fixed_vae* ]]; then  # rebuild (the cache has the rest) first
        python3 stable_diffusion_xl.py --optimize --model_id "$MODEL" --provider cuda --models_dir "$WORK/models" \
          --cache_dir "$WORK/cache" $MEMORY_FIT_ARGS 2>&1 | tail -n 3
      fi
      echo "== memory_fit.py $(date +%T)"
      python3 bench/memory_fit.py --models_dir "$WORK/models" --model_id "$MODEL" --variants "$MEMORY_FIT" \
        ${MEMORY_BUDGETS:+--budgets "$MEMORY_BUDGETS"} --tool_args="${MEMORY_FIT_ARGS:-}" --runs "${MEMORY_FIT_RUNS:-1}" \
        --keep_images "$WORK/fit_images" > "$WORK/memory_fit.json"
    fi
    if [ "${VARIANTS:-}" != none ]; then
      echo "== benchmark $(date +%T)"
      python3 bench/benchmark.py "${dirs[@]}" --profile ${VARIANTS:+--variants "$VARIANTS"} > "$WORK/benchmark.json"
    fi
    for precision in fp16 fp32; do
      variants=FP${precision#fp}_VAE_VARIANTS
      [ -n "${!variants:-}" ] || continue
      echo "== $precision VAE variants $(date +%T)"
      python3 bench/benchmark.py --model_dir "$WORK/models/builtin/$MODEL" --onnx_dir "$WORK/${precision}vae" \
        --unoptimized_dir "$WORK/models/unoptimized/$MODEL" --variants "${!variants}" \
        > "$WORK/benchmark_${precision}vae.json"
    done
    if [ -n "${UNET_VARIANTS:-}" ]; then
      echo "== UNet-only variants $(date +%T)"
      python3 bench/benchmark.py "${dirs[@]}" --unet_only --profile --variants "$UNET_VARIANTS" > "$WORK/unet_variants.json"
    fi
    if [ -n "${LAST_VARIANTS:-}" ]; then
      echo "== last variants $(date +%T)"
      python3 bench/benchmark.py "${dirs[@]}" --variants "$LAST_VARIANTS" > "$WORK/benchmark_last.json"
    fi
    echo "== DONE $(date +%T)"
    ;;
  train)
    cd "$WORK/repo"
    setsid nohup python3 -m sd_utils.demo_model.train --device cuda --out "$WORK/demo_weights" \
      > "$WORK/train.log" 2>&1 < /dev/null &
    ;;
  cputrain)
    # the training end to end on this machine's CPU (GPU hidden), then the quality check on what it made
    rm -rf "$WORK/cpurepo" && mkdir -p "$WORK/cpurepo"
    tar --exclude='./.gpu*' --exclude='./.carry*' --exclude='./.git' --exclude='./models' --exclude='./cache' -cf - . | tar -xf - -C "$WORK/cpurepo"
    cd "$WORK/cpurepo"
    CUDA_VISIBLE_DEVICES="" setsid nohup sh -c "python3 -m sd_utils.demo_model.train \
      --out sd_utils/demo_model/weights && python3 -m sd_utils.demo_model.quality --models_dir $WORK/cpu_models \
      --cache_dir $WORK/cpu_cache --guidance_scale 9 > $WORK/cpu_quality.json" > "$WORK/cpu_train.log" 2>&1 < /dev/null &
    ;;
  status)
    tail -n "${LINES_SHOWN:-25}" "$WORK/pipeline.log" || true
    tail -n 3 "$WORK/train.log" 2>/dev/null || true
    tail -n 3 "$WORK/cpu_train.log" 2>/dev/null || true
    cp "$WORK/cpurepo/sd_utils/demo_model/weights/settings.json" "$WORK/cpu_settings.json" 2>/dev/null || true
    tail -n "${LINES_SHOWN:-25}" "$WORK/side.log" 2>/dev/null || true
    tail -n 4 "$WORK/optimize_base.log" "$WORK/optimize_refiner.log" 2>/dev/null || true
    for f in less_work.log loop_profile.json caching_speed.jsonl controlnet_tests.log optimize_base.log optimize_refiner.log benchmark_torch.json few_step.json \
      pipeline.log side.log fused_ops.json benchmark.json benchmark_fp16vae.json benchmark_fp32vae.json \
      unet_variants.json memory_fit.json memory_fit_tiny.json \
      benchmark_last.json fp8_gemm.json \
      train.log cpu_train.log cpu_quality.json cpu_settings.json; do
      [ -f "$WORK/$f" ] && [ -n "${OUT:-}" ] && cp "$WORK/$f" "$OUT/"
    done
    if [ -d "$WORK/demo_weights" ] && [ -n "${OUT:-}" ]; then cp -r "$WORK/demo_weights" "$OUT/"; fi
    true
    ;;
  *)
    echo "usage: bash bench/gpu_run.sh start|side|tests|train|cputrain|status" >&2
    exit 2
    ;;
esac
