"""A checkpoint across topologies: the shards that the processes of a replicas x stages job write
are merged into the network's whole state (the checkpoint one process writes), and that state is
split again for whatever replicas and stages resume it.

**Stages.** Every stage writes its own modules' weights (under the network's module numbers), its
optimizer and its rule's registers. Parameters are numbered in network order, which is the stages'
order concatenated.

**Replicas.** Replica r of R holds clips [r*b, (r+1)*b) of every batch of R*b, so its registers
(activations, windows, messages, targets: every tensor whose first dimension is the batch) are
that slice of the registers one process would hold for the whole batch. The whole batch's are the
replicas' tensors concatenated in replica order, which any number of replicas (each taking its
slice back) resumes from. Two kinds of entry need more:

- gradient messages: a frame's loss is a mean over the clips of the batch, so a replica's
  messages are R times the single process's for the same clips; concatenated, they are divided
  by R (and a replica's share multiplied back);
- pseudo-gradient sums are not per clip: every replica's are averaged before any update, so the
  merge keeps their mean, and every replica continues from it (the mean of the sums is the
  single process's sum for the batch).

Clocks, counts and frame numbers are the same on every replica.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch

from sideways_cli.engine.clock import runs_chunked

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
    """Stage optimizers (same hyperparameters and groups, each group's parameters in the network's
    order) as the network's optimizer, which numbers its parameters group by group, and within a
    group stage by stage (the stages hold consecutive modules)."""
    merged_state: dict[int, Any] = {}
    groups = []
    offset = 0
    for g, group in enumerate(states[0]["param_groups"]):
        params: list[int] = []
        for state in states:
            own = state["param_groups"][g]["params"]
            params += [offset + i for i in range(len(own))]
            merged_state.update({offset + k: state["state"][i] for k, i in enumerate(own)
                                 if i in state["state"]})
            offset += len(own)
        groups.append({**group, "params": params})
    return {"state": merged_state, "param_groups": groups}


def optimizer_for_stage(state: dict[str, Any], counts: list[list[int]], stage: int) -> dict[str, Any]:
    """The network's optimizer state cut down to stage ``stage``'s parameters; ``counts[s][g]``:
    how many parameters of group g stage s has."""
    own_state: dict[int, Any] = {}
    groups = []
    offset, own_offset = 0, 0
    for g, group in enumerate(state["param_groups"]):
        start = offset + sum(counts[s][g] for s in range(stage))
        size = counts[stage][g]
        own_state.update({own_offset + i: state["state"][start + i] for i in range(size)
                          if start + i in state["state"]})
        groups.append({**group, "params": list(range(own_offset, own_offset + size))})
        offset += sum(counts[s][g] for s in range(len(counts)))
        own_offset += size
    return {"state": own_state, "param_groups": groups}


# SidewaysRule's per-module lists; the rest of its state is the same scalars on every stage
# ("routed": the staleness dial's messages on their way down, absent from older checkpoints)
_PER_MODULE = (("pipeline", "windows"), ("pipeline", "outputs"), ("pipeline", "fresh"),
               ("current",), ("messages",), ("pseudo", "sums"), ("pseudo", "counts"), ("routed",))
_SPLIT = {path[0] for path in _PER_MODULE}


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
    merged = {key: value for key, value in stages[0]["rule"].items() if key not in _SPLIT}
    for path in _PER_MODULE:
        if path[0] not in stages[0]["rule"]:
            continue
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
    rule = {key: value for key, value in state.items() if key not in _SPLIT}
    for path in _PER_MODULE:
        if path[0] in state:
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
    """Stage states of :class:`StagedChunked` as the one :class:`ChunkedSideways` state.

    Between batches nothing is on the wire: a stage's outputs wait in the inbox of the stage
    above's bottom module, its messages in the mailbox of the stage below's top module; only the
    network's top module has an inbox of its own (the logits on their way to the loss).
    """
    rules = [stage["rule"] for stage in stages]
    per_module = [key for key in ("registers", "mailbox", "routed") if key in rules[0]]
    merged = {**rules[0], **{key: [] for key in per_module}, "inbox": [],
              "pseudo": {"sums": [], "counts": []}}
    for rule in rules:
        for key in per_module:
            merged[key] += rule[key]
        merged["inbox"] += rule["inbox"][:-1]
        for key in ("sums", "counts"):
            merged["pseudo"][key] += rule["pseudo"][key]
    merged["inbox"].append(rules[-1]["inbox"][-1])
    _fill_targets(_batched_tokens(merged), stages[-1]["targets"])
    return merged


def batched_for_stage(state: dict[str, Any], modules: range, stage: int,
                      stages: int) -> dict[str, Any]:
    """The network's :class:`ChunkedSideways` state cut down to one stage's."""
    own = slice(modules.start, modules.stop)
    last = stage == stages - 1
    rule = {**state, **{key: state[key][own] for key in ("registers", "mailbox", "routed") if key in state},
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
    """Every token a ChunkedSideways state holds: window registers and queued inputs."""
    return [token for queue in state["registers"] + state["inbox"] for token in queue]


def _tokens(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every token a SidewaysRule state holds: window slots, output registers, graphs' tokens."""
    tokens = [token for window in state["pipeline"]["windows"] for token in window]
    tokens += [token for token in state["pipeline"]["outputs"] if token is not None]
    tokens += [step["token"] for step in state["current"] if step is not None]
    return tokens


