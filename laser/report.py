"""Evaluation output (plumbing of the ``evaluate`` stage): plot rows, CSV, PNGs and the Markdown report.

Everything here renders an :class:`EvalResult` that ``stages/evaluate.py`` computed; nothing is computed from
rollouts. Files (written by :func:`write_outputs`, each atomically):

- plot data as CSV (``scaling_<eval_set>.csv``: x = ``k``, y = ``<model>_<curve>``; ``score_hist.csv``:
  x = ``bin_center``, y = ``<model>_correct`` / ``<model>_incorrect``; ``reliability.csv``: x =
  ``<model>_confidence`` or ``bin_center``, y = ``<model>_accuracy``) and the same as PNGs, rendered offline;
- the Markdown report: tables and the PNGs (relative links; figures beside the plot data), readable offline;
- the metrics JSON.

matplotlib is imported only inside :func:`render_png`.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from laser.config import PathsParams
from laser.io import atomic_path, atomic_write_json, atomic_write_text

CURVES = ("pass", "maj", "weighted_maj", "best_of")
CURVE_TITLES = {"pass": "pass@k", "maj": "maj@k", "weighted_maj": "self-reward-weighted maj@k",
                "best_of": "best-of-k by score"}
HEADLINE_VIEW = "macro"  # the headline: the mean over eval sets (the paper's "Avg"); "overall" pools samples
HEADLINE_KEYS = ("K", "avg@K", "pass@K", "maj@K", "weighted_maj@K", "best_of@K", "sv_acc_correct",
                 "sv_acc_incorrect", "sv_f1", "sv_auroc", "sv_ece", "spearman_score_length")
SV_KEYS = ("n", "n_correct", "n_incorrect", "acc_correct", "acc_incorrect", "f1", "precision", "recall",
           "f1_standard", "auroc", "ece")
HIST_BINS = 25


@dataclass
class EvalResult:
    """What the ``evaluate`` stage computes. ``metrics`` is JSON-ready; ``plots`` maps a plot name (file stem) to
    its rows (CSV columns = the keys of the first row); ``notes`` are remarks a reader should see."""

    metrics: dict[str, Any]
    plots: dict[str, list[dict[str, Any]]]
    notes: list[str] = field(default_factory=list)
    appendix: str = ""  # Markdown appended to the report (the last train step's sampled completions)


# ------------------------------------------------------------------------------------------------------ plot rows


def scaling_rows(blocks: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per k: ``<model>_<curve>`` from each model's metrics block of one eval set."""
    ks = sorted({int(k) for b in blocks.values() for k in b["pass@k"]})
    rows = []
    for k in ks:
        row: dict[str, Any] = {"k": k}
        for model, b in blocks.items():
            for curve in CURVES:
                row[f"{model}_{curve}"] = b[f"{curve}@k"].get(k)
        rows.append(row)
    return rows


