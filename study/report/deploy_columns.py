"""The report's deployment view: size, latency and throughput per backbone, and accuracy against
latency.

The figures are the ones stored at the end of the study (`best/<backbone>/latency.json`, written by
`fer.deploy.latency` where the best model was evaluated), never re-timed while the report is built:
the report often runs on a different or busier machine. The plot marks the Pareto front: the
backbones no other backbone beats on both test accuracy and one-image CPU latency.
"""

from __future__ import annotations

import json
from pathlib import Path

from fer.core.names import LATENCY_FILE
from study.report import figures


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For (latency, accuracy) points, whether each is Pareto-optimal: no other point is at least as
    fast and at least as accurate and strictly better in one of the two. Ties (equal points) all
    stay on it."""
    front = []
    for i, (lat, acc) in enumerate(points):
        dominated = any(
            l2 <= lat and a2 >= acc and (l2 < lat or a2 > acc)
            for j, (l2, a2) in enumerate(points)
            if j != i
        )
        front.append(not dominated)
    return front


def _read(folder: Path | None) -> dict | None:
    path = Path(folder) / LATENCY_FILE if folder is not None else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def add_deployment_columns(rows: list[dict], study) -> None:
    """Add the stored deployment figures to the comparison rows (so comparison.csv has them too)."""
    folders = {b.name: b.folder for b in study.backbones}
    for row in rows:
        stored = _read(folders.get(row["backbone"])) if row.get("status") == "ok" else None
        if not stored:
            continue
        row["size_mb"] = round(stored["size_bytes"] / 1e6, 3)
        for device, timing in stored.get("devices", {}).items():
            row[f"{device}_latency_ms"] = timing["latency_ms_median"]
            row[f"{device}_latency_p90_ms"] = timing["latency_ms_p90"]
            row[f"{device}_images_per_s_b{timing['batch']}"] = timing["images_per_s"]
        row["latency_machine"] = _machine_line(stored)


def _machine_line(stored: dict) -> str:
    machine = stored.get("machine") or {}
    gpus = ", ".join(machine.get("gpus") or []) or "no GPU"
    threads = stored.get("threads")
    load = stored.get("load_average_before")
    return (
        f"{machine.get('cpu', '?')} ({machine.get('cores', '?')} cores"
        + (f", {threads} thread(s) used" if threads else "")
        + f"), {gpus}; "
        f"{stored.get('backend', '?')} backend"
        + (f"; load average {load[0]:.2f} before" if load else "")
    )


def deployment_cells(row: dict) -> dict:
    """The comparison table's deployment columns for one row (empty where nothing was stored)."""
    if row.get("size_mb") is None:
        return {}
    cells = {"size MB": f"{row['size_mb']:.2f}"}
    for device in ("cpu", "gpu"):
        if row.get(f"{device}_latency_ms") is not None:
            batch = next((k for k in row if k.startswith(f"{device}_images_per_s_b")), None)
            cells[f"{device.upper()} ms/image (median, p90)"] = (
                f"{row[f'{device}_latency_ms']:.1f}, {row[f'{device}_latency_p90_ms']:.1f}"
            )
            if batch:
                cells[f"{device.upper()} images/s (batch {batch.rsplit('_b', 1)[1]})"] = (
                    f"{row[batch]:.0f}"
                )
    return cells


def accuracy_latency_chart(rows: list[dict], front: list[bool]) -> bytes:
    """Test accuracy (95% interval) against median one-image CPU latency; the Pareto front joined
    and filled."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for r, on_front in zip(rows, front):
        ax.errorbar(
            r["cpu_latency_ms"],
            r["accuracy"],
            yerr=[[r["accuracy"] - r["accuracy_lo"]], [r["accuracy_hi"] - r["accuracy"]]],
            fmt="o" if on_front else "s",
            color="C0" if on_front else "0.55",
            capsize=4,
        )
        ax.annotate(
            r["backbone"],
            (r["cpu_latency_ms"], r["accuracy"]),
            textcoords="offset points",
            xytext=(6, 4),
            fontsize=8,
        )
    best = sorted((r["cpu_latency_ms"], r["accuracy"]) for r, f in zip(rows, front) if f)
    if best:
        ax.step(
            [p[0] for p in best],
            [p[1] for p in best],
            where="post",
            color="C0",
            lw=1,
            label="Pareto front (faster or more accurate than every other)",
        )
        ax.legend(loc="lower right", fontsize=7)
    if max(r["cpu_latency_ms"] for r in rows) > 10 * min(r["cpu_latency_ms"] for r in rows):
        ax.set_xscale("log")
    ax.set_xlabel("CPU latency, one image (median ms)")
    ax.set_ylabel("test accuracy (95% interval)")
    ax.grid(alpha=0.3)
    return figures._png(fig)


def deployment_section(doc, rows: list[dict]) -> None:
    """The accuracy-vs-latency figure under the comparison table (nothing when no figures were
    stored)."""
    timed = [r for r in rows if r.get("status") == "ok" and r.get("cpu_latency_ms") is not None]
    if not timed:
        return
    front = pareto_front([(r["cpu_latency_ms"], r["accuracy"]) for r in timed])
    doc.heading("Accuracy for its cost (deployment view)")
    doc.para(
        "Size: the model's variables (what a float export holds; the .keras file adds the "
        "optimizer's state). Latency: one image through the Keras model, median and 90th "
        "percentile of 50 calls after warm-up; throughput: images/s at batch 64. Measured once, "
        "when the study evaluated each best model, on: "
        + "; ".join(sorted({r["latency_machine"] for r in timed}))
        + ". Backbones on the Pareto front "
        "(no other backbone is both faster and more accurate): "
        + ", ".join(r["backbone"] for r, f in zip(timed, front) if f)
        + "."
    )
    doc.figure(
        "accuracy_latency",
        accuracy_latency_chart(timed, front),
        "Test accuracy (95% interval) against one-image CPU latency; the line joins the Pareto "
        "front",
    )
