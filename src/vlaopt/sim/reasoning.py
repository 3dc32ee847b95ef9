"""Reasoning targets: what the scripted MetaWorld policy is doing at a step and why, as short text.

Alpamayo-R1 trains its VLM to state a chain of causation before the trajectory. Here the cause is
read from the scripted policy itself: its `_desired_pos` is a chain of if-branches on the privileged
state (hand, object and goal positions), one branch per phase ("above the handle; lower to it"). A
`Phase` re-types that branch and names it; once the task has succeeded, every later step is the
task's `done` text. `tests/test_reasoning.py` checks, on every step of scripted rollouts, that the
branch picked here gives MetaWorld's own action (target and gain), so the text follows the policy.

The state vector is MetaWorld's 39-d observation: hand xyz at [0:3], the gripper reading at [3],
the object's xyz at [4:7], the goal's xyz at [-3:].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from vlaopt.utils.registry import Registry


@dataclass(frozen=True)
class Phase:
    """A branch of a scripted policy: its reasoning text, the position it moves the hand to and the
    gain of that move (MetaWorld's `move(hand, target, p)`)."""

    text: str
    target: np.ndarray
    gain: float


Explain = Callable[[np.ndarray], Phase]
EXPLAINERS: Registry[Explain] = Registry("reasoning task")
DONE: dict[str, str] = {}
"""Per task, the text of every step after the first success."""


def reasoning_text(task: str, state: np.ndarray, done: bool) -> str:
    """The reasoning text for `task` at MetaWorld state `state` (39,); `done` once the task succeeded."""
    explain = EXPLAINERS.get(task)
    return DONE[task] if done else explain(state).text


def has_reasoning(task: str) -> bool:
    return task in DONE


def _task(name: str, done: str) -> Callable[[Explain], Explain]:
    def register(fn: Explain) -> Explain:
        DONE[name] = done
        return EXPLAINERS.register(name)(fn)

    return register


def _split(state: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return state[:3], state[4:7], state[-3:]


def _xy(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a[:2] - b[:2]))


@_task("reach-v3", "at the goal; hold still")
def _reach(state: np.ndarray) -> Phase:
    hand, _, goal = _split(state)
    far = np.linalg.norm(hand - goal) > 0.1  # one branch in MetaWorld; split by distance to say more
    return Phase("goal far; move to the goal" if far else "goal near; slow onto it", goal, 5.0)


@_task("drawer-open-v3", "drawer open; done")
def _drawer_open(state: np.ndarray) -> Phase:
    hand, drawer, _ = _split(state)
    handle = drawer + np.array([0.0, 0.0, -0.02])
    if _xy(hand, handle) > 0.06:
        return Phase("not above the handle; move above it", handle + np.array([0.0, 0.0, 0.3]), 4.0)
    if abs(hand[2] - handle[2]) > 0.04:
        return Phase("above the handle; lower to it", handle, 4.0)
    return Phase("at the handle; pull the drawer open", handle + np.array([0.0, -0.06, 0.0]), 50.0)


@_task("drawer-close-v3", "drawer closed; done")
def _drawer_close(state: np.ndarray) -> Phase:
    hand, drawer, _ = _split(state)
    handle = drawer + np.array([0.0, 0.0, -0.02])
    if hand[1] > handle[1]:
        if hand[2] < handle[2] + 0.23:
            return Phase("past the handle, low; rise up", np.array([hand[0], hand[1], handle[2] + 0.5]), 25.0)
        return Phase("past the handle, high; move before it", handle + np.array([0.0, -0.075, 0.23]), 25.0)
    if abs(hand[2] - handle[2]) > 0.04:
        return Phase("before the handle; lower to it", handle + np.array([0.0, -0.075, 0.0]), 25.0)
    return Phase("at the handle; push the drawer closed", handle, 25.0)


@_task("button-press-topdown-v3", "button pressed; done")
def _button_press_topdown(state: np.ndarray) -> Phase:
    hand, button, _ = _split(state)
    if _xy(hand, button) > 0.04:
        return Phase("not above the button; move above it", button + np.array([0.0, 0.0, 0.1]), 25.0)
    return Phase("above the button; press it down", button, 25.0)


def _window(state: np.ndarray, side: float, rise: float, push: str) -> Phase:
    hand, window, _ = _split(state)
    handle = window + np.array([side, -0.03, -0.08])
    if _xy(hand, handle) > 0.04:
        return Phase("not above the handle; move above it", handle + np.array([0.0, 0.0, rise]), 25.0)
    if abs(hand[2] - handle[2]) > 0.02:
        return Phase("above the handle; lower to it", handle, 25.0)
    return Phase(f"at the handle; {push}", handle + np.array([-np.sign(side) * 0.1, 0.0, 0.0]), 25.0)


@_task("window-open-v3", "window open; done")
def _window_open(state: np.ndarray) -> Phase:
    return _window(state, -0.03, 0.3, "slide the window open")


@_task("window-close-v3", "window closed; done")
def _window_close(state: np.ndarray) -> Phase:
    return _window(state, 0.03, 0.25, "slide the window closed")


@_task("push-v3", "puck at the goal; done")
def _push(state: np.ndarray) -> Phase:
    hand, puck, goal = _split(state)
    puck = puck + np.array([-0.005, 0.0, 0.0])
    if _xy(hand, puck) > 0.02:
        return Phase("not above the puck; move above it", puck + np.array([0.0, 0.0, 0.2]), 10.0)
    if abs(hand[2] - puck[2]) > 0.04:
        return Phase("above the puck; lower onto it", puck + np.array([0.0, 0.0, 0.03]), 10.0)
    return Phase("at the puck; push it to the goal", goal, 10.0)


@_task("pick-place-v3", "puck at the goal; done")
def _pick_place(state: np.ndarray) -> Phase:
    hand, puck, goal = _split(state)
    puck = puck + np.array([-0.005, 0.0, 0.0])
    if _xy(hand, puck) > 0.02:
        return Phase("not above the puck; move above it", puck + np.array([0.0, 0.0, 0.1]), 10.0)
    if abs(hand[2] - puck[2]) > 0.05 and puck[2] < 0.04:
        return Phase("above the puck; lower onto it", puck + np.array([0.0, 0.0, 0.03]), 10.0)
    if state[3] > 0.73:
        return Phase("at the puck; close the gripper", hand, 10.0)
    return Phase("puck held; carry it to the goal", goal, 10.0)


@_task("door-open-v3", "door open; done")
def _door_open(state: np.ndarray) -> Phase:
    hand, door, _ = _split(state)
    handle = door - np.array([0.05, 0.0, 0.0])
    if _xy(hand, handle) > 0.12:
        return Phase("not above the handle; move above it", handle + np.array([0.06, 0.02, 0.2]), 25.0)
    if abs(hand[2] - handle[2]) > 0.04:
        return Phase("above the handle; lower to it", handle + np.array([0.06, 0.02, 0.0]), 25.0)
    return Phase("at the handle; pull the door open", handle, 25.0)


@_task("peg-insert-side-v3", "peg in the hole; done")
def _peg_insert_side(state: np.ndarray) -> Phase:
    hand, peg, goal = _split(state)
    hole = np.array([-0.35, goal[1], 0.16])
    if _xy(hand, peg) > 0.04:
        return Phase("not above the peg; move above it", peg + np.array([0.0, 0.0, 0.3]), 25.0)
    if abs(hand[2] - peg[2]) > 0.025:
        return Phase("above the peg; lower to it", peg, 25.0)
    if np.linalg.norm(peg[1:] - hole[1:]) > 0.03:
        return Phase("peg held; line it up with the hole", hole + np.array([0.4, 0.0, 0.0]), 25.0)
    return Phase("peg lined up; push it into the hole", hole, 25.0)