def hist_rows(extras: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """``HIST_BINS`` bins over [min(0, lowest score), max(1, highest score)]: per model, counts of correct and of
    incorrect samples that have a score."""
    finite = [e["scores"][np.isfinite(e["scores"])] for e in extras.values()]
    values = np.concatenate(finite) if finite else np.zeros(0)
    lo = min(0.0, float(values.min())) if values.size else 0.0
    hi = max(1.0, float(values.max())) if values.size else 1.0
    edges = np.linspace(lo, hi, HIST_BINS + 1)
    rows = [{"bin_lower": round(edges[i], 10), "bin_upper": round(edges[i + 1], 10),
             "bin_center": round((edges[i] + edges[i + 1]) / 2, 10)} for i in range(HIST_BINS)]
    for model, e in extras.items():
        has = np.isfinite(e["scores"])
        for label, mask in (("correct", e["correct"]), ("incorrect", ~e["correct"])):
            counts, _ = np.histogram(e["scores"][has & mask], bins=edges)
            for row, count in zip(rows, counts):
                row[f"{model}_{label}"] = int(count)
    return rows


def reliability_rows(extras: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per calibration bin: per model, mean confidence, accuracy and sample count."""
    rows: list[dict[str, Any]] = []
    for model, e in extras.items():
        for i, b in enumerate(e["reliability"]):
            if i == len(rows):
                rows.append({"bin_lower": b["lower"], "bin_upper": b["upper"],
                             "bin_center": round((b["lower"] + b["upper"]) / 2, 10)})
            rows[i].update({f"{model}_confidence": b["confidence"], f"{model}_accuracy": b["accuracy"],
                            f"{model}_count": b["count"]})
    return rows


def plots_csv(rows: list[dict[str, Any]]) -> str:
    """CSV text of plot rows; None is an empty cell."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows([{k: "" if v is None else v for k, v in row.items()} for row in rows])
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------- PNGs


def _models_in(rows: list[dict[str, Any]], suffix: str) -> list[str]:
    return [key[: -len(suffix)] for key in (rows[0] if rows else {}) if key.endswith(suffix)]


def _nums(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [np.nan if r.get(key) is None else r[key] for r in rows]


def _plot_scaling(plt: Any, name: str, rows: list[dict[str, Any]]) -> Any:
    models = _models_in(rows, "_pass")
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(5 * max(1, len(models)), 4), squeeze=False,
                             sharey=True)
    for ax, model in zip(axes[0], models):
        for curve in CURVES:
            ax.plot(_nums(rows, "k"), _nums(rows, f"{model}_{curve}"), marker="o", label=CURVE_TITLES[curve])
        ax.set_xscale("log", base=2)
        ax.set_xticks(_nums(rows, "k"), [str(r["k"]) for r in rows])
        ax.minorticks_off()
        ax.set_xlabel("k (samples per problem)")
        ax.set_title(f"{model}: {name[len('scaling_'):]}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=8)
    return fig


def _plot_score_hist(plt: Any, rows: list[dict[str, Any]], threshold: float) -> Any:
    models = _models_in(rows, "_correct")
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(5 * max(1, len(models)), 4), squeeze=False)
    centers = _nums(rows, "bin_center")
    width = (rows[0]["bin_upper"] - rows[0]["bin_lower"]) if rows else 0.04
    for ax, model in zip(axes[0], models):
        ax.bar(centers, _nums(rows, f"{model}_correct"), width=width, alpha=0.6, label="correct", color="tab:green")
        ax.bar(centers, _nums(rows, f"{model}_incorrect"), width=width, alpha=0.6, label="incorrect",
               color="tab:red")
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
        ax.set_xlabel("self-rewarding score (raw)")
        ax.set_ylabel("samples")
        ax.set_title(f"{model}: score by correctness")
        ax.legend(fontsize=8)
    return fig


def _plot_reliability(plt: Any, rows: list[dict[str, Any]]) -> Any:
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="perfect calibration")
    for model in _models_in(rows, "_accuracy"):
        ax.plot(_nums(rows, f"{model}_confidence"), _nums(rows, f"{model}_accuracy"), marker="o", label=model)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean clipped score (confidence)")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability diagram (all samples)")
    ax.legend(fontsize=8)
    return fig


def render_png(name: str, rows: list[dict[str, Any]], path: str | Path, threshold: float = 0.5) -> None:
    """Render plot ``name`` (``scaling_<set>``, ``score_hist`` or ``reliability``) from its rows to a PNG file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if name.startswith("scaling_"):
        fig = _plot_scaling(plt, name, rows)
    elif name == "score_hist":
        fig = _plot_score_hist(plt, rows, threshold)
    elif name == "reliability":
        fig = _plot_reliability(plt, rows)
    else:
        raise ValueError(f"unknown plot {name!r}")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------- report


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _fmt_delta(value: Any) -> str:
    return "—" if value is None else f"{value:+.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _blocks(m: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(model, eval set or "overall", metrics block) for every block of the metrics."""
    for model, mm in m["models"].items():
        for name, block in {**mm["eval_sets"], "overall": mm["overall"]}.items():
            yield model, name, block


def _intro(s: dict[str, Any], run: dict[str, Any] | None = None) -> list[str]:
    header = []
    if run:
        variants = "; ".join(f"`{name}` {v['method']}, {v['train_steps']} training steps, train seed {v['train_seed']}"
                             for name, v in run["variants"].items())
        header = [f"Model `{run['model']}`; variants: {variants}; rollout seed {run['seeds']['rollout']}; git revision "
                  f"`{run['git_revision'] or 'unknown (not a git checkout)'}`; params digest `{run['params_digest']}`.",
                  ""]
    return [
        "# LaSeR evaluation",
        "",
        *header,
        f"Self-verification threshold {s['threshold']:g} on the clipped score; ECE with {s['ece_bins']} bins; "
        f"scaling curves averaged over {s['subset_seeds']} random subsets per k. '—' = undefined (the reason is "
        "under `undefined` in metrics.json).",
        "",
    ]


def model_label(model: str) -> str:
    """The base model is scored with its own c_ref, so its scores centre on 0 and its self-verification F1 is
    ~0 by construction: its score is the untrained one, not a self-verifier's."""
    return "base (untrained score)" if model == "base" else model


