"""A stage's share of a checkpoint, and the ordinary single-process checkpoint they reassemble into.

Every stage writes its own shard (its modules' weights, its optimizer, its rule's registers); the
first stage reassembles them into the ordinary ``checkpoints/*.pt`` that ``sideways eval``,
``compare``, ``stream`` and a single-process resume read, and that a P-stage run splits again when
it resumes. Parameters are numbered in network order, which is the stages' order concatenated.
"""

from __future__ import annotations

import re
from typing import Any

_STACK_KEY = re.compile(r"^stack\.(\d+)\.")


def model_state_to_network(state: dict[str, Any], modules: range) -> dict[str, Any]:
    """A stage stack's state dict (modules numbered from 0) under the network's module numbers."""
    return {_STACK_KEY.sub(lambda m: f"stack.{modules.start + int(m.group(1))}.", k): v
            for k, v in state.items()}


def model_state_for_stage(state: dict[str, Any], modules: range) -> dict[str, Any]:
    """The network's state dict cut down to one stage's modules, numbered from 0."""
    stage: dict[str, Any] = {}
    for key, value in state.items():
        match = _STACK_KEY.match(key)
        if match and int(match.group(1)) in modules:
            stage[_STACK_KEY.sub(f"stack.{int(match.group(1)) - modules.start}.", key)] = value
    return stage


def merge_optimizers(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Stage optimizers (same hyperparameters, one param group each) as the network's optimizer."""
    merged_state: dict[int, Any] = {}
    params: list[int] = []
    for state in states:
        offset = len(params)
        (group,) = state["param_groups"]
        params += [offset + i for i in group["params"]]
        merged_state.update({offset + i: s for i, s in state["state"].items()})
    group = {**states[0]["param_groups"][0], "params": params}
    return {"state": merged_state, "param_groups": [group]}


def optimizer_for_stage(state: dict[str, Any], counts: list[int], stage: int) -> dict[str, Any]:
    """The network's optimizer state cut down to stage ``stage``'s parameters; ``counts``: how
    many parameters each stage has."""
    start = sum(counts[:stage])
    own = range(start, start + counts[stage])
    (group,) = state["param_groups"]
    return {"state": {i - start: s for i, s in state["state"].items() if i in own},
            "param_groups": [{**group, "params": list(range(counts[stage]))}]}


# SidewaysRule's per-module lists; the rest of its state is the same scalars on every stage
_PER_MODULE = (("pipeline", "windows"), ("pipeline", "outputs"), ("pipeline", "fresh"),
               ("current",), ("messages",), ("pseudo", "sums"), ("pseudo", "counts"))


def _get(state: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        state = state[key]
    return state


def _set(state: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        state = state.setdefault(key, {})
    state[path[-1]] = value


def merge_sideways(stages: list[dict[str, Any]]) -> dict[str, Any]:
    """Stage states of :class:`StagedSideways` as the one :class:`SidewaysRule` state of the network.

    The message a stage received at its last tick is its top module's gradient register; the
    tokens of the lower stages get their targets from the last stage's record of them.
    """
    merged = {key: value for key, value in stages[0]["rule"].items()
              if key not in ("pipeline", "current", "messages", "pseudo")}
    for path in _PER_MODULE:
        values: list[Any] = []
        for i, stage in enumerate(stages):
            part = list(_get(stage["rule"], path))
            if path == ("messages",) and i < len(stages) - 1:
                part[-1] = stage["pending_message"]
            values += part
        _set(merged, path, values)
    _fill_targets(_tokens(merged), stages[-1]["targets"])
    return merged


def sideways_for_stage(state: dict[str, Any], modules: range, stage: int,
                       stages: int) -> dict[str, Any]:
    """The network's :class:`SidewaysRule` state cut down to one stage's :class:`StagedSideways`."""
    rule = {key: value for key, value in state.items()
            if key not in ("pipeline", "current", "messages", "pseudo")}
    for path in _PER_MODULE:
        _set(rule, path, list(_get(state, path))[modules.start:modules.stop])
    pending_message = None
    if stage < stages - 1:  # the top module's register: what the stage above sent last tick
        pending_message = rule["messages"][-1]
        rule["messages"][-1] = None
    pending_up = None
    if stage > 0 and state["pipeline"]["fresh"][modules.start - 1]:
        pending_up = state["pipeline"]["outputs"][modules.start - 1]
    targets = _targets(_tokens(state)) if stage == stages - 1 else {}
    return {"rule": rule, "targets": targets, "pending_up": pending_up,
            "pending_message": pending_message}


def merge_batched(stages: list[dict[str, Any]]) -> dict[str, Any]:
    """Stage states of :class:`StagedTickBatched` as the one :class:`TickBatchedSideways` state.

    Between batches nothing is on the wire: a stage's outputs wait in the inbox of the stage
    above's bottom module, its messages in the mailbox of the stage below's top module; only the
    network's top module has an inbox of its own (the logits on their way to the loss).
    """
    rules = [stage["rule"] for stage in stages]
    merged = {**rules[0], "registers": [], "inbox": [], "mailbox": [],
              "pseudo": {"sums": [], "counts": []}}
    for rule in rules:
        for key in ("registers", "mailbox"):
            merged[key] += rule[key]
        merged["inbox"] += rule["inbox"][:-1]
        for key in ("sums", "counts"):
            merged["pseudo"][key] += rule["pseudo"][key]
    merged["inbox"].append(rules[-1]["inbox"][-1])
    _fill_targets(_batched_tokens(merged), stages[-1]["targets"])
    return merged


def batched_for_stage(state: dict[str, Any], modules: range, stage: int,
                      stages: int) -> dict[str, Any]:
    """The network's :class:`TickBatchedSideways` state cut down to one stage's."""
    own = slice(modules.start, modules.stop)
    last = stage == stages - 1
    rule = {**state, "registers": state["registers"][own], "mailbox": state["mailbox"][own],
            "inbox": state["inbox"][own] + [state["inbox"][-1] if last else []],
            "pseudo": {key: state["pseudo"][key][own] for key in ("sums", "counts")}}
    return {"rule": rule, "targets": _targets(_batched_tokens(state)) if last else {}}


def _fill_targets(tokens: list[dict[str, Any]], targets: dict[int, Any]) -> None:
    """Lower stages' tokens carry no target: the last stage's record of them has it (None: a
    frame long past the top)."""
    for token in tokens:
        if token["target"] is None:
            token["target"] = targets.get(token["frame"])


def _targets(tokens: list[dict[str, Any]]) -> dict[int, Any]:
    """The last stage's record of targets by frame, from a single-process state's tokens."""
    return {token["frame"]: token["target"] for token in tokens}


def _batched_tokens(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every token a TickBatchedSideways state holds: window registers and queued inputs."""
    return [token for queue in state["registers"] + state["inbox"] for token in queue]


def _tokens(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every token a SidewaysRule state holds: window slots, output registers, graphs' tokens."""
    tokens = [token for window in state["pipeline"]["windows"] for token in window]
    tokens += [token for token in state["pipeline"]["outputs"] if token is not None]
    tokens += [step["token"] for step in state["current"] if step is not None]
    return tokens
