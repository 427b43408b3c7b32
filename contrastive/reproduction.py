"""Small, seeded reproductions of the paper's claims on Fashion-MNIST with input-dependent noise.

Three claims (docs/HETXL.md), each a set of arms trained with the normal trainer for several seeds:
  contrastive     CLIP vs HET-XL (and SigLIP) image-text training on captions whose class is
                  wrong more often for the confusable garments (data/fashion_mnist.py); every
                  loss has the same log-bounded learned temperature, so the arms differ only in
                  the noise. Zero-shot top-1, NLL and ECE on the clean test split (HET-XL also
                  from its Monte-Carlo prediction).
  classification  DET vs HET vs HET-XL heads on the same noisy labels: accuracy, NLL, ECE on the
                  clean test labels, and each head's extra parameters over DET, counted from the
                  instantiated modules (also at 1,000 classes, where the paper's claim lives).
  temperature     HET-XL with its learned temperature vs the same head at a grid of fixed ones.

Every number is a mean ± sample standard deviation over seeds (the seed sets the initialisation,
the data order and which examples get a wrong label). A verdict compares means against the
standard error of their difference, se = sqrt(s_a^2 / n_a + s_b^2 / n_b): a difference beyond
2 se in the claimed direction reproduces a claim, beyond 2 se against it does not, anything
inside is inconclusive (so is everything with a single seed).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

CLAIMS = ("contrastive", "classification", "temperature")

# A difference counts when it exceeds this many standard errors.
THRESHOLD_SE = 2.0

# What the result files say about the training labels (data/label_noise.py has the code).
NOISE_MODELS = {
    "class": (
        "class-conditional: training label y (and so its caption) replaced with probability "
        "p(y) = label_noise_confusable for y in C = {T-shirt/top, Pullover, Coat, Shirt}, "
        "label_noise_other otherwise; the wrong label is uniform over C minus {y} for y in C, "
        "over the 9 other classes otherwise; fixed per (seed, example); test labels clean"
    ),
    "image": (
        "image-conditional: training image i (and so its caption) relabelled with probability "
        "q_i = min(1, a * c_i), c_i = 1 - w_i[y_i] the confusion of a weak fixed image model "
        "(softmax regression on 7x7 pooled pixels fitted to the clean training labels), a set "
        "so that the mean of q_i is label_noise_rate; the wrong label k has probability "
        "w_i[k] / c_i; fixed per (seed, example); test labels clean"
    ),
}


def noise_description(settings: Mapping[str, Any]) -> str:
    """One line naming the noise model and its parameters, for tables."""
    if settings.get("label_noise_model", "class") == "image":
        return f"by image, rate {settings['label_noise_rate']:g}"
    return (
        f"by class, p(confusable) = {settings['label_noise_confusable']:g}, p(other) = "
        f"{settings['label_noise_other']:g}"
    )


REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every run of a claim shares (scripts/reproduce.py holds the defaults).

    Attributes:
      steps: training steps per run.
      batch: global batch size.
      width, depth: ViT (and text transformer) width and blocks; MLP 4x width, a head per 64.
      embed_dim: shared embedding size of the contrastive towers.
      label_noise_model: "class" or "image" (data/label_noise.py).
      label_noise_confusable, label_noise_other: the "class" model's flip probabilities.
      label_noise_rate: the "image" model's mean flip probability.
      noise_scale_init, noise_kernel_scale: where the contrastive HET-XL noise starts
        (configs/demo.py args of the same names); None: the config's defaults.
      data_dir: folder of the Fashion-MNIST IDX files.
      tau_grid: fixed temperatures of the temperature claim.
    """

    steps: int
    batch: int
    width: int
    depth: int
    embed_dim: int
    label_noise_confusable: float
    label_noise_other: float
    data_dir: str
    tau_grid: tuple[float, ...]
    label_noise_model: str = "class"
    label_noise_rate: float = 0.0
    noise_scale_init: float | None = None
    noise_kernel_scale: float | None = None

    def noise_args(self) -> str:
        """The config args of the training labels' noise."""
        if self.label_noise_model == "image":
            return f"label_noise_model=image,label_noise_rate={self.label_noise_rate}"
        return (
            f"label_noise_confusable={self.label_noise_confusable},"
            f"label_noise_other={self.label_noise_other}"
        )


