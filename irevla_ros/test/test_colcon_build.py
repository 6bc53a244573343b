"""The robot path: a plain `colcon build` of a workspace containing this repository builds both packages, installs
every executable where `ros2 run`/`ros2 launch` look for them, and the installed package finds its share files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from irevla_ros.entry_points import NODE_EXECUTABLES, TOOLS

REPO = Path(__file__).resolve().parents[2]


def test_plain_colcon_build_of_a_workspace(tmp_path):
    colcon = shutil.which("colcon") or str(Path(sys.executable).parent / "colcon")
    workspace = tmp_path / "ws"
    (workspace / "src").mkdir(parents=True)
    (workspace / "src" / "irevla").symlink_to(REPO)
    env = dict(os.environ, CMAKE_PREFIX_PATH=sys.prefix)
    result = subprocess.run(
        [
            colcon,
            "build",
            "--base-paths",
            "src",
            "--event-handlers",
            "console_cohesion-",
            "--cmake-args",
            f"-DPython3_EXECUTABLE={sys.executable}",
            "-DBUILD_TESTING=OFF",
        ],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "2 packages finished" in result.stdout, result.stdout[-2000:]
    install = workspace / "install"
    lib = install / "irevla_ros" / "lib" / "irevla_ros"
    assert {p.name for p in lib.iterdir()} >= set(NODE_EXECUTABLES) | set(TOOLS)
    share = install / "irevla_ros" / "share" / "irevla_ros"
    assert (share / "launch" / "collect.launch.py").is_file()
    assert {p.name for p in (share / "config").glob("*.yaml")} == {
        p.name for p in (REPO / "irevla_ros" / "config").glob("*.yaml")
    }

    # The installed packages, used from outside the source tree as a sourced workspace would.
    site = f"lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"
    run_env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [str(install / "irevla_ros" / site), str(install / "irevla_interfaces" / site)]
        ),
        AMENT_PREFIX_PATH=os.pathsep.join(
            [str(install / "irevla_ros"), str(install / "irevla_interfaces"), sys.prefix]
        ),
        LD_LIBRARY_PATH=os.pathsep.join(
            [str(install / "irevla_interfaces" / "lib"), os.environ.get("LD_LIBRARY_PATH", "")]
        ),
    )
    probe = (
        "import irevla_ros, irevla_interfaces.msg as m; from irevla_ros.paths import config_dir; "
        "print(irevla_ros.__file__); print(config_dir()); print(m.StepRecord.__module__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], env=run_env, capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert out.returncode == 0, out.stderr
    module_file, config, msg_module = out.stdout.split()
    assert str(install) in module_file, "the installed copy, not the source tree, was imported"
    assert Path(config) == share / "config"
    assert msg_module.startswith("irevla_interfaces.msg")