def _headline_section(m: dict[str, Any]) -> list[str]:
    view = m.get("headline_view", HEADLINE_VIEW)
    rows = [[model_label(model), name, *(_fmt(h[k]) for k in HEADLINE_KEYS)]
            for model, mm in m["models"].items() for name, h in mm["headline"].items()]
    lines = ["## Headline numbers", "",
             f"The headline is `{view}`: the macro-average over eval sets (each set weighs the same, the paper's "
             "\"Avg\"); `overall` pools every sample, so a large set dominates it. The base model is scored "
             "with its own c_ref, so its score centres on 0 (F1 ≈ 0 by construction): an untrained score.", "",
             *_table(["model", "eval set", *HEADLINE_KEYS], rows)]
    for model, views in m.get("comparison", {}).items():
        rows = [[name, key, _fmt(v["base"]), _fmt(v["trained"]), _fmt_delta(v["delta"])]
                for name, cmp in views.items() for key, v in cmp.items() if key != "K"]
        lines += ["", f"## base vs {model}", ""]
        lines += _table(["eval set", "metric", "base", model, f"Δ ({model} − base)"], rows)
    return lines


MAIN_COLUMNS = (("accuracy (avg@K)", "avg@K"), ("maj@K", "maj@K"), ("weighted maj@K", "weighted_maj@K"),
                ("paper-F1", "sv_f1"), ("AUROC", "sv_auroc"), ("ECE", "sv_ece"))


def method_label(model: str, run: dict[str, Any] | None) -> str:
    """The paper's row name: Base, or the variant's method (GRPO / LaSeR) with the variant's name."""
    if model == "base":
        return "Base"
    variant = (run or {}).get("variants", {}).get(model)
    return f"{variant['method']} (`{model}`)" if variant else model


def _main_table_section(m: dict[str, Any]) -> list[str]:
    """The paper's main table: rows Base / GRPO / LaSeR, one table per eval set and the macro-average."""
    view = m.get("headline_view", HEADLINE_VIEW)
    models = sorted(m["models"], key=lambda name: (name != "base", "LaSeR" in method_label(name, m.get("run")),
                                                    name))
    views = [name for name in next(iter(m["models"].values()))["headline"] if name != "overall"]
    lines = ["## Main table", "",
             "As the paper's: accuracy is avg@K, maj@K the majority vote over the K samples, weighted maj@K weighs "
             "each vote by the clipped self-reward score; paper-F1, AUROC and ECE are self-verification over all "
             f"judged samples. `{view}` is the mean over eval sets.", ""]
    for name in views:
        rows = [[method_label(model, m.get("run")),
                 *(_fmt(m["models"][model]["headline"].get(name, {}).get(key)) for _, key in MAIN_COLUMNS)]
                for model in models]
        lines += [f"**{name}**", "", *_table(["", *(label for label, _ in MAIN_COLUMNS)], rows), ""]
    return lines


def _intervals_section(m: dict[str, Any]) -> list[str]:
    """The headline metrics' 95% bootstrap intervals over problems, and any collapsed self-verification."""
    def span(ci):
        return "—" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"

    rows = [[model_label(model), name, span(b["ci95"]["avg@K"]), span(b["ci95"]["sv_f1"]),
             span(b["ci95"]["sv_auroc"]), b.get("sv_collapse") or "no"]
            for model, name, b in _blocks(m) if "ci95" in b]
    if not rows:
        return []
    return ["", "## 95% intervals (bootstrap over problems) and collapse", "",
            "Problems are resampled with replacement (their samples together); self-verification is flagged as "
            "collapsed when every score falls on one side of the threshold or its AUROC is at or below "
            "`evaluate.collapse_auroc`.", "",
            *_table(["model", "eval set", "avg@K", "paper-F1", "AUROC", "collapsed"], rows)]


def _scaling_section(plots: dict[str, list[dict[str, Any]]], link: str) -> list[str]:
    lines = ["", "## Inference-time scaling", ""]
    for name, rows in plots.items():
        if not name.startswith("scaling_"):
            continue
        eval_set = name[len("scaling_"):]
        lines += [f"### {eval_set}", "", f"![scaling curves: {eval_set}]({link}/{name}.png)", ""]
        columns = [c for c in (rows[0] if rows else {}) if c != "k"]
        lines += _table(["k", *columns], [[r["k"], *(_fmt(r[c]) for c in columns)] for r in rows])
        lines.append("")
    return lines