# Reported metric -> its name in metrics.jsonl (the last evaluation; tau at the last log).
CONTRASTIVE_METRICS = {
    "top1": "zeroshot_top1",
    "nll": "zeroshot_nll",
    "ece": "zeroshot_ece",
    "mc_top1": "zeroshot_mc_top1",
    "mc_nll": "zeroshot_mc_nll",
    "mc_ece": "zeroshot_mc_ece",
    "tau": "tau",
    "noise_scale": "noise_diag_scale",
    "noise_grad": "grad_norm_noise",
}
CLASSIFICATION_METRICS = {
    "accuracy": "accuracy",
    "nll": "nll",
    "ece": "ece",
    "tau": "tau",
    "noise_scale": "noise_diag_scale",
    "noise_grad": "grad_norm_noise",
}

# Training diagnostics kept at every logged step of one seed: how the noise and the temperature
# move, and how much gradient reaches the noise layers (docs/HETXL.md, section 7).
TRAJECTORY_METRICS = (
    "loss",
    "tau",
    "noise_diag_scale",
    "noise_factor_norm",
    "grad_norm",
    "grad_norm_noise",
    "update_norm_noise",
)


@dataclasses.dataclass(frozen=True)
class Arm:
    """One method of a claim: a config file and its args (seed, length and sizes are overrides,
    `run_overrides`)."""

    name: str
    config_file: str
    config_arg: str


# Arms a run may leave out (scripts.reproduce --skip_arms): those of secondary comparisons only.
OPTIONAL_ARMS = {"contrastive": ("siglip",), "classification": ("het",), "temperature": ()}


def arms(claim: str, settings: Settings, skip: Sequence[str] = ()) -> list[Arm]:
    """The arms of a claim, the first being the method the claim is about, without `skip`
    (names among OPTIONAL_ARMS[claim])."""
    unknown = sorted(set(skip) - set(OPTIONAL_ARMS.get(claim, ())))
    if unknown:
        raise ValueError(
            f"arms {unknown} cannot be left out of the {claim} claim; optional arms: "
            f"{list(OPTIONAL_ARMS.get(claim, ()))}"
        )
    return [arm for arm in _all_arms(claim, settings) if arm.name not in skip]


def _all_arms(claim: str, settings: Settings) -> list[Arm]:
    shared = f"{settings.noise_args()},batch={settings.batch},data_dir={settings.data_dir}"
    if claim == "contrastive":
        noise_init = "".join(
            f",{name}={getattr(settings, name)}"
            for name in ("noise_scale_init", "noise_kernel_scale")
            if getattr(settings, name) is not None
        )
        return [
            Arm(
                loss,
                "configs/demo.py",
                f"loss={loss},temperature=bounded_log,zeroshot_mc=True,{shared}"
                + (noise_init if loss == "hetxl" else ""),
            )
            for loss in ("hetxl", "clip", "siglip")
        ]
    if claim == "classification":
        return [
            Arm(head, "configs/classify.py", f"head={head},{shared}")
            for head in ("hetxl", "het", "det")
        ]
    if claim == "temperature":
        learned = Arm("learned", "configs/classify.py", f"head=hetxl,{shared}")
        return [learned] + [
            Arm(f"tau={tau:g}", "configs/classify.py", f"{learned.config_arg},tau={tau!r}")
            for tau in settings.tau_grid
        ]
    raise ValueError(f"claim {claim!r} is unknown; known: {list(CLAIMS)}")


def metrics_of(claim: str) -> dict[str, str]:
    return CONTRASTIVE_METRICS if claim == "contrastive" else CLASSIFICATION_METRICS


