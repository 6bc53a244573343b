"""MetaWorldCell against real MuJoCo and Meta-World v3 (rendered offscreen with OSMesa)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from irevla_ros.sim.cell import (
    DEFAULT_TASKS,
    InvalidActionError,
    InvalidSeedError,
    MetaWorldCell,
    finish_control_period,
    scene_seed,
)

pytestmark = pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high:UserWarning")


@pytest.fixture(scope="module")
def cell():
    c = MetaWorldCell(tasks=("button-press-v3", "drawer-open-v3"), width=96, height=64, seed=7)
    yield c
    c.close()


def test_defaults_and_configuration(cell):
    assert DEFAULT_TASKS == (
        "button-press-v3",
        "drawer-open-v3",
        "door-open-v3",
        "window-open-v3",
        "window-close-v3",
    )
    assert cell.task == "button-press-v3"  # a valid episode exists right after construction
    assert cell.control_dt == pytest.approx(0.0125)  # frame_skip 5 x 2.5 ms
    assert cell.action_scale == pytest.approx(0.01)
    assert np.all(cell.workspace_low < cell.workspace_high)


def test_reset_randomises_object_positions_per_seed(cell):
    cell.reset("button-press-v3", seed=1)
    first = cell.object_layout()
    cell.reset("button-press-v3", seed=2)
    second = cell.object_layout()
    cell.reset("button-press-v3", seed=1)
    again = cell.object_layout()
    assert not np.allclose(first, second)
    np.testing.assert_array_equal(first, again)
    # Unseeded episodes continue the task's stream: each one is a new layout.
    cell.reset("button-press-v3")
    unseeded_a = cell.object_layout()
    cell.reset("button-press-v3")
    assert not np.allclose(unseeded_a, cell.object_layout())


def test_unseeded_resets_draw_a_seed_that_rebuilds_their_scene_in_any_cell():
    task = "button-press-v3"
    a = MetaWorldCell(tasks=(task, "drawer-open-v3"), width=96, height=64, seed=7)
    b = MetaWorldCell(tasks=(task,), width=96, height=64, seed=0)
    try:
        a.reset("drawer-open-v3")  # other tasks' and seeded episodes do not move this task's scene sequence
        assert a.reset(task, seed=3) == 3 == a.episode_seed
        first = a.reset(task)
        layout, image = a.object_layout(), a.render("corner")
        second = a.reset(task)
        assert (first, second) == (scene_seed(7, task, 0), scene_seed(7, task, 1)) and first != second
        assert a.episode_seed == second and not np.allclose(a.object_layout(), layout)
        # The drawn seed is the whole story: another cell (other cell seed, other history) rebuilds the scene.
        b.apply_action(np.array([1.0, 0.0, 0.0, 0.0]))
        assert b.reset(task, seed=first) == first
        np.testing.assert_array_equal(b.object_layout(), layout)
        np.testing.assert_array_equal(b.render("corner"), image)
        for bad in (-1, 2**63, 1.5, "3", True):
            with pytest.raises(InvalidSeedError, match="layout seed"):
                b.reset(task, seed=bad)  # type: ignore[arg-type]
        assert b.episode_seed == first  # a refused reset leaves the episode alone
    finally:
        a.close()
        b.close()
    # A fresh cell with the same seed draws the same sequence for the task, whatever its other tasks.
    c = MetaWorldCell(tasks=(task,), width=96, height=64, seed=7)
    try:
        assert c.reset() == first
    finally:
        c.close()


def test_same_seed_reproduces_the_arm_and_the_image(cell):
    cell.reset("button-press-v3", seed=5)
    ee, image = cell.ee_position(), cell.render("corner")
    cell.apply_action(np.array([1.0, 0.0, 0.0, 0.0]))
    cell.reset("button-press-v3", seed=5)
    np.testing.assert_allclose(cell.ee_position(), ee)
    np.testing.assert_array_equal(cell.render("corner"), image)


def test_round_robin_and_instructions(cell):
    cell.reset("drawer-open-v3")  # the next unnamed reset wraps to the first task
    seen = []
    for _ in range(3):
        cell.reset()
        seen.append((cell.task, cell.instruction))
    assert seen == [
        ("button-press-v3", "press the button"),
        ("drawer-open-v3", "open the drawer"),
        ("button-press-v3", "press the button"),
    ]


def test_expert_solves_button_press_and_success_is_sticky(cell):
    cell.reset("button-press-v3", seed=3)
    assert not cell.success()
    for _ in range(150):
        action = cell.expert_action()
        assert action.shape == (4,) and np.all(np.abs(action) <= 1.0)
        cell.apply_action(action)
        if cell.success():
            break
    assert cell.success(), "the scripted expert should press the button within 150 steps"
    solved_at = cell.episode_steps
    assert solved_at <= 150
    for _ in range(10):  # back away from the button: the episode stays a success
        cell.apply_action(np.array([0.0, -1.0, 1.0, 0.0]))
    assert cell.success()
    cell.reset("button-press-v3", seed=3)
    assert not cell.success() and cell.episode_steps == 0


@pytest.mark.parametrize(
    "bad",
    [
        np.array([np.nan, 0.0, 0.0, 0.0]),
        np.array([0.0, np.inf, 0.0, 0.0]),
        np.zeros(3),
        np.zeros((4, 1)),
        np.array([1.5, 0.0, 0.0, 0.0]),
        ["a", "b", "c", "d"],
    ],
)
def test_apply_action_rejects_bad_input_without_touching_state(cell, bad):
    cell.reset("button-press-v3", seed=0)
    qpos_before, t_before = cell.data.qpos.copy(), cell.sim_time
    with pytest.raises(InvalidActionError):
        cell.apply_action(bad)
    assert isinstance(InvalidActionError("x"), ValueError)
    np.testing.assert_array_equal(cell.data.qpos, qpos_before)
    assert cell.sim_time == t_before and cell.episode_steps == 0


def test_sim_time_advances_by_control_dt_per_step_and_across_resets(cell):
    cell.reset("button-press-v3", seed=0)
    t0 = cell.sim_time
    for k in range(1, 6):
        cell.apply_action(np.zeros(4))
        assert cell.sim_time == pytest.approx(t0 + k * cell.control_dt)
    before_reset = cell.sim_time
    cell.reset("drawer-open-v3", seed=0)
    assert cell.sim_time > before_reset  # monotonic across episodes and task switches


def test_move_toward_reaches_a_cartesian_target(cell):
    cell.reset("button-press-v3", seed=0)
    target = cell.ee_position() + np.array([0.08, 0.05, 0.06])
    start_distance = np.linalg.norm(target - cell.ee_position())
    for _ in range(40):
        cell.move_toward(target, gripper=-1.0)
    assert start_distance > 0.1
    assert np.linalg.norm(target - cell.ee_position()) < 0.01
    with pytest.raises(InvalidActionError):
        cell.move_toward(np.array([np.nan, 0.0, 0.0]), gripper=0.0)
    with pytest.raises(InvalidActionError):
        cell.move_toward(target, gripper=2.0)


def test_gripper_and_joint_state(cell):
    cell.reset("button-press-v3", seed=0)
    names, positions, velocities = cell.joint_state()
    assert names == [f"right_j{i}" for i in range(7)] + ["r_close", "l_close"]
    assert positions.shape == velocities.shape == (9,)
    opened = cell.gripper_opening()
    for _ in range(15):
        cell.apply_action(np.array([0.0, 0.0, 0.0, 1.0]))  # close
    closed = cell.gripper_opening()
    assert 0.0 <= closed < opened <= 1.0
    assert opened - closed > 0.3


def test_render_shape_content_and_determinism(cell):
    cell.reset("button-press-v3", seed=0)
    image = cell.render("corner")
    assert image.shape == (64, 96, 3) and image.dtype == np.uint8
    assert image.std() > 10.0  # a scene, not a blank buffer
    np.testing.assert_array_equal(cell.render("corner"), image)
    assert cell.renderer.width == 96 and cell.renderer.height == 64
    cell.apply_action(np.array([1.0, 0.0, 1.0, 0.0]))
    assert not np.array_equal(cell.render("corner"), image)  # the arm moved


def test_corner_camera_is_upright(cell):
    # The table top (brown wood) fills the lower middle of an upright corner view; Meta-World mounts this
    # camera upside down, so without correction it would be in the upper half.
    cell.reset("button-press-v3", seed=0)
    image = cell.render("corner").astype(int)
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    wood = (r > b + 20) & (g > b + 5) & (g > 50) & (r < 200)  # brown; excludes the red arm and yellow box
    rows = np.nonzero(wood)[0]
    assert rows.size > 50
    assert rows.mean() > image.shape[0] / 2 + 3


def test_unknown_names_are_rejected_with_the_valid_ones():
    with pytest.raises(ValueError, match="button-press-v3"):
        MetaWorldCell(tasks=("button-press-v9",))
    with pytest.raises(ValueError, match="corner"):
        MetaWorldCell(tasks=("button-press-v3",), cameras=("no-such-camera",))


def test_reset_to_an_unconfigured_task_is_rejected(cell):
    with pytest.raises(ValueError, match="drawer-open-v3"):
        cell.reset("door-open-v3")
    with pytest.raises(ValueError, match="corner"):
        cell.render("no-such-camera")


def test_stepping_and_rendering_from_two_threads(cell):
    cell.reset("button-press-v3", seed=0)
    errors: list[BaseException] = []
    stop = threading.Event()
    images = []

    def camera() -> None:
        try:
            while not stop.is_set():
                images.append(cell.render("corner"))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=camera)
    thread.start()
    try:
        for _ in range(60):
            cell.apply_action(cell.expert_action())
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert images and all(img.shape == (64, 96, 3) for img in images)
    assert cell.episode_steps == 60


def test_fingers_keep_metaworlds_pace_per_control_period():
    # Meta-World's experts assume one action per env step: the hand moves at most action_scale per step while the
    # fingers close at their own speed. A cell stepped once per 0.1 s control period still moves the hand one
    # step's worth per period, so its fingers must move per period as Meta-World's move per env step; unslowed,
    # they closed 8 steps' worth per period and push-v3's expert shut its gripper before reaching the puck
    # (0 of 15 in 150 steps against Meta-World's 15 of 15).
    task = "push-v3"
    metaworld = MetaWorldCell(tasks=(task,), width=32, height=32)
    timed = MetaWorldCell(tasks=(task,), width=32, height=32, control_period=0.1)
    unslowed = MetaWorldCell(tasks=(task,), width=32, height=32)  # Meta-World's fingers, driven at 0.1 s
    try:
        assert metaworld.finger_time_scale == 1.0 and metaworld.control_period is None
        assert timed.finger_time_scale == pytest.approx(0.1 / timed.control_dt) == pytest.approx(8.0)
        per_step, per_period, unslowed_per_period = [], [], []
        close = np.array([0.0, 0.0, 0.0, 0.6])  # push-v3's grab effort
        for c in (metaworld, timed, unslowed):
            c.reset(task, seed=0)
        for _ in range(40):
            metaworld.apply_action(close)
            per_step.append(metaworld.gripper_opening())
            for c, out in ((timed, per_period), (unslowed, unslowed_per_period)):
                start = c.sim_time
                c.apply_action(close)
                finish_control_period(c, start, 0.1)
                out.append(c.gripper_opening())
        np.testing.assert_allclose(per_period, per_step, atol=0.03)
        assert per_step[3] > 0.9 and unslowed_per_period[3] < 0.5  # the departure the scaling removes
        assert per_period[-1] == pytest.approx(per_step[-1], abs=0.005)  # the same grip once closed
        with pytest.raises(ValueError, match="control_period"):
            MetaWorldCell(tasks=(task,), control_period=0.0)
        with pytest.raises(ValueError, match="control_period"):
            MetaWorldCell(tasks=(task,), control_period=float("nan"))
    finally:
        for c in (metaworld, timed, unslowed):
            c.close()
