"""The loss curves of a bench/train.py run as a PNG (needs matplotlib, not a dependency).

    python bench/plot_train.py bench/results/train-<gpu>-<date>.json   # writes the .png beside it
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    record = json.loads(path.read_text())
    figure, (curves, gaps) = plt.subplots(1, 2, figsize=(11, 4))
    baseline = record["results"]["transformers"]["losses"]
    for index, (name, row) in enumerate(record["results"].items()):
        if "error" in row:
            continue
        steps = range(1, len(row["losses"]) + 1)
        style = {"color": f"C{index}", "linewidth": 1.2}
        label = f"{name}: {row['step_ms']:.0f} ms, {row['peak_gib']:.1f} GiB"
        curves.plot(steps, row["losses"], label=label, **style)
        if name != "transformers":
            gaps.plot(steps, [a - b for a, b in zip(row["losses"], baseline)], label=name, **style)
    curves.set(xlabel="step", ylabel="loss", title=f"Llama-3.2-1B shape, {record['batch']} x {record['seq']} tokens")
    curves.legend(fontsize=7)
    gaps.set(xlabel="step", ylabel="loss minus transformers' loss", title="difference to transformers as is")
    gaps.axhline(0.0, color="grey", linewidth=0.5)
    gaps.legend(fontsize=7)
    figure.suptitle(f"{record['gpu']}, torch {record['torch']}, transformers {record['transformers']}", fontsize=9)
    figure.tight_layout()
    out = path.with_suffix(".png")
    figure.savefig(out, dpi=110)
    print("saved", out)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
