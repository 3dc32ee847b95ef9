"""Closed-loop evaluation (needs MetaWorld and EGL), the open-loop action error, the bundled policy."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from vlaopt import VLA, VLAConfig, load
from vlaopt.cli import main
from vlaopt.data.collect import collect, episode_seed
from vlaopt.data.dataset import EpisodeDataset
from vlaopt.eval import closed_loop
from vlaopt.eval.closed_loop import EvalConfig, _run_in_pools, evaluate, wilson_interval
from vlaopt.eval.open_loop import open_loop_error
from vlaopt.eval.rollout import RolloutConfig, env_cameras, eval_seed, run_episode
from vlaopt.model.session import Session
from vlaopt.model.vla import DEFAULT_MODEL_DIR
from vlaopt.sim.env import SimEnv

STATS = {"action": {"q01": [-1.0] * 4, "q99": [1.0] * 4}, "proprio": {"q01": [-0.5, 0.3, 0.0, 0.0],
                                                                       "q99": [0.5, 0.9, 0.3, 1.0]}}


def _sim_model(seed: int = 0, image_size: int = 32) -> VLA:
    """A tiny untrained model that fits the env: two cameras, 4-d proprio and actions."""
    cfg = VLAConfig.tiny(cameras=2, proprio_dim=4, action_dim=4, image_size=image_size, chunk=4, seed=seed)
    model = VLA(cfg).eval()
    model.set_stats(STATS)
    return model


def test_bundled_policy_runs_a_closed_loop_episode(tmp_path: Path) -> None:
    """`--model default` names the packaged policy; one short episode, in this process, with --json."""
    assert (DEFAULT_MODEL_DIR / "model.safetensors").is_file()
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", "default", "--tasks", "drawer-close-v3", "--episodes", "1", "--workers", "0",
                 "--max-steps", "12", "--execute", "4", "--seed", "3", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["seed"] == 3 and report["settings"]["execute"] == 4
    assert report["settings"]["tasks"] == ["drawer-close-v3"] and report["settings"]["image_size"] == 64
    (episode,) = report["episodes"]
    assert episode["seed"] == eval_seed(3, "drawer-close-v3", 0) and 1 <= episode["steps"] <= 12
    task = report["tasks"]["drawer-close-v3"]
    assert task["episodes"] == 1 and task["successes"] == int(episode["success"])
    assert report["overall"]["success_rate"] == task["success_rate"] and len(task["ci95"]) == 2
    assert VLA.default().config.to_dict() == load(DEFAULT_MODEL_DIR).config.to_dict()


def test_wilson_interval_known_values() -> None:
    # statsmodels.stats.proportion.proportion_confint(k, n, method="wilson")
    for (k, n), expected in {(8, 10): (0.490162, 0.943318), (5, 10): (0.236593, 0.763407),
                             (0, 10): (0.0, 0.277533), (10, 10): (0.722467, 1.0)}.items():
        assert wilson_interval(k, n) == pytest.approx(expected, abs=1e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match=r"successes=3 must lie in \[0, trials=2\]"):
        wilson_interval(3, 2)


def test_two_models_start_from_identical_states() -> None:
    """Episode seeds depend on (base seed, task, episode) only, so different models see the same starts."""
    seed = eval_seed(0, "push-v3", 1)
    assert seed != eval_seed(1, "push-v3", 1) and seed != eval_seed(0, "push-v3", 2) != eval_seed(0, "reach-v3", 2)
    assert seed != episode_seed(0, "push-v3", 1)  # evaluation states are not the collection's training states
    starts = []
    for model_seed in (0, 1):
        with SimEnv("push-v3", 7, env_cameras(_sim_model().config), 32, max_steps=2) as env:
            result = run_episode(_sim_model(model_seed), env, 1, seed, RolloutConfig(record=True, max_steps=2))
        assert result.seed == seed and result.steps == 2 and result.frames.shape == (3, 32, 64, 3)
        starts.append(result.frames)
    np.testing.assert_array_equal(starts[0][0], starts[1][0])  # same initial images
    assert not np.array_equal(starts[0][-1], starts[1][-1])  # the two models then act differently


def test_parallel_workers_match_in_process_run(tmp_path: Path) -> None:
    model = _sim_model()
    cfg = {"episodes": 2, "max_steps": 6, "execute": 2, "seed": 5}
    inline = evaluate(model, ["reach-v3", "window-close-v3"], EvalConfig(workers=0, **cfg), progress=False)
    spawned = evaluate(model, ["reach-v3", "window-close-v3"], EvalConfig(workers=1, **cfg), progress=False)
    def outcomes(result):  # timings differ from run to run
        return [{k: v for k, v in e.items() if k not in ("stall_s", "stage_ms")} for e in result.episodes]

    assert outcomes(inline) == outcomes(spawned) and len(inline.episodes) == 4
    assert inline.overall.episodes == 4 and list(inline.tasks) == ["reach-v3", "window-close-v3"]


def test_bad_requests_are_explained() -> None:
    model = _sim_model()
    with pytest.raises(ValueError, match=r"unknown task 'reach-v9'"):
        evaluate(model, ["reach-v9"], EvalConfig(episodes=1, workers=0), progress=False)
    with pytest.raises(ValueError, match=r"takes 2 camera image\(s\) but the env renders 1: \['topview'\]"):
        env_cameras(model.config, ["topview"])
    one_camera = VLAConfig.tiny(cameras=1, proprio_dim=4, action_dim=4)
    with pytest.raises(ValueError, match=r"takes 1 camera image\(s\) but the env renders 2.*--cameras"):
        env_cameras(one_camera)
    with pytest.raises(ValueError, match=r"action_dim=7, MetaWorld actions have 4"):
        env_cameras(VLAConfig.tiny(cameras=2))
    with pytest.raises(ValueError, match=r"execute=5 exceeds the model's chunk of 4 actions"):
        evaluate(model, ["reach-v3"], EvalConfig(episodes=1, workers=0, execute=5), progress=False)


@pytest.fixture(scope="module")
def tiny_collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("episodes")
    collect(["reach-v3"], 2, out, workers=0, image_size=32, max_steps=80, progress=False)
    return out


def test_open_loop_error_on_held_out_episodes(tiny_collection: Path) -> None:
    model = _sim_model()
    result = open_loop_error(model, tiny_collection, val_fraction=0.5, batch_size=16)
    val = EpisodeDataset(tiny_collection, "val", chunk=4, val_fraction=0.5)
    assert result.samples == len(val) and list(result.per_task) == ["reach-v3"]
    with torch.inference_mode():
        expected = np.mean([
            (model.predict_action(s["images"][None], [s["instruction"]], s["proprio"][None])[0] - s["actions"]).abs().mean()
            for s in (val[i] for i in range(len(val)))
        ])
    assert result.l1 == pytest.approx(expected, rel=1e-5) == pytest.approx(np.mean(result.per_dim), rel=1e-5)
    with pytest.raises(ValueError, match=r"holds 2 camera\(s\) of 32 px .* takes 2 camera\(s\) of 64 px"):
        open_loop_error(_sim_model(image_size=64), tiny_collection, val_fraction=0.5)


# ---- an evaluation keeps what it did ----------------------------------------------------------------
TASKS = ["reach-v3", "window-close-v3"]


def test_failed_episodes_are_reported_and_the_rest_still_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """An episode that raises, and a job whose env cannot start: both listed with their error, the
    other episodes measured, the rates over the episodes that ran, exit status 1 after the table."""
    model_dir = _sim_model().save_pretrained(tmp_path / "model")
    real_run, real_env = closed_loop.run_episode, closed_loop.SimEnv

    def run_episode(model: VLA, env: SimEnv, episode: int, *args: object) -> object:
        if env.task == "reach-v3" and episode == 1:
            raise RuntimeError("injected fault")
        return real_run(model, env, episode, *args)

    def sim_env(task: str, *args: object) -> SimEnv:
        if task == "window-close-v3":
            raise OSError("no renderer for window-close")
        return real_env(task, *args)

    monkeypatch.setattr(closed_loop, "run_episode", run_episode)
    monkeypatch.setattr(closed_loop, "SimEnv", sim_env)
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(model_dir), "--tasks", ",".join(TASKS), "--episodes", "2", "--workers", "0",
                 "--max-steps", "3", "--json", str(out)]) == 1
    printed = " ".join(capsys.readouterr().out.split())
    seed = eval_seed(0, "reach-v3", 1)
    assert f"failed: reach-v3 episode 1 (seed {seed}): RuntimeError: injected fault" in printed
    assert "failed: window-close-v3 episode 0" in printed and "OSError: no renderer for window-close" in printed
    assert "3 episode(s) failed to run" in printed and "failed" in printed.split("overall")[0]
    report = json.loads(out.read_text())
    assert report["complete"] is True
    assert report["failures"][0] == {"task": "reach-v3", "episode": 1, "seed": seed, "error": "RuntimeError: injected fault"}
    assert [(f["task"], f["episode"]) for f in report["failures"]] == [("reach-v3", 1), ("window-close-v3", 0),
                                                                     ("window-close-v3", 1)]
    assert [("error" in e, e["episode"]) for e in report["episodes"]] == [(False, 0), (True, 1), (True, 0), (True, 1)]
    reach, window, overall = report["tasks"]["reach-v3"], report["tasks"]["window-close-v3"], report["overall"]
    assert (reach["episodes"], reach["failed"]) == (1, 1) and (window["episodes"], window["failed"]) == (0, 2)
    assert (overall["episodes"], overall["failed"], overall["successes"]) == (1, 3, report["episodes"][0]["success"])


KILLED_EVAL = """
import os, signal, sys
from vlaopt.eval import closed_loop

