# Source this to use the pip-only environment in a shell: . scripts/env.sh
_irevla_root="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)"
. "$_irevla_root/.venv/bin/activate"
# The ROS wheels install share/ament_index into the venv; the bootstrapper .pth sets LD_LIBRARY_PATH itself.
export AMENT_PREFIX_PATH="$VIRTUAL_ENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
export RMW_IMPLEMENTATION="${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}"
export MUJOCO_GL="${MUJOCO_GL:-osmesa}"
export PYOPENGL_PLATFORM="${PYOPENGL_PLATFORM:-osmesa}"
unset _irevla_root
