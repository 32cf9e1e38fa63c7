#!/usr/bin/env bash
# The GPU machine's Python packages (Ray, MLflow, Optuna, rich, tokenizers) as one archive, .gpu/site.tar.xz.
# ../shared/gpu/build-bundle.sh builds it from our requirements list; we then drop MLflow's web UI
# and pygments (the GPU run never serves the UI or highlights code) so the bundle and a corpus shard fit the 64 MiB a device call carries.
set -euo pipefail
root=$(cd "$(dirname "$0")/../../.." && pwd); cd "$root"
../shared/gpu/build-bundle.sh runners/bench/device/requirements-gpu.txt .gpu
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
tar -xJf .gpu/site.tar.xz -C "$work"
rm -rf "$work"/mlflow/server/js "$work"/ray/tests "$work"/pygments  # pygments: only rich.syntax and mako's error pages
tar -C "$work" -cf - . | xz -9e -T2 > .gpu/site.tar.xz.new && mv .gpu/site.tar.xz.new .gpu/site.tar.xz
du -h .gpu/site.tar.xz
