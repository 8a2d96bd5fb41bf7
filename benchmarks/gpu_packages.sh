#!/usr/bin/env bash
# The Python packages a bare GPU machine lacks for benchmarks/gpu_suite.sh, packed on a machine with package access.
#
#   bash benchmarks/gpu_packages.sh [DIR]      # default DIR: .whl (git-ignored); writes DIR/site.tar.xz (~40 MiB)
#
# The GPU image it was prepared for (Python 3.12, x86-64; torch, lightning 2.6, transformers 5.17, no network)
# lacks DeepSpeed, jsonargparse, spaCy, datasets and pycocotools, and holds an older transformers than the suite
# is tested with. This fetches the versions installed here (the tested set; PINS="a==1 b==2" overrides) as
# cp312 manylinux wheels without their dependencies, builds DeepSpeed's pure-Python wheel (PyPI has its source
# only; its CUDA ops compile on first use and the suite uses none), installs them all into one folder for
# Python 3.12 and packs it with xz: as wheels they would pass the device tool's 64 MiB limit. There:
#
#   python3 -c "import tarfile; tarfile.open('DIR/site.tar.xz').extractall('/tmp', filter='data')"
#   export PYTHONPATH=/tmp/site
set -euo pipefail

DIR=${1:-.whl}
PYTHON=${PYTHON:-python3}
# what the GPU image lacks (or holds too old), the dependencies included; everything else it has
NAMES=(jsonargparse docstring_parser typeshed_client
       spacy spacy-legacy spacy-loggers murmurhash cymem preshed thinc blis wasabi srsly catalogue weasel confection
       cloudpathlib smart_open pydantic pydantic_core annotated-types typing-inspection
       datasets dill multiprocess pycocotools hjson transformers huggingface_hub regex peft)

version_here() {  # the installed version of $1, or nothing
    "$PYTHON" -c 'import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass' "$1"
}

if [[ -z ${PINS:-} ]]; then
    pins=()
    for name in "${NAMES[@]}"; do
        v=$(version_here "$name")
        [[ -n $v ]] ||
            { echo "gpu_packages.sh: $name is not installed here: pip install -e '.[test]' first" >&2; exit 1; }
        pins+=("$name==$v")
    done
else
    read -r -a pins <<<"$PINS"
fi
ds=$(version_here deepspeed)
[[ -n $ds ]] || { echo "gpu_packages.sh: deepspeed is not installed here: pip install -e '.[test]' first" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
platform=(--python-version 3.12 --implementation cp --only-binary=:all:)
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platform+=(--platform "${tag}_x86_64")  # pip matches each tag exactly
done
"$PYTHON" -m pip download -q --no-deps "${platform[@]}" -d "$tmp/wheels" "${pins[@]}"
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$tmp/wheels" "deepspeed==$ds"
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile "${platform[@]}" --target "$tmp/site" "$tmp"/wheels/*.whl
mkdir -p "$DIR"
printf '%s\n' "${pins[@]}" "deepspeed==$ds" >"$DIR/PINS.txt"
tar -C "$tmp" -cf - site | xz -9 -T2 >"$DIR/site.tar.xz.part"
mv "$DIR/site.tar.xz.part" "$DIR/site.tar.xz"
count=$(ls "$tmp"/wheels/*.whl | wc -l)
echo "$count packages for Python 3.12 in $DIR/site.tar.xz ($(du -h "$DIR/site.tar.xz" | cut -f1))"
