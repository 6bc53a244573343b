"""sim."""

# The Meta-World v3 tasks the simulated cell, the episode manager and validation use by default. Here, not in
# sim/cell.py, so that the parameter schema can name them without importing MuJoCo.
DEFAULT_TASKS: tuple[str, ...] = (
    "button-press-v3",
    "drawer-open-v3",
    "door-open-v3",
    "window-open-v3",
    "window-close-v3",
)
