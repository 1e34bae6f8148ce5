#!/usr/bin/env bash
# Everything a lent GPU session runs, in one command (results under $OUT):
#   GPU tests (real CUDA graph capture vs eager, zero host syncs, Triton kernels compiled for the
#   GPU), the GPU benchmark suite (bench/gpu -> gpu.json + gpu_summary.json + gpu.md) and the
#   fused-kernel bandwidth script, and the C++ CUDA runner (built with the image's nvcc + CMake:
#   its ctest against the CPU sampler in every mode, then fastdiff_bench_cuda -> runtime_gpu.json).
# The device image has torch/triton/onnx but not diffusers/transformers: carry their wheels in
# wheels/ (pip download diffusers transformers tokenizers huggingface_hub safetensors
# open_clip_torch --no-deps -d wheels/); they are installed with --no-index into a scratch dir.
set -u
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G "wheels/*.whl" > /dev/null; then
  $PY -m pip install --quiet --no-index --no-deps --target /tmp/fastdiff-site wheels/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/fastdiff-site"
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
$PY -m fastdiff.cli info > "$OUT/info.txt" 2>&1
$PY -m pytest -q -p no:cacheprovider tests/test_backends.py tests/test_fused_step.py tests/test_loops.py \
  tests/test_gate.py tests/test_engine.py > "$OUT/gpu_tests.txt" 2>&1
echo "gpu tests: rc=$?" | tee -a "$OUT/gpu_tests.txt"
$PY bench/gpu_kernels.py --out "$OUT/gpu_kernels.json" > "$OUT/gpu_kernels.txt" 2>&1
echo "gpu kernels: rc=$?"
$PY -m pytest -q -p no:cacheprovider bench/gpu --benchmark-json="$OUT/gpu.json" > "$OUT/gpu_bench.txt" 2>&1
echo "gpu bench: rc=$?"
$PY bench/gpu_summary.py "$OUT/gpu.json" --out "$OUT" > "$OUT/gpu_summary.txt" 2>&1
echo "gpu summary: rc=$?"
cmake -S . -B build/cuda -DFASTDIFF_WITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DFASTDIFF_BUILD_TESTS=ON \
  > "$OUT/cuda_build.txt" 2>&1 && cmake --build build/cuda --parallel 16 >> "$OUT/cuda_build.txt" 2>&1
echo "cuda runner build: rc=$?" | tee -a "$OUT/cuda_build.txt"
(cd build/cuda && ctest --output-on-failure -R cuda_sampler) > "$OUT/cuda_ctest.txt" 2>&1
echo "cuda runner ctest: rc=$?" | tee -a "$OUT/cuda_ctest.txt"
build/cuda/fastdiff_bench_cuda --json "$OUT/runtime_gpu.json" > "$OUT/runtime_gpu.txt" 2>&1
echo "cuda runner bench: rc=$?" | tee -a "$OUT/runtime_gpu.txt"
build/cuda/fastdiff_bench_cuda --kernels 20 --shape 4,96,96 --json "$OUT/runtime_gpu_768.json" >> "$OUT/runtime_gpu.txt" 2>&1
tail -5 "$OUT"/*.txt
