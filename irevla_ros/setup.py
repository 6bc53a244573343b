"""ament_python package irevla_ros. Used by `colcon build` on a robot and by `pip install -e` on a pip-only machine."""

import runpy
from glob import glob
from pathlib import Path

from setuptools import find_packages, setup

package_name = "irevla_ros"
here = Path(__file__).resolve().parent
entry = runpy.run_path(str(here / package_name / "entry_points.py"))
scripts = {**entry["NODE_EXECUTABLES"], **entry["TOOLS"]}

setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(exclude=["test"]),
    package_data={package_name: ["fastdds_profile.xml"]},
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        ("share/" + package_name + "/launch", glob("launch/*.launch.py")),
        ("share/" + package_name + "/config", glob("config/*.yaml") + glob("config/*.rviz")),
        ("share/" + package_name + "/models", glob("models/*.md")),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="irevla_ros maintainers",
    maintainer_email="maintainers@irevla-ros.org",
    description="Robot-side iRe-VLA: online RL + supervised fine-tuning of a VLA policy on the robot.",
    license="Apache-2.0",
    entry_points={"console_scripts": [f"{name} = {target}" for name, target in scripts.items()]},
)
