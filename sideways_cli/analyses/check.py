"""``sideways check``: the frame-step contract on the configured network, its per-module costs and
the stage splits ``parallel.balance: auto`` would choose. ``train`` runs the fast subset itself
(``run.contract_gate``) when it starts on a builder of the user's own."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.table import Table

from sideways_cli.config import Config
from sideways_cli.engine.contract import Row, failures
from sideways_cli.engine.losses import OBJECTIVES
from sideways_cli.parallel.balance import measure_module_costs, partition, stage_costs
from sideways_cli.run.build import IMAGE_CHANNELS, build_network
from sideways_cli.run.contract_gate import network_rows
from sideways_cli.support.runtime import forward_autocast, resolve_device

STAGE_COUNTS = (2, 4, 8)
COST_REPEATS = 3


@dataclass
class CheckReport:
    network: str
    rows: list[Row]
    costs: list[dict] = field(default_factory=list)  # per module, bottom first
    balance: dict[int, dict] = field(default_factory=dict)  # stages -> split and its bottleneck

    @property
    def passed(self) -> bool:
        return not failures(self.rows)

    def as_dict(self) -> dict:
        return {"network": self.network, "passed": self.passed,
                "rows": [r.as_dict() for r in self.rows], "costs": self.costs,
                "balance": {str(p): split for p, split in self.balance.items()}}


def check_network(cfg: Config, num_classes: int, fast: bool = False) -> CheckReport:
    """The contract's rows for ``cfg``'s network; unless ``fast``, also the gradient properties,
    the per-module costs and the stage splits."""
    model = build_network(cfg, num_classes)
    report = CheckReport(cfg.model.name, network_rows(cfg, model, num_classes, gradients=not fast))
    if fast:
        return report
    device = resolve_device(cfg.device)
    frame = (cfg.data.batch_size, IMAGE_CHANNELS, cfg.data.size, cfg.data.size)
    costs = measure_module_costs(model.to(device), frame, COST_REPEATS, device,
                                 forward_autocast(device, cfg.amp),  # timed as a run trains
                                 objective=OBJECTIVES[cfg.task])
    report.costs = [{"module": d, "name": name, "window": k, "forward_ms": 1e3 * f,
                     "vjp_ms": 1e3 * b, "activation_bytes": out}
                    for d, (name, k, f, b, out) in enumerate(zip(
                        costs.names, model.windows, costs.forward_s, costs.backward_s,
                        costs.output_bytes))]
    total = costs.total_s
    for stages in STAGE_COUNTS:
        if stages <= len(model):
            sizes = partition(total, stages)
            slowest = max(stage_costs(total, sizes))
            report.balance[stages] = {"modules_per_stage": sizes,
                                      "speedup_bound": sum(total) / slowest}
    return report


PROPERTIES = ("no batch statistics", "per sample", "causal", "tick == clip",
              "static: sideways == bp", "top exact")


def _cell(row: Row | None) -> str:
    if row is None:
        return ""
    if row.ok is None:
        return "[dim]n/a[/]"
    mark = "[green]pass[/]" if row.ok else "[red]FAIL[/]"
    return mark if row.difference is None else f"{mark} {row.difference:.0e}"


def contract_table(report: CheckReport) -> Table:
    """A row per module (and one for the whole network), a column per property: pass or FAIL
    and the relative difference where the property is an equality."""
    table = Table(title=f"frame-step contract, {report.network}")
    table.add_column("module")
    for prop in PROPERTIES:
        table.add_column(prop)
    modules = dict.fromkeys((r.module, r.name) for r in report.rows if r.module is not None)
    for module, name in [*sorted(modules, key=lambda m: m[0]), (None, "network")]:
        cells = {r.property: r for r in report.rows if r.module == module}
        table.add_row(f"{module} {name}" if module is not None else "all (pipelined)",
                      *[_cell(cells.get(prop)) for prop in PROPERTIES])
    return table


def costs_table(report: CheckReport) -> Table:
    table = Table(title="per-module tick costs (one frame of the training batch)")
    for column in ("module", "window", "forward ms", "VJP ms", "activation KB"):
        table.add_column(column, justify="left" if column == "module" else "right")
    for c in report.costs:
        table.add_row(f"{c['module']} {c['name']}", str(c["window"]), f"{c['forward_ms']:.2f}",
                      f"{c['vjp_ms']:.2f}", f"{c['activation_bytes'] / 1024:.1f}")
    return table


def not_applicable_lines(report: CheckReport) -> list[str]:
    return [f"{r.property}: {r.detail}" for r in report.rows if r.ok is None]


def balance_lines(report: CheckReport) -> list[str]:
    return [f"parallel.stages={p}, balance auto: {split['modules_per_stage']} (at most "
            f"{split['speedup_bound']:.2f}x one process)" for p, split in report.balance.items()]
