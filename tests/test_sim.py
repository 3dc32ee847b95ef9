"""MetaWorld tasks, the offscreen-rendering env and the scripted policies (needs MetaWorld and EGL)."""

from __future__ import annotations

import numpy as np
import pytest

from vlaopt.sim import env as sim_env
from vlaopt.sim.env import SimEnv
from vlaopt.sim.scripted import ScriptedPolicy
from vlaopt.sim.tasks import INSTRUCTIONS, TASK_SETS, instruction, resolve_tasks


def test_task_lists_match_metaworld() -> None:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS, MT10_V3

    assert list(INSTRUCTIONS) == list(ALL_V3_ENVIRONMENTS)
    assert list(TASK_SETS["mt10"]) == list(MT10_V3)
    assert all(text and text == text.strip() for text in INSTRUCTIONS.values())


def test_resolve_tasks() -> None:
    assert resolve_tasks("mt10") == list(TASK_SETS["mt10"])
    assert resolve_tasks("MT10") == list(TASK_SETS["mt10"])
    assert resolve_tasks("reach-v3") == ["reach-v3"]
    assert resolve_tasks("sweep-v3, reach-v3,mt10")[:3] == ["sweep-v3", "reach-v3", "push-v3"]
    assert len(resolve_tasks("sweep-v3,mt10")) == 11  # reach-v3 is not repeated
    assert len(resolve_tasks("mt50")) == 50
    assert set(resolve_tasks("default")) < set(TASK_SETS["mt10"]) and len(resolve_tasks("default")) == 6
    assert instruction("push-v3") == "push the puck to the goal"


@pytest.mark.parametrize("spec", ["reach-v2", "mt10,pick", ""])
def test_unknown_task_names_the_value_and_the_choices(spec: str) -> None:
    with pytest.raises(ValueError, match=r"unknown task .*expected one of the sets \['default', 'mt10', 'mt50'\].*reach-v3"):
        resolve_tasks(spec)


def test_env_rejects_unknown_task() -> None:
    with pytest.raises(ValueError, match="unknown task 'reach-v2'; expected one of .*'reach-v3'"):
        SimEnv("reach-v2", seed=0)


def _project(env: SimEnv, camera: str, point: np.ndarray) -> tuple[float, float]:
    """(row, col) of a world point in the env's image of `camera`, from the camera's pose and fovy."""
    model, data = env._env.model, env._env.data
    cam = model.camera(camera).id
    local = data.cam_xmat[cam].reshape(3, 3).T @ (point - data.cam_xpos[cam])  # camera looks along -z, y up
    focal = env.image_size / 2 / np.tan(np.deg2rad(model.cam_fovy[cam]) / 2)
    row = env.image_size / 2 - focal * local[1] / -local[2]
    col = env.image_size / 2 + focal * local[0] / -local[2]
    if camera.startswith("corner"):  # SimEnv turns these upside-down mounted cameras' images 180 degrees
        row, col = env.image_size - row, env.image_size - col
    return row, col


def test_observation_shows_the_goal_upright() -> None:
    with SimEnv("pick-place-v3", seed=3, cameras=("corner4", "topview"), image_size=64) as env:
        obs = env.reset()
        assert obs["images"].shape == (2, 64, 64, 3) and obs["images"].dtype == np.uint8
        assert obs["proprio"].dtype == np.float32
        np.testing.assert_array_equal(obs["proprio"], env.state[:4].astype(np.float32))
        assert 0.9 <= obs["proprio"][3] <= 1.0  # the gripper starts open
        goal = env.state[-3:]
        for i, camera in enumerate(env.cameras):
            row, col = (int(v) for v in _project(env, camera, goal))
            patch = obs["images"][i, row - 1 : row + 2, col - 1 : col + 2].reshape(-1, 3).astype(int)
            assert (patch[:, 2] - patch[:, :2].max(axis=1)).max() > 150, (
                f"blue goal marker not at its place in {camera}"
            )
            # further up (corner view) or further from the robot (top view) is higher in the image
            away = goal + ([0, 0, 0.1] if camera.startswith("corner") else [0, 0.1, 0])
            assert _project(env, camera, away)[0] < row


def test_seeds_fix_the_initial_state() -> None:
    np.random.seed(123)
    expected_draw = np.random.rand()
    np.random.seed(123)
    with SimEnv("push-v3", seed=5, image_size=32) as env:
        first = env.reset()
        again = env.reset()
        other = env.reset(seed=6)
        goal_6 = env.state[-3:].copy()
        back = env.reset(seed=5)
    assert np.random.rand() == expected_draw  # NumPy's global RNG is left as it was
    np.testing.assert_array_equal(first["images"], again["images"])
    np.testing.assert_array_equal(first["images"], back["images"])
    assert not np.array_equal(first["images"], other["images"])
    with SimEnv("push-v3", seed=6, image_size=32) as fresh:
        fresh.reset()
        np.testing.assert_array_equal(fresh.state[-3:], goal_6)


def test_step_contract() -> None:
    with SimEnv("reach-v3", seed=0, cameras=("corner",), image_size=16, max_steps=3) as env:
        with pytest.raises(RuntimeError, match="reset"):
            env.step(np.zeros(4))
        env.reset()
        with pytest.raises(ValueError, match="4 finite numbers"):
            env.step(np.zeros(3))
        with pytest.raises(ValueError, match="4 finite numbers"):
            env.step(np.array([0, 0, np.nan, 0]))
        start = env.state[:3].copy()
        results = [env.step(np.array([0.0, 0.0, 1.0, 0.0])) for _ in range(3)]
        assert [done for _, _, done in results] == [False, False, True]
        assert all(isinstance(success, bool) and not success for _, success, _ in results)
        assert env.state[2] > start[2] + 0.005  # the hand rose
        with pytest.raises(RuntimeError, match="max_steps=3"):
            env.step(np.zeros(4))
    env.close()  # closing twice is fine


def test_unknown_camera_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown camera\(s\) \['front'\].*'corner4'.*'gripperPOV'"):
        SimEnv("reach-v3", seed=0, cameras=("front",))


def test_missing_egl_names_the_debian_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_display(*args: object, **kwargs: object) -> None:
        raise ImportError("Cannot initialize a EGL device display.")

    monkeypatch.setattr(sim_env.mujoco, "Renderer", no_display)
    with pytest.raises(RuntimeError, match="apt-get install -y libegl1 libegl-mesa0 libgl1-mesa-dri"):
        SimEnv("reach-v3", seed=0)


def test_expert_solves_reach() -> None:
    expert = ScriptedPolicy("reach-v3")
    with SimEnv("reach-v3", seed=1, cameras=("topview",), image_size=16, max_steps=120) as env:
        env.reset()
        done = success = False
        while not done:
            action = expert.act(env)
            assert action.shape == (4,) and action.dtype == np.float32 and np.all(np.abs(action) <= 1)
            _, success, done = env.step(action)
        assert success and env.steps < 120
    with pytest.raises(ValueError, match="no scripted policy for task 'reach-v9'"):
        ScriptedPolicy("reach-v9")


def test_control_rate_is_metaworlds_env_step() -> None:
    """The rate the closed loop models latency at is MetaWorld's own (frame skip x MuJoCo timestep)."""
    with SimEnv("reach-v3", 0, ("topview",), 32, 5) as env:
        assert sim_env.CONTROL_HZ == pytest.approx(1 / env._env.dt)
