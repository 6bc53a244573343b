"""Where the package's shared files (config/, launch/, models/) are.

Installed by colcon they are in the package's share directory; in a pip editable install they are in the source
tree next to this module. The source tree wins when present, so edits are seen without a rebuild.
"""

from __future__ import annotations

import os
from pathlib import Path

_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def package_root() -> Path:
    if (_SOURCE_ROOT / "config").is_dir() and (_SOURCE_ROOT / "package.xml").is_file():
        return _SOURCE_ROOT
    try:
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory("irevla_ros"))
    except Exception as exc:  # PackageNotFoundError, or ament_index missing on a bare machine
        raise FileNotFoundError(
            "irevla_ros share directory not found: source the workspace (colcon) or run scripts/setup.sh"
        ) from exc


def config_dir() -> Path:
    override = os.environ.get("IREVLA_CONFIG_DIR")
    return Path(override) if override else package_root() / "config"


def launch_dir() -> Path:
    return package_root() / "launch"
