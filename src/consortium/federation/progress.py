"""Progress bars and result tables for the command line (rich)."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from consortium.federation.coordinator import RoundReport
from consortium.federation.experiment import ExperimentResult


class RoundProgress:
    """A progress bar over federated rounds; a no-op when ``enabled`` is False."""

    def __init__(self, *, total: int, enabled: bool = True) -> None:
        self.total = total
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
            console=Console(stderr=True), disable=not enabled,
        )
        self._task = self._progress.add_task("federated rounds", total=total, info="")

    def __enter__(self) -> RoundProgress:
        self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._progress.stop()

    def stage(self, text: str) -> None:
        """Print a stage line above the bar."""
        if self.enabled:
            self._progress.console.print(f"[cyan]{text}")

    def update(self, report: RoundReport) -> None:
        """Advance by one completed round."""
        auprc = report.global_metrics.get("auprc")
        info = f"AUPRC {auprc:.4f}" if auprc is not None else ""
        self._progress.update(self._task, completed=report.round, info=info)


def print_results_table(result: ExperimentResult, *, console: Console | None = None) -> None:
    """AUPRC / ROC-AUC / recall@1%FPR of local-only, federated and centralized models."""
    console = console or Console()
    table = Table(title=f"Held-out results on {result.dataset} ({len(result.run.institutions)} institutions)")
    for col in ("model", "AUPRC", "ROC-AUC", "recall@1%FPR"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for row in result.table_rows():
        style = "bold" if row["model"] == "federated" else None
        table.add_row(row["model"], f"{row['auprc']:.4f}", f"{row['roc_auc']:.4f}",
                      f"{row['recall_at_1pct_fpr']:.4f}", style=style)
    console.print(table)
