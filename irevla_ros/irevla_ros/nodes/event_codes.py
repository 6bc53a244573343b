"""EpisodeEvent outcome and label-source codes <-> the names the session and the episode store use, in one place."""

from __future__ import annotations

from irevla_interfaces.msg import EpisodeEvent

OUTCOME_NAMES = {
    EpisodeEvent.OUTCOME_NONE: "unknown",
    EpisodeEvent.OUTCOME_SUCCESS: "success",
    EpisodeEvent.OUTCOME_FAILURE: "failure",
    EpisodeEvent.OUTCOME_TIMEOUT: "timeout",
    EpisodeEvent.OUTCOME_ABORTED: "aborted",
}
SOURCE_NAMES = {
    EpisodeEvent.LABEL_SOURCE_NONE: "none",
    EpisodeEvent.LABEL_SOURCE_OPERATOR: "operator",
    EpisodeEvent.LABEL_SOURCE_SIMULATOR: "simulator",
    EpisodeEvent.LABEL_SOURCE_CLASSIFIER: "classifier",
}
# The session writes "" for "no outcome / no source yet"; the store writes "unknown" / "none".
OUTCOME_CODES = {"": EpisodeEvent.OUTCOME_NONE, **{name: code for code, name in OUTCOME_NAMES.items()}}
SOURCE_CODES = {"": EpisodeEvent.LABEL_SOURCE_NONE, **{name: code for code, name in SOURCE_NAMES.items()}}
