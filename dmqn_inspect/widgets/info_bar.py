"""Three lines saying what is on screen: the run; the user and the codebook; the candidate."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from dmqn_core.errors import printable
from dmqn_core.runs.inspection import UserInspection


class InfoBar(Static):
    def show(
        self,
        run_id: str,
        model: str,
        dataset: str,
        user_id: int,
        inspection: UserInspection | None,
        n_codebooks: int,
        codebook: int,
        candidate: int | None,
    ) -> None:
        line = Text.assemble(
            "run ",
            (printable(run_id), "bold"),
            printable(f" · {model} · {dataset}") + "\n",
            "user ",
            (str(user_id), "bold"),
        )
        if inspection is None:
            line.append(" · not loaded")
            self.update(line)
            return
        line.append(
            f" · {len(inspection.timestamp):,} behaviors, "
            + ("recorded" if inspection.recorded else "computed on demand")
            + " · "
        )
        line.append(f"codebook {codebook + 1}/{n_codebooks}", style="bold")
        line.append(f": {len(inspection.clusters(codebook))} clusters\n")
        if candidate is None:
            line.append("no test candidates")
        else:
            line.append(f"candidate {candidate + 1}/{len(inspection.candidate_item)}", style="bold")
            line.append(
                f": item {int(inspection.candidate_item[candidate])} "
                f"(category {int(inspection.candidate_category[candidate])}), "
                + ("clicked" if inspection.label[candidate] else "not clicked")
                + f", predicted {float(inspection.score[candidate]):.3f}"
            )
        self.update(line)
