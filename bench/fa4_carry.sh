#!/usr/bin/env bash
# Packs FlashAttention 4 (flash-attn-4) and the packages it needs beyond the device image into .fa4/site.tar.xz, for
# gpu_check.py's attention stage on the device machine (Python 3.12, x86-64, CUDA 13; it reaches no index). The wheels
# are 102 MB as pip ships them, over the 64 MiB a device call carries; unpacked and re-compressed with xz's x86 filter
# they come to about 58 MB. Needs pip access to an index here, and about 5 minutes (the xz pass runs on one core).
#
#   bash bench/fa4_carry.sh                        # writes .fa4/site.tar.xz (.gitignore has .fa4/)
#   then a device call with carry [".fa4"], its command starting
#   python3 -c "import tarfile; tarfile.open('.fa4/site.tar.xz').extractall('.fa4/site', filter='data')" &&
#   export PYTHONPATH=$PWD/.fa4/site:$PWD/.fa4/site/nvidia_cutlass_dsl/dsl_packages || exit;
# (Python's tarfile decodes the x86 filter through liblzma: 3.5 s here, and needs no xz binary there.)
#
# The second PYTHONPATH entry stands in for nvidia-cutlass-dsl's .pth file, which Python reads only in site folders.
# train_gpt.py never imports FA4 (its autograd.Function does not compile in a full graph); gpu_check.py times it eager.
set -euo pipefail
cd "$(dirname "$0")/.."
PINS=(flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
      nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi==0.1.15.post2
      torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5)  # the image has torch, einops, cuda-bindings and protobuf
OUT=.fa4  # in .gitignore
if [ -e "$OUT/site.tar.xz" ]; then
  echo "fa4_carry: $OUT/site.tar.xz exists; remove it to rebuild" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --pre --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$work/wheels" "${PINS[@]}"
mkdir -p "$work/site" "$OUT"
for w in "$work"/wheels/*.whl; do
  python3 -m zipfile -e "$w" "$work/site"
done
tar cf - -C "$work/site" . | xz --x86 --lzma2=preset=9e,dict=192MiB > "$work/site.tar.xz"
mv "$work/site.tar.xz" "$OUT/site.tar.xz"
ls -l "$OUT/site.tar.xz"
