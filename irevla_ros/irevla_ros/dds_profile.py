"""The DDS participant profile of every irevla_ros process (nodes, verbs, benchmarks, tests).

`fastdds_profile.xml` (next to this module) turns off Fast DDS's XTypes type propagation, whose TypeLookup reply
thread can crash a process at exit under Fast DDS 3.2 (the file says how it was found). It is put in place by
setting FASTDDS_DEFAULT_PROFILES_FILE before the first participant of the process exists, and only when the user
has not named a profile file of their own (theirs wins: add the property to it to keep the fix). Child processes
inherit the variable. Plain Python: setting it imports nothing from ROS.
"""

from __future__ import annotations

import os
from pathlib import Path

PROFILE = Path(__file__).with_name("fastdds_profile.xml")
ENV = "FASTDDS_DEFAULT_PROFILES_FILE"


def use_default_profile(environ: dict[str, str] | os._Environ[str] = os.environ) -> str:
    """Point Fast DDS at the package's profile unless a profile file is already named; returns the one in use."""
    if not environ.get(ENV):
        environ[ENV] = str(PROFILE)
    return environ[ENV]