real = closed_loop.run_episode

def run_episode(model, env, *args):  # the process dies in the second task's first episode
    if env.task == "window-close-v3":
        os.kill(os.getpid(), signal.SIGKILL)
    return real(model, env, *args)

closed_loop.run_episode = run_episode
closed_loop.evaluate(sys.argv[1], ["reach-v3", "window-close-v3"], closed_loop.EvalConfig(episodes=2, max_steps=3,
                     workers=0), progress=False, json_path=sys.argv[2])
"""


def test_killed_evaluation_leaves_its_finished_episodes(tmp_path: Path) -> None:
    model_dir = _sim_model().save_pretrained(tmp_path / "model")
    out = tmp_path / "eval.json"
    killed = subprocess.run([sys.executable, "-c", KILLED_EVAL, str(model_dir), str(out)], capture_output=True,
                            timeout=150)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    report = json.loads(out.read_text())
    assert report["complete"] is False
    assert [(e["task"], e["episode"]) for e in report["episodes"]] == [("reach-v3", 0), ("reach-v3", 1)]
    assert report["tasks"]["reach-v3"]["episodes"] == 2 and report["tasks"]["window-close-v3"]["episodes"] == 0
    assert not list(tmp_path.glob(".eval.json.*"))  # no half-written report


def test_a_dying_worker_fails_only_its_own_job() -> None:
    """Job 2 kills its worker process, job 3 raises in its worker: each is reported failed once, with
    its error, and every other job, including those that shared the broken pool, still runs."""
    context = multiprocessing.get_context("spawn")
    reports: list[tuple[int, object, str | None]] = []

    def submit(pool: ProcessPoolExecutor, job: int):
        if job == 2:
            return pool.submit(os._exit, 1)
        if job == 3:
            return pool.submit(int, "three")
        return pool.submit(pow, job, 2)

    _run_in_pools(range(6), 2, lambda: ProcessPoolExecutor(2, mp_context=context), submit,
                  lambda job, result, error: reports.append((job, result, error)))
    by_job = {job: (result, error) for job, result, error in reports}
    assert len(reports) == len(by_job) == 6
    assert {job: by_job[job] for job in (0, 1, 4, 5)} == {0: (0, None), 1: (1, None), 4: (16, None), 5: (25, None)}
    assert by_job[3] == (None, "ValueError: invalid literal for int() with base 10: 'three'")
    assert by_job[2][0] is None and by_job[2][1].startswith("a worker process died while running these episodes")


# ---- the modeled latency: synchronous and asynchronous execution ------------------------------------------

class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class _Scripted(Session):
    """Returns chunk n with actions coded (n, index), records the env step each prediction saw, and
    advances the clock by `latency` per prediction."""

    def __init__(self, model: VLA, env: SimEnv, clock: _Clock, latency: float) -> None:
        super().__init__(model)
        self.env, self.clock, self.latency, self.seen = env, clock, latency, []

    def step(self, images, instructions, proprio=None, *, noise=None, seed=0, timer=None):
        self.seen.append(self.env.steps)
        self.clock.now += self.latency
        chunk = self.model.config.chunk
        codes = torch.zeros(1, chunk, 4)
        codes[0, :, 0] = (len(self.seen) - 1) / 100
        codes[0, :, 1] = torch.arange(chunk) / 100
        return codes


def _scripted_episode(monkeypatch, latency: float, **rollout) -> tuple[list[tuple[int, int]], list[int], object]:
    """(chunk, index) of every executed action, the env steps predictions saw, and the result."""
    from vlaopt.eval import rollout as rollout_module

    clock = _Clock()
    monkeypatch.setattr(rollout_module, "time", clock)
    model = _sim_model()  # chunk 4
    executed = []
    with SimEnv("reach-v3", 0, ("corner4", "topview"), 32, 10) as env:
        step = env.step

        def record(action):
            executed.append(tuple(100 * float(a) for a in action[:2]))
            return step(action)

        monkeypatch.setattr(env, "step", record)
        session = _Scripted(model, env, clock, latency)
        result = run_episode(model, env, 0, eval_seed(0, "reach-v3", 0), RolloutConfig(max_steps=10, **rollout), session)
    return executed, session.seen, result


def _codes(pairs):
    return [pytest.approx(pair, abs=1e-4) for pair in pairs]


def test_synchronous_execution_stalls_for_every_prediction(monkeypatch):
    executed, seen, result = _scripted_episode(monkeypatch, 0.05)
    assert executed == _codes([(n, i) for n in range(3) for i in range(4)][:10]) and seen == [0, 4, 8]
    assert result.predictions == 3 and result.stall_s == pytest.approx(3 * 0.05)


def test_asynchronous_execution_predicts_lead_steps_ahead_and_hides_what_the_lead_covers(monkeypatch):
    """lead 2 at 80 Hz covers 25 ms: the next chunk is predicted from the observation two actions
    before the current one ends, takes over at its own third action, and only the first prediction
    and each prediction's time beyond 25 ms stall."""
    executed, seen, result = _scripted_episode(monkeypatch, 0.02, lead=2, control_hz=80.0)
    assert executed == _codes([(0, 0), (0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 2), (2, 3), (3, 2), (3, 3)])
    assert seen == [0, 2, 4, 6, 8]
    assert result.stall_s == pytest.approx(0.02)  # the first prediction only
    executed, seen, result = _scripted_episode(monkeypatch, 0.05, lead=2, control_hz=80.0)
    switches = 3  # to chunks 1, 2, 3; chunk 4 was still pending when the episode ended
    assert result.stall_s == pytest.approx(0.05 + switches * (0.05 - 0.025))
    sync = _scripted_episode(monkeypatch, 0.05)[2]
    assert 1 - result.stall_s / sync.stall_s == pytest.approx(1 - 0.125 / 0.15)


def test_blending_mixes_the_new_chunk_in_once_it_has_arrived(monkeypatch):
    """10 ms of latency arrives within one 12.5 ms period: of the two overlapping actions, the
    second (old index 3 = new index 1) is blended half and half; the first is the old chunk's."""
    executed, _, _ = _scripted_episode(monkeypatch, 0.01, lead=2, control_hz=80.0, blend=0.5)
    # chunk 0's index 3 (0, 3) mixed with chunk 1's index 1 (1, 1); then chunk 1's (1, 3) with chunk 2's (2, 1)
    assert executed[:6] == _codes([(0, 0), (0, 1), (0, 2), (0.5, 2), (1, 2), (1.5, 2)])


def test_async_settings_are_checked_before_anything_runs():
    with pytest.raises(ValueError, match="lead=3 must be at most half the 4 actions executed per chunk"):
        evaluate(_sim_model(), ["reach-v3"], EvalConfig(workers=0, episodes=1, lead=3), progress=False)
    with pytest.raises(ValueError, match="blend=0.5 mixes overlapping chunks, which only asynchronous execution has"):
        EvalConfig(blend=0.5)
    with pytest.raises(ValueError, match="control_hz=0 must be a positive rate"):
        EvalConfig(control_hz=0)
