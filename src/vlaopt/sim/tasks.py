"""MetaWorld (v3) task names, the named task sets, and one natural-language instruction per task.

Kept as plain data, without importing MetaWorld, so that naming tasks costs nothing; the tests check
these lists against the installed MetaWorld.
"""

from __future__ import annotations

INSTRUCTIONS: dict[str, str] = {
    "assembly-v3": "pick up the nut and place it onto the peg",
    "basketball-v3": "dunk the basketball into the basket",
    "bin-picking-v3": "move the puck from one bin into the other bin",
    "box-close-v3": "grasp the lid and close the box with it",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-topdown-wall-v3": "reach over the wall and press the button from the top",
    "button-press-v3": "press the button",
    "button-press-wall-v3": "reach past the wall and press the button",
    "coffee-button-v3": "push the button on the coffee machine",
    "coffee-pull-v3": "pull the mug out from under the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "turn the dial",
    "disassemble-v3": "pick the nut off the peg",
    "door-close-v3": "close the door",
    "door-lock-v3": "lock the door by turning the lock",
    "door-open-v3": "open the door",
    "door-unlock-v3": "unlock the door by turning the lock",
    "hand-insert-v3": "insert the gripper into the hole",
    "drawer-close-v3": "push the drawer closed",
    "drawer-open-v3": "pull the drawer open",
    "faucet-open-v3": "turn the faucet handle to open it",
    "faucet-close-v3": "turn the faucet handle to close it",
    "hammer-v3": "hammer the nail into the wall",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "pick-place-wall-v3": "pick up the puck, move it over the wall and place it at the goal",
    "pick-out-of-hole-v3": "pick the puck up out of the hole",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "plate-slide-v3": "slide the plate into the cabinet",
    "plate-slide-side-v3": "slide the plate sideways into the cabinet",
    "plate-slide-back-v3": "slide the plate out of the cabinet",
    "plate-slide-back-side-v3": "slide the plate sideways out of the cabinet",
    "peg-insert-side-v3": "insert the peg sideways into the hole",
    "peg-unplug-side-v3": "unplug the peg sideways",
    "soccer-v3": "kick the ball into the goal",
    "stick-push-v3": "grasp the stick and push the box with it",
    "stick-pull-v3": "grasp the stick and pull the box with it",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck around the wall to the goal",
    "push-back-v3": "pull the puck back to the goal",
    "reach-v3": "move the gripper to the goal",
    "reach-wall-v3": "move the gripper over the wall to the goal",
    "shelf-place-v3": "pick up the puck and place it on the shelf",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the table",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}
"""Every MetaWorld v3 task, in MetaWorld's own order, with the instruction the policy is given."""

TASK_SETS: dict[str, tuple[str, ...]] = {
    "mt10": (
        "reach-v3",
        "push-v3",
        "pick-place-v3",
        "door-open-v3",
        "drawer-open-v3",
        "drawer-close-v3",
        "button-press-topdown-v3",
        "peg-insert-side-v3",
        "window-open-v3",
        "window-close-v3",
    ),
    "mt50": tuple(INSTRUCTIONS),
    "default": (
        "reach-v3",
        "drawer-open-v3",
        "drawer-close-v3",
        "button-press-topdown-v3",
        "window-open-v3",
        "window-close-v3",
    ),
}
"""Named task sets: MetaWorld's MT10 and MT50 benchmarks, and `default`, the six MT10 tasks the
bundled default policy was trained on."""


def resolve_tasks(spec: str) -> list[str]:
    """Turn a task spec into task names: a set name (`mt10`), a task (`reach-v3`), or a comma list of both.

    Duplicates are dropped, first occurrence wins. Unknown names raise ValueError listing the valid ones.
    """
    tasks: list[str] = []
    for item in (part.strip() for part in spec.split(",")):
        if item.lower() in TASK_SETS:
            names = TASK_SETS[item.lower()]
        elif item in INSTRUCTIONS:
            names = (item,)
        else:
            raise ValueError(
                f"unknown task or task set {item!r} in {spec!r}; expected one of the sets "
                f"{sorted(TASK_SETS)} or a task from {list(INSTRUCTIONS)}"
            )
        tasks.extend(name for name in names if name not in tasks)
    return tasks


def instruction(task: str) -> str:
    """The natural-language instruction for `task`."""
    if task not in INSTRUCTIONS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(INSTRUCTIONS)}")
    return INSTRUCTIONS[task]
