#!/usr/bin/env bash
# Creates (or updates) the project's virtual environment at .venv/ in the repo root.
#
#   bash tools/setup_env.sh          # torch 2.14.1 + torchvision 0.29.1 + vim2 (editable) + dev tools
#   bash tools/setup_env.sh --mm     # ... plus the OpenMMLab stack (mmengine, mmcv with ops, mmdet, mmseg)
#
# Idempotent: a second run with unchanged inputs only checks a stamp file and returns in about a second.
# mmcv 2.1.0 ships no wheel for torch 2.14, so it is built from source once (about 30 minutes on
# 2 cores) and the wheel cached in $VIM2_WHEEL_CACHE (default ~/.cache/vim2/wheels). A matching wheel
# already present there, in $VIM2_EXTRA_WHEELS or in ../shared/wheels is reused instead.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
with_mm=0
for arg in "$@"; do
  case "$arg" in
    --mm) with_mm=1 ;;
    -h|--help) sed -n '2,11p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "setup_env.sh: unknown option '$arg' (known: --mm)" >&2; exit 2 ;;
  esac
done

TORCH_SPEC="torch==${VIM2_TORCH_VERSION:-2.14.1}"
TORCHVISION_SPEC="torchvision==${VIM2_TORCHVISION_VERSION:-0.29.1}"
MMCV_VERSION="2.1.0"
wheel_cache="${VIM2_WHEEL_CACHE:-$HOME/.cache/vim2/wheels}"
mkdir -p "$wheel_cache"

python_bin="${PYTHON:-}"
if [[ -z "$python_bin" ]]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python_bin="$candidate"; break; fi
  done
fi

# The stamp covers everything that decides what gets installed.
stamp_key="$(cat "$root/pyproject.toml" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)-mm$with_mm"
stamp="$venv/.vim2-setup-$stamp_key"
if [[ -f "$stamp" ]]; then
  echo "setup_env: .venv is up to date ($stamp_key)"
  exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
  echo "setup_env: creating $venv with $python_bin"
  "$python_bin" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

echo "setup_env: installing $TORCH_SPEC $TORCHVISION_SPEC"
# setuptools<81: mmcv's setup.py and mmengine import pkg_resources, removed in setuptools 81.
"${pip[@]}" install -q "$TORCH_SPEC" "$TORCHVISION_SPEC" "setuptools>=64,<81" wheel

if [[ $with_mm == 1 ]]; then
  if "$venv/bin/python" -c "import mmcv, mmcv.ops, sys; sys.exit(mmcv.__version__ != '$MMCV_VERSION')" 2>/dev/null; then
    echo "setup_env: mmcv $MMCV_VERSION with ops already installed"
  else
    find_links=(--find-links "$wheel_cache")
    for extra in "${VIM2_EXTRA_WHEELS:-}" "$root/../shared/wheels"; do
      [[ -n "$extra" && -d "$extra" ]] && find_links+=(--find-links "$extra")
    done
    # Needed to import/build mmcv; installed before mmcv so a source build can see them.
    "${pip[@]}" install -q "mmengine>=0.10.4,<0.11" ninja
    if "${pip[@]}" install -q "${find_links[@]}" --only-binary mmcv "mmcv==$MMCV_VERSION" 2>/dev/null; then
      echo "setup_env: mmcv $MMCV_VERSION installed from a cached wheel"
    else
      echo "setup_env: no cached mmcv wheel; building mmcv $MMCV_VERSION from source (about 30 min on 2 cores)"
      build_dir="$(mktemp -d)"
      trap 'rm -rf "$build_dir"' EXIT
      "${pip[@]}" download -q --no-deps --no-binary :all: "mmcv==$MMCV_VERSION" -d "$build_dir"
      tar -xzf "$build_dir"/mmcv-*.tar.gz -C "$build_dir"
      src="$(ls -d "$build_dir"/mmcv-*/)"
      # torch >= 2.10 headers need C++20; mmcv 2.1.0 hard-codes C++17.
      sed -i 's/-std=c++17/-std=c++20/g' "$src/setup.py"
      (cd "$src" && MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
        "${pip[@]}" wheel -q --no-build-isolation --no-deps -w "$wheel_cache" .)
      "${pip[@]}" install -q --find-links "$wheel_cache" --only-binary mmcv "mmcv==$MMCV_VERSION"
      echo "setup_env: built and cached $(ls "$wheel_cache"/mmcv-*.whl)"
    fi
  fi
  extras="dev,train,bench,mm"
else
  extras="dev,train,bench"
fi

echo "setup_env: installing vim2 (editable) with extras [$extras]"
"${pip[@]}" install -q -e "$root[$extras]"

rm -f "$venv"/.vim2-setup-*
touch "$stamp"
echo "setup_env: done ($("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