def run_overrides(claim: str, arm: Arm, settings: Settings, seed: int) -> list[str]:
    """ "key=value" overrides of one run: seeds, length, tower sizes, evaluation at the end only."""
    steps = settings.steps
    tower = dict(
        width=settings.width,
        depth=settings.depth,
        mlp_dim=4 * settings.width,
        num_heads=max(1, settings.width // 64),
    )
    towers = ["image_tower"] + (["text_tower"] if claim == "contrastive" else [])
    evaluation = "zeroshot" if claim == "contrastive" else "accuracy"
    overrides = [
        f"seed={seed}",
        f"input.seed={seed}",
        f"input.source.label_noise_seed={seed}",
        f"total_steps={steps}",
        f"log_every={max(1, steps // 10)}",
        f"evals.{evaluation}.every_steps={steps}",
        f"checkpoint.every_steps={steps}",
    ]
    overrides += [f"model.{t}.{key}={value}" for t in towers for key, value in tower.items()]
    if claim == "contrastive":
        # Plain ViTs of --width/--depth: the demo's convolutional stem is not part of them.
        overrides.append("model.image_tower.stem_channels=()")
        overrides.append(f"model.embed_dim={settings.embed_dim}")
    else:  # classify.py warms up for 100 steps of 2,000; keep its tenth of the run
        overrides.append(f"optim.schedule.warmup_steps={steps // 10}")
    return overrides


def read_run_metrics(claim: str, rows: Sequence[Mapping[str, Any]], steps: int) -> dict[str, float]:
    """The claim's metrics of a finished run from its metrics.jsonl rows: each the value of the
    last row that has it (evaluations run at the last step); a metric the run does not produce
    (Monte-Carlo of a model without noise) is left out. Raises if the run did not finish."""
    if not rows or rows[-1].get("step") != steps:
        last = rows[-1].get("step") if rows else None
        raise RuntimeError(f"the run logged up to step {last}, not {steps}")
    result = {}
    for key, log_key in metrics_of(claim).items():
        for row in reversed(rows):
            if log_key in row:
                result[key] = float(row[log_key])
                break
    return result


def trajectory(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, float]]:
    """[{"step", metric: value}] of the training rows (those with a loss) of a run's
    metrics.jsonl, with the TRAJECTORY_METRICS each row has."""
    return [
        {"step": int(row["step"])}
        | {key: float(row[key]) for key in TRAJECTORY_METRICS if key in row}
        for row in rows
        if "loss" in row
    ]


