"""The package's Fast DDS profile (irevla_ros/dds_profile.py): in place in every irevla process unless the user names
their own, read by rmw_fastrtps, and harmless to the ROS graph: a participant with it and one without (a user's
own ROS tools) still exchange the package's messages both ways."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from irevla_ros import dds_profile

CHILD = """
import sys, time
import rclpy
from rclpy.node import Node
from irevla_interfaces.msg import ArmCommand
role, topic_out, topic_in = sys.argv[1], sys.argv[2], sys.argv[3]
rclpy.init()
node = Node(f"profile_{role}")
pub = node.create_publisher(ArmCommand, topic_out, 10)
got = []
node.create_subscription(ArmCommand, topic_in, lambda m: got.append(m.episode_id), 10)
deadline = time.monotonic() + 30.0
while time.monotonic() < deadline and not (got and pub.get_subscription_count() > 0):
    pub.publish(ArmCommand(episode_id=role))
    rclpy.spin_once(node, timeout_sec=0.1)
for _ in range(5):  # let the peer hear us too before leaving
    pub.publish(ArmCommand(episode_id=role))
    rclpy.spin_once(node, timeout_sec=0.1)
print("GOT", sorted(set(got)), flush=True)
node.destroy_node()
rclpy.shutdown()
"""

PLAIN_PROFILE = """<?xml version="1.0" encoding="UTF-8"?>
<dds xmlns="http://www.eprosima.com"><profiles>
  <participant profile_name="plain" is_default_profile="true"><rtps/></participant>
</profiles></dds>
"""


def test_the_profile_is_in_place_unless_the_user_names_one(tmp_path):
    assert os.environ[dds_profile.ENV] == str(
        dds_profile.PROFILE
    )  # the conftest put it there, as a node does
    assert "<name>fastdds.type_propagation</name>" in dds_profile.PROFILE.read_text()
    theirs = {dds_profile.ENV: str(tmp_path / "theirs.xml")}
    assert dds_profile.use_default_profile(theirs) == str(tmp_path / "theirs.xml")
    empty: dict[str, str] = {}
    assert dds_profile.use_default_profile(empty) == str(dds_profile.PROFILE) == empty[dds_profile.ENV]


def test_every_rclpy_init_of_the_package_comes_after_the_profile():
    # Each function of the package that creates a DDS participant (rclpy.init) puts the profile in place first:
    # node processes (run_nodes), the verbs' client, the demo and the benchmarks' observers.
    package = Path(dds_profile.__file__).parent
    sites = []
    for path in sorted(package.rglob("*.py")):
        for func in ast.walk(ast.parse(path.read_text())):
            if not isinstance(func, ast.FunctionDef):
                continue
            calls = [n for n in ast.walk(func) if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute))
                     or (isinstance(n, ast.Call) and isinstance(n.func, ast.Name))]  # fmt: skip
            inits = [c.lineno for c in calls if isinstance(c.func, ast.Attribute) and c.func.attr == "init"
                     and isinstance(c.func.value, ast.Name) and c.func.value.id == "rclpy"]  # fmt: skip
            profile = [
                c.lineno for c in calls if isinstance(c.func, ast.Name) and c.func.id == "use_default_profile"
            ]
            for line in inits:
                sites.append(f"{path.name}:{line}")
                assert any(p < line for p in profile), (
                    f"{path.name}:{line}: rclpy.init without the profile first"
                )
    assert len(sites) >= 6, sites  # run_nodes, the client, the demo, three benchmark observers


def test_rmw_fastrtps_reads_the_profile(ros_domain, tmp_path):
    # A profile with an invalid type_propagation value makes participant creation fail: the file is read.
    bogus = tmp_path / "bogus.xml"
    bogus.write_text(
        dds_profile.PROFILE.read_text().replace("<value>disabled</value>", "<value>bogus</value>")
    )
    env = dict(os.environ, **{dds_profile.ENV: str(bogus)})
    code = "import rclpy; from rclpy.node import Node; rclpy.init(); Node('probe')"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "failed to create participant" in done.stderr, done.stderr
    ok = subprocess.run(
        [sys.executable, "-c", code + "; print('created')"],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0 and "created" in ok.stdout, ok.stderr


@pytest.mark.parametrize("other", ["plain", "package"])
def test_a_participant_with_the_profile_talks_to_one_with_or_without_it(other, ros_domain, tmp_path):
    plain = tmp_path / "plain.xml"
    plain.write_text(PLAIN_PROFILE)
    ours = dict(os.environ, **{dds_profile.ENV: str(dds_profile.PROFILE)})
    theirs = dict(os.environ, **{dds_profile.ENV: str(plain if other == "plain" else dds_profile.PROFILE)})
    a = subprocess.Popen([sys.executable, "-c", CHILD, "ours", "/a_to_b", "/b_to_a"], env=ours,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    b = subprocess.Popen([sys.executable, "-c", CHILD, other, "/b_to_a", "/a_to_b"], env=theirs,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    out_a, _ = a.communicate(timeout=90)
    out_b, _ = b.communicate(timeout=90)
    assert a.returncode == 0 and f"GOT ['{other}']" in out_a, out_a
    assert b.returncode == 0 and "GOT ['ours']" in out_b, out_b


def test_the_profile_ships_with_the_package():
    setup = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    assert '"fastdds_profile.xml"' in setup  # package_data: a colcon install carries it next to the module
