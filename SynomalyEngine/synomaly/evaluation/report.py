"""An evaluation's summary (means over cases, and which were defined), its table with the baseline beside
ours, and the Markdown report; the oracle figure named as such wherever it appears."""
import math
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from synomaly.evaluation import metrics as M

ORACLE_LABEL = "oracle, uses test labels, not a result"
THRESHOLD_METRICS = ("dice", "iou", "precision", "recall", "hd95_mm", "fpr_healthy", "slice_dice")
SCORE_METRICS = ("auprc", "auroc", "oracle_best_threshold_dice")
ALL_METRICS = THRESHOLD_METRICS + SCORE_METRICS + ("ssim_healthy_slices",)


def _finite_mean(values) -> Tuple[Optional[float], int]:
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return (float(np.mean(finite)) if finite else None), len(finite)


def summarise(records: Sequence[Dict], pooled_scores: Optional[Dict] = None) -> Dict:
    """Mean over cases (of the defined values, with their count) and pooled voxel figures."""
    summary: Dict = {"n_cases": len(records), "oracle_label": ORACLE_LABEL}
    for method in ("ours", "baseline"):
        mean, defined, infinite = {}, {}, {}
        for key in ALL_METRICS:
            values = [r[method].get(key) for r in records]
            mean[key], defined[key] = _finite_mean(values)
            infinite[key] = sum(1 for v in values if v is not None and math.isinf(v))
        pooled: Dict = {k: None for k in ("dice", "iou", "precision", "recall", "fpr_healthy", "auprc", "auroc")}
        counts = [r[method].get("counts") for r in records]
        if records and all(c is not None for c in counts):
            total = {k: sum(c[k] for c in counts) for k in counts[0]}
            pooled.update(M.ratios_from_counts(total))
        if pooled_scores and pooled_scores.get(method):
            scores = np.concatenate([s for s, _ in pooled_scores[method]])
            gt = np.concatenate([g for _, g in pooled_scores[method]])
            pooled["auprc"], pooled["auroc"] = M.auprc(scores, gt), M.auroc(scores, gt)
        summary[method] = {"mean": mean, "defined_cases": defined,
                           "infinite_cases": {k: v for k, v in infinite.items() if v}, "pooled": pooled}
    return summary


def _fmt(value, kind: str = "ratio") -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "inf"
    if kind == "mm":
        return f"{value:.1f}"
    if kind == "percent":
        return f"{100.0 * value:.2f} %"
    return f"{value:.3f}"


TABLE_COLUMNS = (("Dice", "dice", "ratio"), ("AUPRC", "auprc", "ratio"), ("AUROC", "auroc", "ratio"),
                 ("HD95 mm", "hd95_mm", "mm"), ("FPR", "fpr_healthy", "percent"))


def format_table(evaluation: Dict) -> str:
    """Markdown table of an ``evaluate`` result (or its evaluation.json): ours next to the baseline.

    One row per case, then the mean over cases (HD95 over finite cases, with the infinite ones
    counted) and the pooled voxel figures. '—': undefined (e.g. precision without any prediction)
    or not computed (see the notes); 'inf': HD95 with an empty prediction or an empty lesion.
    """
    header = ["case"]
    for title, _, _ in TABLE_COLUMNS:
        header += [f"{title} ours", f"{title} base"]
    header += ["SSIM ours", "slice Dice ours", "slice Dice base"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def row(name, ours, base, note=None):
        cells = [name]
        for _, key, kind in TABLE_COLUMNS:
            cells += [_fmt(ours.get(key), kind), _fmt(base.get(key), kind)]
        cells += [_fmt(ours.get("ssim_healthy_slices")), _fmt(ours.get("slice_dice")), _fmt(base.get("slice_dice"))]
        if note:
            for i, (_, key, _) in enumerate(TABLE_COLUMNS):
                for j, method in enumerate(("ours", "baseline")):
                    n = note[method].get(key, 0)
                    if n:
                        cells[1 + 2 * i + j] += f" ({n} inf)"
        lines.append("| " + " | ".join(cells) + " |")

    for case in evaluation.get("cases", []):
        row(case["name"], case["ours"], case["baseline"])
    summary = evaluation.get("summary") or summarise(evaluation.get("cases", []))
    row("**mean**", summary["ours"]["mean"], summary["baseline"]["mean"],
        {m: summary[m]["infinite_cases"] for m in ("ours", "baseline")})
    row("pooled voxels", summary["ours"]["pooled"], summary["baseline"]["pooled"])
    return "\n".join(lines)


def markdown(evaluation: Dict) -> str:
    s, base = evaluation["summary"], evaluation["baseline"]
    thr = evaluation["threshold"]
    lines = [f"# Evaluation of {evaluation['model']['name']} ({evaluation['model']['model_id']})", "",
             f"{s['n_cases']} cases. Threshold {_fmt(thr['value'])} ({thr['source']}). "
             f"Baseline: {base['method']}, median size {base['median_size']}, threshold "
             f"{_fmt(base['threshold'])} ({base['threshold_source']}).", "",
             format_table(evaluation), "",
             f"Target healthy-voxel FPR: {_fmt(evaluation['target_fpr'], 'percent')}. SSIM is between input and "
             "counterfactual on tumour-free axial slices (the baseline has no counterfactual). Slice Dice is the "
             "paper's: mean over slices with lesion, blind to false positives elsewhere. '—': undefined for that "
             "case (e.g. precision without predictions, SSIM without a tumour-free slice) or not computed (see "
             "the notes); 'inf': HD95 where exactly one of prediction and lesion is empty.", "",
             f"## Best-threshold Dice ({ORACLE_LABEL})", "",
             "The best Dice of `map > t` over all t, chosen per case with its labels, without component "
             "removal (so a post-processed Dice can exceed it): the ceiling of the map, not a result.", "",
             "| case | ours | baseline |", "|---|---|---|"]
    for case in evaluation["cases"]:
        lines.append(f"| {case['name']} | {_fmt(case['ours']['oracle_best_threshold_dice'])} | "
                     f"{_fmt(case['baseline']['oracle_best_threshold_dice'])} |")
    lines.append(f"| **mean** | {_fmt(s['ours']['mean']['oracle_best_threshold_dice'])} | "
                 f"{_fmt(s['baseline']['mean']['oracle_best_threshold_dice'])} |")
    if evaluation["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in evaluation["notes"]]
    lines += ["", "Panels per case (`<case>_panel.png`): input, counterfactual, anomaly map, and the input with "
              "the ground-truth contour (green) and ours (red)."]
    return "\n".join(lines) + "\n"


def jsonable(value):
    """Strict JSON: NaN (undefined) becomes null, infinity the string "inf"."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return None
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v
    if isinstance(value, np.bool_):
        return bool(value)
    return value