# ----------------------------------------------------------------------------------------------
# Aggregation and verdicts


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation with ddof=1; 0 for a single value)."""
    array = np.asarray(values, np.float64)
    if array.size == 0:
        raise ValueError("no values to aggregate")
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return float(array.mean()), std


def aggregate(per_seed: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """{metric: {"mean", "std", "n"}} over the runs that report the metric."""
    keys = sorted({key for run in per_seed for key in run if key not in ("seed", "wall_s")})
    result = {}
    for key in keys:
        values = [run[key] for run in per_seed if key in run]
        mean, std = mean_std(values)
        result[key] = {"mean": mean, "std": std, "n": len(values)}
    return result


@dataclasses.dataclass(frozen=True)
class Comparison:
    """`a` against `b` on one metric; gain > 0 means `a` is better, se is the standard error of
    the difference of the means."""

    claim: str
    metric: str
    a: str
    b: str
    gain: float
    se: float
    verdict: str

    def line(self) -> str:
        return (
            f"{self.claim} on {self.metric}: gain {self.gain:+.4f}, "
            f"2 se = {THRESHOLD_SE * self.se:.4f} -> {self.verdict}"
        )


def compare(
    metric: str,
    a: tuple[str, Mapping[str, float]],
    b: tuple[str, Mapping[str, float]],
    higher_is_better: bool,
    as_good_as: bool = False,
) -> Comparison:
    """Whether arm a = (name, {"mean", "std", "n"}) beats arm b on a metric (reproduced when the
    gain exceeds THRESHOLD_SE standard errors, not reproduced when the loss does, inconclusive
    in between), or with as_good_as whether a is no worse than b (reproduced unless a loses by
    more than THRESHOLD_SE se). One seed on either side is always inconclusive."""
    (name_a, stats_a), (name_b, stats_b) = a, b
    sign = 1.0 if higher_is_better else -1.0
    gain = sign * (stats_a["mean"] - stats_b["mean"])
    se = math.sqrt(stats_a["std"] ** 2 / stats_a["n"] + stats_b["std"] ** 2 / stats_b["n"])
    if min(stats_a["n"], stats_b["n"]) < 2:
        verdict = INCONCLUSIVE
    elif gain < -THRESHOLD_SE * se:
        verdict = NOT_REPRODUCED
    elif as_good_as or gain > THRESHOLD_SE * se:
        verdict = REPRODUCED
    else:
        verdict = INCONCLUSIVE
    claim = f"{name_a} is as good as {name_b}" if as_good_as else f"{name_a} beats {name_b}"
    return Comparison(claim, metric, name_a, name_b, gain, se, verdict)


def overall(verdicts: Sequence[str]) -> str:
    """All reproduced -> reproduced; any not reproduced -> not reproduced; else inconclusive."""
    if verdicts and all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    if NOT_REPRODUCED in verdicts:
        return NOT_REPRODUCED
    return INCONCLUSIVE


# ----------------------------------------------------------------------------------------------
# Claims


STATEMENTS = {
    "contrastive": (
        "HET-XL noise on the image embeddings improves zero-shot top-1 over CLIP when some "
        "captions are wrong more often than others (every loss with the same learned, "
        "log-bounded temperature)"
    ),
    "classification": (
        "a HET-XL head beats a DET head in accuracy and NLL under input-dependent label noise, "
        "and its extra parameters do not grow with the number of classes"
    ),
    "temperature": (
        "HET-XL's learned temperature is as good as the best of a grid of fixed temperatures "
        "(the best grid point is picked on the test metrics themselves, which favours the grid)"
    ),
}


def _stats(summary: Mapping[str, Mapping[str, Any]], arm: str, metric: str, label: str = ""):
    return (label or arm, summary[arm][metric])


def judge(
    claim: str,
    summary: Mapping[str, Mapping[str, Mapping[str, float]]],
    parameters: Mapping[str, Mapping[str, int]] | None = None,
) -> dict[str, Any]:
    """The verdict of a claim from its per-arm aggregates ({arm: {metric: {"mean", "std",
    "n"}}}) and, for classification, the extra parameters of each head ({head: {"classes=K":
    count}}). Returns {"statement", "rule", "primary": [lines], "secondary": [lines], "notes",
    "verdict"}; the verdict combines the primary comparisons (all reproduced -> reproduced, any
    not reproduced -> not reproduced, else inconclusive)."""
    primary: list[Comparison] = []
    secondary: list[Comparison] = []
    notes: list[str] = []
    extra_verdicts: list[str] = []
    if claim == "contrastive":
        primary.append(
            compare("top1", _stats(summary, "hetxl", "top1"), _stats(summary, "clip", "top1"), True)
        )
        if "siglip" in summary:
            secondary.append(
                compare(
                    "top1",
                    _stats(summary, "hetxl", "top1"),
                    _stats(summary, "siglip", "top1"),
                    True,
                )
            )
        for metric in ("nll", "ece"):
            hetxl_mc = _stats(summary, "hetxl", f"mc_{metric}", "hetxl (MC)")
            for baseline in ("clip", "siglip"):
                if baseline in summary:
                    secondary.append(
                        compare(metric, hetxl_mc, _stats(summary, baseline, metric), False)
                    )
    elif claim == "classification":
        for metric, higher in (("accuracy", True), ("nll", False)):
            primary.append(
                compare(
                    metric, _stats(summary, "hetxl", metric), _stats(summary, "det", metric), higher
                )
            )
            if "het" in summary:
                secondary.append(
                    compare(
                        metric,
                        _stats(summary, "hetxl", metric),
                        _stats(summary, "het", metric),
                        higher,
                    )
                )
        secondary.append(
            compare("ece", _stats(summary, "hetxl", "ece"), _stats(summary, "det", "ece"), False)
        )
        if parameters and "het" in parameters:
            hetxl, het = parameters["hetxl"], parameters["het"]
            small, large = sorted(hetxl, key=lambda k: int(k.split("=")[1]))
            constant = hetxl[small] == hetxl[large]
            smaller_at_scale = hetxl[large] < het[large]
            verdict = REPRODUCED if constant and smaller_at_scale else NOT_REPRODUCED
            extra_verdicts.append(verdict)
            notes.append(
                f"extra parameters over DET, {small} / {large}: HET-XL {hetxl[small]:,} / "
                f"{hetxl[large]:,}, HET {het[small]:,} / {het[large]:,} (counted from the "
                f"instantiated heads) -> {verdict} (rule: HET-XL's count equal at both sizes and "
                f"below HET's at {large})"
            )
    elif claim == "temperature":
        learned = summary["learned"]
        grid = [arm for arm in summary if arm != "learned"]
        for metric, higher in (("accuracy", True), ("nll", False)):
            pick = max if higher else min
            best = pick(grid, key=lambda arm: summary[arm][metric]["mean"])
            primary.append(
                compare(
                    metric,
                    ("learned", learned[metric]),
                    _stats(summary, best, metric, f"best fixed {best}"),
                    higher,
                    as_good_as=True,
                )
            )
        tau = learned["tau"]
        notes.append(f"learned tau after training: {tau['mean']:.3f} ± {tau['std']:.3f}")
    else:
        raise ValueError(f"claim {claim!r} is unknown; known: {list(CLAIMS)}")
    rule = (
        f"gain = difference of seed means in the better direction, se = sqrt(s_a^2/n_a + "
        f"s_b^2/n_b) with sample std s over n seeds; 'beats': reproduced if gain > "
        f"{THRESHOLD_SE:g} se, not reproduced if gain < -{THRESHOLD_SE:g} se, else inconclusive; "
        f"'as good as': reproduced unless gain < -{THRESHOLD_SE:g} se; one seed: inconclusive"
    )
    verdict = overall([c.verdict for c in primary] + extra_verdicts)
    return {
        "statement": STATEMENTS[claim],
        "rule": rule,
        "primary": [dataclasses.asdict(c) | {"line": c.line()} for c in primary],
        "secondary": [dataclasses.asdict(c) | {"line": c.line()} for c in secondary],
        "notes": notes,
        "verdict": verdict,
    }


# ----------------------------------------------------------------------------------------------
# Report


def format_stat(stats: Mapping[str, float] | None) -> str:
    if stats is None:
        return "—"
    digits = 3 if abs(stats["mean"]) >= 0.1 or stats["mean"] == 0 else 4
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def noise_table(report: Mapping[str, Any] | None) -> list[str]:
    """Markdown lines of the training labels' noise per class (seed 0): the mean flip
    probability, its spread over the class's images and the share actually flipped."""
    if not report:
        return []
    lines = [
        "",
        "Training-label noise, seed 0 (flip probability over each class's images):",
        "",
        "| class | mean | std | 10th pct | median | 90th pct | flipped |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in [*report["classes"].items(), ("all", report["all"])]:
        cells = [row[f"flip_probability_{k}"] for k in ("mean", "std", "p10", "p50", "p90")]
        cells.append(row["flipped"])
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in cells) + " |")
    return lines