_AVERAGED = "pseudo"  # a rule's pseudo-gradient sums, in every layout
_MESSAGES = ("messages", "mailbox", "pending_message", "routed")  # gradient messages, in every layout
KIND_SLICE, KIND_MESSAGE, KIND_MEAN = "slice", "message", "mean"


def _kind(key: str, kind: str) -> str:
    if key == _AVERAGED:
        return KIND_MEAN
    return KIND_MESSAGE if key in _MESSAGES else kind


def merge_replica_states(states: list[Any], kind: str = KIND_SLICE) -> Any:
    """The whole batch's state from every replica's, in replica order."""
    first = states[0]
    if isinstance(first, torch.Tensor):
        if kind == KIND_MEAN:
            return torch.stack(states).mean(dim=0)
        merged = torch.cat(states)
        return merged / len(states) if kind == KIND_MESSAGE else merged
    if isinstance(first, dict):
        return {key: merge_replica_states([s[key] for s in states], _kind(key, kind)) for key in first}
    if isinstance(first, (list, tuple)):
        return type(first)(merge_replica_states(list(items), kind) for items in zip(*states))
    if any(s != first for s in states):  # a clock or count that should agree
        raise ValueError(f"replicas disagree on {first!r} vs {states}")
    return first


def replica_share(state: Any, replica: int, replicas: int, kind: str = KIND_SLICE) -> Any:
    """Replica ``replica``'s slice of a whole batch's state (the inverse of the merge)."""
    if isinstance(state, torch.Tensor):
        if kind == KIND_MEAN:
            return state.clone()
        if len(state) % replicas:
            raise ValueError(f"a batch of {len(state)} does not split into {replicas} replicas")
        share = state.chunk(replicas)[replica].clone()
        return share * replicas if kind == KIND_MESSAGE else share
    if isinstance(state, dict):
        return {key: replica_share(value, replica, replicas, _kind(key, kind))
                for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(replica_share(item, replica, replicas, kind) for item in state)
    return state


def moved(state: Any, device: torch.device | str) -> Any:
    """``state`` with every tensor on ``device`` (detached): a checkpoint's registers, read on the
    CPU, onto the device of the process that owns them."""
    if isinstance(state, torch.Tensor):
        return state.detach().to(device)
    if isinstance(state, dict):
        return {key: moved(value, device) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(moved(item, device) for item in state)
    return state


def with_learner(payload: dict[str, Any], learner: dict[str, Any]) -> dict[str, Any]:
    """One process's checkpoint: ``payload`` (step, config, classes, the run's ``resume`` state,
    ...) and the learner's part, whose rule registers (and every rank's random streams, merged
    from a job) go under ``resume``."""
    ckpt = {**payload, "model": learner["model"], "optimizer": learner["optimizer"],
            "schedule": learner["schedule"]}
    if "ema" in learner:
        ckpt["ema"] = learner["ema"]
    if "rule" in learner:
        extra = {key: learner[key] for key in ("rule", "rank_rng") if key in learner}
        ckpt["resume"] = {**payload["resume"], **extra}
    return ckpt


def merge_shards(shards: list[dict[str, Any]], replicas: int, stages: int,
                 merge_stage_rules: Callable[[list[Any]], Any]) -> dict[str, Any]:
    """The learner part of the checkpoint one process would have written, from a job's shards in
    rank order (rank r: replica r // stages, stage r % stages): the network's weights, optimizer
    and schedule (replica 0's: every replica holds the same), the average of the weights if kept,
    the whole batch's registers (``merge_stage_rules``: how one replica's stage rules join), and
    every rank's random streams under ``rank_rng``."""
    by_stage = [[shards[r * stages + s] for r in range(replicas)] for s in range(stages)]
    first_replica = [column[0] for column in by_stage]
    def joined(key: str) -> dict[str, Any]:  # each stage's tensors under the network's keys
        return {name: value for shard in first_replica for name, value in shard[key].items()}

    merged = {"model": joined("model"), "schedule": first_replica[0]["schedule"],
              "optimizer": (merge_optimizers([s["optimizer"] for s in first_replica]) if stages > 1
                            else first_replica[0]["optimizer"])}
    if "ema" in first_replica[0]:
        merged["ema"] = joined("ema")
    if "rule" in first_replica[0]:
        rules = [merge_replica_states([s["rule"] for s in column]) if replicas > 1 else column[0]["rule"]
                 for column in by_stage]
        merged["rule"] = merge_stage_rules(rules) if stages > 1 else rules[0]
        merged["rank_rng"] = [shard["rng"] for shard in shards]
    return merged


def stage_rules_merger(mode: str, update: str, chunk: int) -> Callable[[list[Any]], Any]:
    """How the stages' rule states of one replica join into the network's: by the executor's
    layout (``clock.register_layout``); pipelined BP carries nothing."""
    if mode == "bp":
        return lambda rules: {}
    return merge_batched if runs_chunked(update, chunk) else merge_sideways


def stage_rule_share(state: dict[str, Any], mode: str, update: str, chunk: int, modules: range,
                     stage: int, stages: int) -> dict[str, Any]:
    """One stage's part of the network's rule state (the inverse of :func:`stage_rules_merger`)."""
    if mode == "bp" or stages == 1:
        return state
    share = batched_for_stage if runs_chunked(update, chunk) else sideways_for_stage
    return share(state, modules, stage, stages)
