"""The report's figures: each function takes plain data and returns PNG bytes.

PNG bytes (not files) so the report can both write `figures/<name>.png` and embed the same bytes in
the self-contained HTML. Matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

DPI = 100


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def comparison_chart(rows: list[dict]) -> bytes:
    """Test accuracy and macro F1 per backbone with their 95% intervals as error bars."""
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(rows) + 2), 3.2))
    x = np.arange(len(rows))
    for offset, key, label in ((-0.18, "accuracy", "accuracy"), (0.18, "macro_f1", "macro F1")):
        values = np.array([r[key] for r in rows], float)
        errors = np.array(
            [[r[key] - r[f"{key}_lo"], r[f"{key}_hi"] - r[key]] for r in rows], float
        ).T
        ax.bar(x + offset, values, width=0.36, yerr=errors, capsize=4, label=label)
    ax.set_xticks(x, [r["backbone"] for r in rows])
    ax.set_ylim(0, 1)
    ax.set_ylabel("test score (95% interval)")
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def confusion_matrices(cm: list[list[int]], classes: list[str], title: str) -> bytes:
    """Counts and row-normalised (recall per true class) confusion matrices side by side."""
    import seaborn as sns

    counts = np.asarray(cm, float)
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    size = 2.2 + 0.55 * len(classes)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size))
    sns.heatmap(
        counts,
        annot=True,
        fmt=".0f",
        cmap="Blues",
        cbar=False,
        ax=axes[0],
        xticklabels=classes,
        yticklabels=classes,
    )
    sns.heatmap(
        normalised,
        annot=True,
        fmt=".2f",
        cmap="Blues",
        vmin=0,
        vmax=1,
        cbar=False,
        ax=axes[1],
        xticklabels=classes,
        yticklabels=classes,
    )
    for ax, sub in zip(axes, ("counts", "row-normalised (recall)")):
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{title}: {sub}", fontsize=9)
    return _png(fig)


def per_class_bars(per_class: dict[str, dict], title: str) -> bytes:
    """Precision, recall and F1 per class, grouped."""
    classes = list(per_class)
    x = np.arange(len(classes))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(classes) + 1.5), 3.0))
    for i, metric in enumerate(("precision", "recall", "f1")):
        ax.bar(
            x + (i - 1) * 0.27, [per_class[c][metric] for c in classes], width=0.27, label=metric
        )
    ax.set_xticks(x, classes, rotation=20)
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.22))
    return _png(fig)


def learning_curves(history: pd.DataFrame, title: str) -> bytes:
    """Loss and accuracy/F1 per global epoch across both stages, with the head -> finetune boundary
    marked."""
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.0))
    epoch = history["epoch"]
    for ax, keys in (
        (axes[0], ("loss", "val_loss")),
        (axes[1], ("accuracy", "val_accuracy", "val_macro_f1")),
    ):
        for key in keys:
            if key in history:
                ax.plot(epoch, history[key], marker="o", ms=3, label=key)
        ax.set_xlabel("epoch (both stages)")
        ax.legend(fontsize=7)
    if (
        "stage" in history
        and (history["stage"] == "finetune").any()
        and (history["stage"] == "head").any()
    ):
        boundary = history.loc[history["stage"] == "finetune", "epoch"].min() - 0.5
        for ax in axes:
            ax.axvline(boundary, color="grey", ls="--", lw=1)
            ax.text(boundary, ax.get_ylim()[1], " fine-tune", fontsize=7, va="top", color="grey")
    axes[0].set_title(f"{title}: loss", fontsize=9)
    axes[1].set_title(f"{title}: accuracy, macro F1", fontsize=9)
    return _png(fig)


def search_history(
    numbers: list[int], values: list[float], minimize: bool, metric: str, title: str
) -> bytes:
    """Each trial's value in order, with the best so far."""
    fig, ax = plt.subplots(figsize=(4.6, 3.0))
    ax.plot(numbers, values, "o", ms=4, label="trial")
    best = np.minimum.accumulate(values) if minimize else np.maximum.accumulate(values)
    ax.step(numbers, best, where="post", color="C3", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)


def importances(values: dict[str, float], title: str) -> bytes:
    names = list(values)[::-1]
    fig, ax = plt.subplots(figsize=(4.6, 0.45 * len(names) + 1.0))
    ax.barh(names, [values[n] for n in names])
    ax.set_xlabel("importance (fANOVA)")
    ax.set_title(title, fontsize=9)
    return _png(fig)


def deletion_curves(curves: dict[str, np.ndarray], title: str) -> bytes:
    """Probability of the explained class as the top-ranked pixels are removed, per ranking."""
    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    for name, curve in curves.items():
        ax.plot(
            np.linspace(0, 1, len(curve)),
            curve,
            marker="o",
            ms=3,
            label=name,
            ls=":" if name == "random" else "-",
        )
    ax.set_xlabel("fraction of pixels removed")
    ax.set_ylabel("probability of explained class")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)


def faithfulness_curves(curves: dict[str, dict[str, np.ndarray]], title: str) -> bytes:
    """Deletion and insertion curves side by side (mode -> method -> mean curve)."""
    fig, axes = plt.subplots(1, len(curves), figsize=(3.6 * len(curves), 3.0), squeeze=False)
    for ax, (mode, by_name) in zip(axes[0], curves.items()):
        for name, curve in by_name.items():
            ax.plot(
                np.linspace(0, 1, len(curve)),
                curve,
                marker="o",
                ms=3,
                label=name,
                ls=":" if name == "random" else "-",
            )
        ax.set_xlabel(f"fraction of pixels {'removed' if mode == 'deletion' else 'inserted'}")
        ax.set_ylabel("probability of explained class")
        ax.set_ylim(0, 1)
        ax.set_title(f"{title}: {mode}", fontsize=9)
        ax.legend(fontsize=7)
    return _png(fig)


def sanity_curves(steps: list[str], median_rho: dict[str, list[float]], title: str) -> bytes:
    """Median rank correlation with the trained model's maps after each cascading randomisation
    step."""
    fig, ax = plt.subplots(figsize=(4.6, 3.0))
    x = np.arange(len(steps))
    for name, values in median_rho.items():
        ax.plot(x, values, marker="o", ms=3, label=name)
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    ax.set_xticks(x, steps, rotation=20, ha="right", fontsize=6.5)
    ax.set_ylabel("median Spearman rho")
    ax.set_ylim(-0.2, 1.05)
    ax.set_title(f"{title}: randomisation sanity check", fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)


def image_grid(
    panels: list[list[tuple[np.ndarray, str]]], title: str, column_titles: list[str] | None = None
) -> bytes:
    """Rows of (image, caption) panels; empty slots are left blank."""
    n_rows, n_cols = len(panels), max(len(r) for r in panels)
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(1.6 * n_cols, 1.75 * n_rows + 0.4), squeeze=False
    )
    for r, row in enumerate(panels):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(row) and row[c] is not None:
                image, caption = row[c]
                ax.imshow(image)
                ax.set_title(caption, fontsize=6.5)
    if column_titles:
        for c, text in enumerate(column_titles[:n_cols]):
            axes[0][c].annotate(
                text,
                (0.5, 1.32),
                xycoords="axes fraction",
                ha="center",
                fontsize=7.5,
                weight="bold",
            )
    fig.suptitle(title, fontsize=10)
    return _png(fig)
