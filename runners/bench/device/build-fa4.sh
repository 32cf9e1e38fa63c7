#!/usr/bin/env bash
# Builds FlashAttention-4 (models/flash4.py) for the GPU machine (CPython 3.12, x86_64, torch 2.11 on CUDA 13, no
# network) as .fa4/a/part.00 and .fa4/b/part.01: one xz'd site tree (about 73 MB, mostly CuTe DSL's compiler) in
# two pieces, since a call carries at most 64 MiB. A first call carries .fa4/a (run.sh stash-fa4 keeps it on the
# machine), the next, within the 30 s the machine stays warm, carries .fa4/b with .gpu; run.sh puts it on the path.
# Usage, from the project root: runners/bench/device/build-fa4.sh   (a few minutes on 2 cores)
set -euo pipefail
WHEELS="flash-attn-4==4.0.0b36 quack-kernels==0.6.5 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
        nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 cuda-bindings==13.5.0 cuda-pathfinder==1.9.1
        protobuf==7.36.2 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 einops==0.8.1"
PLAT="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps $PLAT -d "$work/dl" $WHEELS
# Unzipped one by one: the cutlass wheels share the nvidia_cutlass_dsl/ tree, which pip --target would not merge.
for w in "$work"/dl/*.whl; do unzip -q -o "$w" -d "$work/site"; done
tar -C "$work/site" -cf - . | xz -9 -T2 > "$work/fa4.tar.xz"
rm -rf .fa4 && mkdir -p .fa4/a .fa4/b
split -b 63000000 -d "$work/fa4.tar.xz" "$work/part."
mv "$work/part.00" .fa4/a/ && mv "$work/part.01" .fa4/b/
du -h .fa4/*/part.*
