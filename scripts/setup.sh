#!/usr/bin/env bash
# One-shot, idempotent set-up of a pip-only development environment:
#   system packages (apt, when root) -> .venv with pinned wheels (ROS 2 Kilted from PyPI, torch CPU, MuJoCo, ...)
#   -> CMake path rewrite inside the venv -> irevla_interfaces built with CMake into the venv
#   -> irevla_ros installed editable with its console scripts.
# Each step is skipped when its inputs have not changed (stamp files under .venv/.irevla-stamps), so a second
# run takes seconds. On a robot with ROS 2 from apt use colcon instead (README, "Robots with a system ROS 2").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
STAMPS="$VENV/.irevla-stamps"
PYTHON="${PYTHON:-python3}"
T0=$(date +%s)
say() { printf '[setup %3ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
hash_of() { cat "$@" | sha256sum | cut -c1-16; }
stamp_ok() { [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]; }
stamp_set() { mkdir -p "$STAMPS"; echo "$2" > "$STAMPS/$1"; }

# 1. System packages -------------------------------------------------------------------------------------------
# libosmesa6: MuJoCo offscreen rendering without a GPU; libgl1: OpenCV/MuJoCo GL symbols; libusb-1.0-0:
# pyrealsense2; cmake, g++, python3-dev headers: building irevla_interfaces.
SYSTEM_PKGS=(libosmesa6 libgl1 libusb-1.0-0 cmake g++ make)
missing=()
for p in "${SYSTEM_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    say "installing system packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  elif command -v dpkg-query >/dev/null; then
    echo "setup: missing system packages: ${missing[*]}" >&2
    echo "setup: install them with:  sudo apt-get install -y ${missing[*]}   (then run this again)" >&2
    exit 1
  fi
fi

# 2. Virtual environment with pinned Python packages ----------------------------------------------------------
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
  || { echo "setup: Python 3.10+ is required (found $("$PYTHON" --version 2>&1))" >&2; exit 1; }
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
REQ_HASH=$(hash_of requirements.txt requirements.lock)
if ! stamp_ok requirements "$REQ_HASH"; then
  say "installing Python packages (pinned by requirements.lock; first run takes a few minutes)"
  "${PIP[@]}" install -q --upgrade pip
  "${PIP[@]}" install -q -r requirements.txt -c requirements.lock
  stamp_set requirements "$REQ_HASH"
else
  say "Python packages up to date"
fi

# 2b. LeRobotDataset v3 (irevla export/import lerobot): lerobot 0.4.4 is the newest release for Python 3.11 and pins
# torch<2.11, huggingface-hub<0.36 and opencv<4.13, all below this venv's; only its dataset code is used, so it goes
# in without its dependencies, next to the few its dataset code imports (resolved against requirements.lock).
# Its dataset code also imports torchvision, whose only wheel here is linked against the CUDA torch: installed in
# the venv it breaks transformers' model imports (BertModel: "torchvision::nms does not exist") everywhere. So it
# lives in its own folder, which only irevla_ros.interop.lerobot_dataset puts on sys.path.
LEROBOT_PKGS=(datasets==5.2.0 av==15.1.0 jsonlines==4.0.0 pandas==3.1.1 pyarrow==26.0.1)
LEROBOT_TORCHVISION=torchvision==0.28.0
LEROBOT_EXTRAS="$VENV/extras/lerobot"
LEROBOT_HASH=$(echo "lerobot==0.4.4 ${LEROBOT_PKGS[*]} extras:$LEROBOT_TORCHVISION" | sha256sum | cut -c1-16)
if ! stamp_ok lerobot "$LEROBOT_HASH"; then
  say "installing lerobot 0.4.4 dataset code (without its dependencies), ${LEROBOT_PKGS[*]}, and $LEROBOT_TORCHVISION in $LEROBOT_EXTRAS"
  "${PIP[@]}" install -q -c requirements.lock "${LEROBOT_PKGS[@]}"
  "${PIP[@]}" install -q --no-deps lerobot==0.4.4
  "${PIP[@]}" uninstall -q -y torchvision 2>/dev/null || true
  rm -rf "$LEROBOT_EXTRAS"
  "${PIP[@]}" install -q --no-deps --target "$LEROBOT_EXTRAS" "$LEROBOT_TORCHVISION"
  stamp_set lerobot "$LEROBOT_HASH"
fi

# 3. CMake path rewrite (inside the venv only) ------------------------------------------------------------------
# The ROS message wheels' exported CMake targets name include dirs of the machine that built them.
PY_INCLUDE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
NP_INCLUDE=$("$VENV/bin/python" -c 'import numpy; print(numpy.get_include())')
ver=$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
tag="cp${ver/./}-cp${ver/./}"
bad_files=$(grep -rl "/opt/python/$tag/" "$VENV/share"/*/cmake 2>/dev/null || true)
if [ -n "$bad_files" ]; then
  say "rewriting wheel-build include paths in $(echo "$bad_files" | wc -l) CMake files inside the venv"
  echo "$bad_files" | xargs sed -i \
    -e "s#/opt/python/$tag/lib/python$ver/site-packages/numpy/_core/include#$NP_INCLUDE#g" \
    -e "s#/opt/python/$tag/include/python$ver#$PY_INCLUDE#g"
fi

# 4. irevla_interfaces -> built with CMake, installed into the venv prefix --------------------------------------
IFACE_HASH=$(hash_of irevla_interfaces/package.xml irevla_interfaces/CMakeLists.txt irevla_interfaces/*/*)
if ! stamp_ok interfaces "$IFACE_HASH" || [ ! -d "$VENV/share/irevla_interfaces" ]; then
  say "building irevla_interfaces (rosidl: C, C++ and Python type support)"
  export AMENT_PREFIX_PATH="$VENV" CMAKE_PREFIX_PATH="$VENV"
  rm -rf build/irevla_interfaces; mkdir -p build
  cmake -S irevla_interfaces -B build/irevla_interfaces -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_INSTALL_PREFIX="$VENV" -DPython3_EXECUTABLE="$VENV/bin/python" -DBUILD_TESTING=OFF \
    > build/irevla_interfaces.configure.log 2>&1 \
    || { tail -30 build/irevla_interfaces.configure.log >&2; echo "setup: CMake configure failed (log above)" >&2; exit 1; }
  cmake --build build/irevla_interfaces -j "$(nproc)" > build/irevla_interfaces.build.log 2>&1 \
    || { tail -30 build/irevla_interfaces.build.log >&2; echo "setup: build failed (log above)" >&2; exit 1; }
  cmake --install build/irevla_interfaces > /dev/null
  stamp_set interfaces "$IFACE_HASH"
else
  say "irevla_interfaces up to date"
fi

# 4b. tf2_msgs (TFMessage only) when the wheels lack it: the arm controller publishes /tf, the servo backend reads it
TF2_HASH=$(hash_of third_party/tf2_msgs/package.xml third_party/tf2_msgs/CMakeLists.txt third_party/tf2_msgs/msg/*)
if [ ! -f "$VENV/share/tf2_msgs/irevla_vendored" ] && "$VENV/bin/python" -c 'import tf2_msgs.msg' 2>/dev/null; then
  say "tf2_msgs provided by the environment"
elif stamp_ok tf2_msgs "$TF2_HASH" && [ -f "$VENV/share/tf2_msgs/irevla_vendored" ]; then
  say "tf2_msgs up to date"
else
  say "building tf2_msgs (TFMessage only; the PyPI wheels have no tf2_msgs)"
  export AMENT_PREFIX_PATH="$VENV" CMAKE_PREFIX_PATH="$VENV"
  rm -rf build/tf2_msgs; mkdir -p build
  cmake -S third_party/tf2_msgs -B build/tf2_msgs -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_INSTALL_PREFIX="$VENV" -DPython3_EXECUTABLE="$VENV/bin/python" -DBUILD_TESTING=OFF \
    > build/tf2_msgs.configure.log 2>&1 \
    || { tail -30 build/tf2_msgs.configure.log >&2; echo "setup: CMake configure of tf2_msgs failed" >&2; exit 1; }
  cmake --build build/tf2_msgs -j "$(nproc)" > build/tf2_msgs.build.log 2>&1 \
    || { tail -30 build/tf2_msgs.build.log >&2; echo "setup: tf2_msgs build failed (log above)" >&2; exit 1; }
  cmake --install build/tf2_msgs > /dev/null
  touch "$VENV/share/tf2_msgs/irevla_vendored"
  stamp_set tf2_msgs "$TF2_HASH"
fi

# 5. irevla_ros, editable, with console scripts -----------------------------------------------------------------
PKG_HASH=$(hash_of irevla_ros/setup.py irevla_ros/setup.cfg irevla_ros/package.xml)
if ! stamp_ok package "$PKG_HASH" || [ ! -x "$VENV/bin/irevla" ]; then
  say "installing irevla_ros (editable) and its executables"
  "${PIP[@]}" install -q --no-deps --no-build-isolation -e irevla_ros
  stamp_set package "$PKG_HASH"
else
  say "irevla_ros up to date"
fi
say "ready: . scripts/env.sh  (or use the Makefile targets)"