def markdown(result: Mapping[str, Any]) -> str:
    """The claim's table (mean ± std over seeds per arm and metric) and its verdict lines."""
    claim, summary = result["claim"], result["summary"]
    columns = [key for key in metrics_of(claim) if any(key in s for s in summary.values())]
    header = ["arm", *columns]
    parameters = result.get("extra_parameters") or {}
    sizes = sorted(
        {k for counts in parameters.values() for k in counts}, key=lambda k: int(k.split("=")[1])
    )
    header += [f"extra params ({size})" for size in sizes]
    settings = result["settings"]
    lines = [
        f"## {claim}: mean ± std over {result['seeds']} seeds",
        "",
        f"Runs: {settings['steps']} steps of batch {settings['batch']}, towers of width "
        f"{settings['width']} and depth {settings['depth']}, {result['wall_s']:.0f} s in all. "
        f"Training labels: noise {noise_description(settings)} ({result['noise_model']}).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for arm, stats in summary.items():
        cells = [arm] + [format_stat(stats.get(c)) for c in columns]
        cells += [f"{parameters[arm][size]:,}" if arm in parameters else "—" for size in sizes]
        lines.append("| " + " | ".join(cells) + " |")
    lines += noise_table(result.get("label_noise_seed0"))
    judgement = result["judgement"]
    lines += ["", f"Claim: {judgement['statement']}.", ""]
    lines += [f"- {c['line']}" for c in judgement["primary"]]
    lines += [f"- (secondary) {c['line']}" for c in judgement["secondary"]]
    lines += [f"- {note}" for note in judgement["notes"]]
    lines += [
        "",
        f"Rule: {judgement['rule']}.",
        "",
        f"**Verdict ({claim}): {judgement['verdict']}**",
        "",
    ]
    return "\n".join(lines)