def _self_verification_section(m: dict[str, Any], link: str) -> list[str]:
    rows = [[model_label(model), name, view, *(_fmt(sv[k]) for k in SV_KEYS)]
            for model, name, block in _blocks(m) for view, sv in block["self_verification"].items()]
    return ["## Self-verification", "", *_table(["model", "eval set", "view", *SV_KEYS], rows),
            "", "`all`: every sample the verifier judged (no answer or no score ⇒ score 0); `answered`: those with an "
            "extractable answer; samples whose verification timed out or failed are left out (counted under "
            "Counts). AUROC ranks raw scores (a missing score lowest). `f1` is the paper's (harmonic mean of "
            "acc_correct and acc_incorrect); `f1_standard` is precision/recall F1 with positive = correct.", "",
            f"![score histograms]({link}/score_hist.png)", "", f"![reliability diagram]({link}/reliability.png)",
            ""]


def _joined(counts: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items()) or "—"


def _counts_section(m: dict[str, Any]) -> list[str]:
    rows = [[model, name, block["num_problems"], block["num_samples"], block["counts"]["no_answer"],
             block["counts"]["no_score"], block["counts"].get("unjudged", 0),
             _joined(block["counts"].get("finish_reason", {})), _joined(block["counts"].get("verify_status", {}))]
            for model, name, block in _blocks(m)]
    header = ["model", "eval set", "problems", "samples", "no answer", "no score", "unjudged", "finish_reason",
              "verify_status"]
    return ["## Counts", "", *_table(header, rows), "",
            f"Answer pairs checked for equivalence: {m['equivalence']['pairs_checked']}."]


def _training_section(links: dict[str, str]) -> list[str]:
    if not links:
        return []
    lines = ["", "## Training", "", "Per step, over π_old's rollouts of the step (train/<variant>/steps.jsonl; "
             "DVCLive: `dvc plots show`):", ""]
    for variant, link in links.items():
        lines += [f"### {variant}", "", f"![training curves: {variant}]({link})", ""]
    return lines


def render_report(result: EvalResult, plots_link: str, train_curves_links: dict[str, str] | None = None) -> str:
    """The Markdown report; ``plots_link`` is the figures directory relative to the report's directory,
    ``train_curves_links`` each variant's training-curve PNG (relative too; none: no training section)."""
    m = result.metrics
    link = plots_link.rstrip("/")
    lines = [*_intro(m["settings"], m.get("run")), *_main_table_section(m), *_headline_section(m),
             *_intervals_section(m), *_scaling_section(result.plots, link), *_self_verification_section(m, link),
             *_training_section(train_curves_links or {}), *_counts_section(m)]
    if result.notes:
        lines += ["", "## Notes", "", *(f"- {note}" for note in result.notes)]
    if result.appendix:
        lines += ["", result.appendix.rstrip()]
    return "\n".join(lines) + "\n"


SUMMARY_KEYS = {"accuracy": "avg@K", "maj": "maj@K", "weighted_maj": "weighted_maj@K", "sv_f1": "sv_f1",
                "sv_auroc": "sv_auroc", "sv_ece": "sv_ece"}  # summary name -> headline key


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The compact headline (``paths.eval_summary``, what ``dvc exp show`` shows): per model the macro-average
    over eval sets of accuracy (avg@K), maj@K, self-reward-weighted maj@K, self-verification paper-F1, AUROC
    and ECE; ``K`` the samples per problem."""
    view = metrics["headline_view"]
    out: dict[str, Any] = {}
    for model, block in metrics["models"].items():
        head = block["headline"][view]
        out[model] = {name: head.get(key) for name, key in SUMMARY_KEYS.items()}
        out.setdefault("K", head.get("K"))
    return out


def write_outputs(result: EvalResult, paths: PathsParams, threshold: float = 0.5,
                  train_curves: dict[str, str] | None = None) -> None:
    """Write the plots directory (CSV + PNG), the report, the metrics JSON and its summary, each atomically."""
    with atomic_path(paths.eval_plots, is_dir=True) as tmp:
        for name, rows in result.plots.items():
            (tmp / f"{name}.csv").write_text(plots_csv(rows))
    with atomic_path(paths.eval_figures, is_dir=True) as tmp:
        for name, rows in result.plots.items():
            render_png(name, rows, tmp / f"{name}.png", threshold)
    report_dir = Path(paths.eval_report).parent
    link = Path(os.path.relpath(paths.eval_figures, report_dir)).as_posix()
    train_links = {variant: Path(os.path.relpath(curves, report_dir)).as_posix()
                   for variant, curves in (train_curves or {}).items() if Path(curves).is_file()}
    atomic_write_text(paths.eval_report, render_report(result, link, train_links))
    atomic_write_json(paths.eval_metrics, result.metrics)
    atomic_write_json(paths.eval_summary, summary(result.metrics))
