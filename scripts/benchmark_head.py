"""`benchmark head`: the train step of a DET, HET or HET-XL classification head alone.

    python -m scripts.benchmark head [--classes 1000,3000,10000,30000] [--samples 1,16,100,1000]
        [--heads det,het,hetxl] [--forms auto] [--dim 256] [--batch 128] [--json [OUT]]
        [--config.a.b=value ...]

Each head is the one configs/classify.py:head=KIND,classes=K,samples=S builds (its noise block,
temperature, sampling chunk and AdamW), with --config.a.b=value overrides applied, e.g.
--config.model.noise.num_factors=50 or --config.sampling.chunk_size=16. It runs on random
pre-logits f32[B, D] and labels: one step is the project's train step (contrastive/step.py) with
the head as the whole model, i.e. forward and backward of the MC negative log-likelihood with
respect to the head's parameters and its input (what would flow into a tower), and the AdamW
update. DET has no samples: one row per K, samples=1.

Row keys:
  head, classes, samples, dim, batch;
  step_ms: median wall time of a step. For each K the heads' steps are timed in alternating
    rounds (one call of each per round, after a warm-up call each), so DET and the noisy heads
    see the same load; a head stops once its timed calls pass --budget-s seconds.
    timed_calls says how many calls the median is over (0: only the warm-up call, which already
    took longer than --budget-s, is reported);
  vs_det: step_ms / DET's step_ms at the same K (None without a DET row);
  vs_floor, floor_ms, floor_gflop (HET-XL rows): step_ms over that of the work floor of the same
    K and S, timed in the same rounds: DET's head on the S x B noisy rows plus HET-XL's noise
    layers (scripts/benchmark_floor.py), and the floor's counted GFLOP;
  vs_het (HET-XL rows): step_ms / HET's step_ms at the same K and S;
  form (HET-XL rows): the algebra the step used, "dense" or "w_once": the cost model's choice
    (--forms auto), or forced (--forms dense,w_once time each as its own row);
  chunk: samples evaluated at once (sampling.samples_per_chunk of the global batch);
  step_gflop: the step's matmul FLOPs per device, counted from its jaxpr (contrastive/flop_count);
  devices: the devices the batch is split over;
  peak_bytes: device memory of one step from XLA's compiled memory analysis
    (contrastive.xla_stats.peak_bytes): arguments (parameters, AdamW moments, batch) + outputs +
    temporaries - buffers aliased through the donated state; per device;
  temp_bytes: the temporaries alone, where the MC samples live (flat in S: chunked);
  extra_params: parameters beyond DET's K*D + K, counted from the initialised head;
  reason: why a combination was not run, else None: its peak_bytes exceed the memory available
    to a device (the accelerator's free memory, or for CPU devices the host's available memory
    shared by them, or --memory-gib) less the states of the combinations of the same K already
    allocated.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from scripts import model_summary

CLASSIFY_CONFIG = "configs/classify.py"
# models.heteroscedastic.logit_distributions.PRELOGIT_FORMS, spelled out so that --help and
# argument errors need no jax (a test keeps the two equal).
PRELOGIT_FORMS = ("auto", "dense", "w_once")
FLOOR = "floor"  # the work floor of a HET-XL row (scripts/benchmark_floor.py)
GIB = 2**30


def int_list(text: str) -> list[int]:
    """ "1000,3000" -> [1000, 3000] (argparse type)."""
    try:
        values = [int(item) for item in text.split(",") if item]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers: {text!r}")
    return values


def head_list(text: str) -> list[str]:
    """ "det,hetxl" -> ["det", "hetxl"] (argparse type; benchmark_heads checks the names, which
    are known once the models are imported)."""
    heads = [item for item in text.split(",") if item]
    if not heads:
        raise argparse.ArgumentTypeError(f"expected comma-separated head kinds, got {text!r}")
    return heads


def significant(value: float, digits: int = 4) -> float:
    """value rounded to `digits` significant digits (for JSON rows)."""
    return float(f"{value:.{digits}g}")


def form_list(text: str) -> list[str]:
    """ "auto,w_once" -> ["auto", "w_once"] (argparse type)."""
    forms = [item for item in text.split(",") if item]
    unknown = [form for form in forms if form not in PRELOGIT_FORMS]
    if not forms or unknown:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated forms of {list(PRELOGIT_FORMS)}, got {text!r}"
        )
    return forms


def available_memory_per_device(device) -> int:
    """Bytes a step on `device` may use: an accelerator's free memory, or for CPU devices the
    host's available memory (MemAvailable) split between the CPU devices that share it."""
    import jax

    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError):  # not Linux: free pages (a lower bound)
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return available // max(1, len(jax.local_devices(backend=device.platform)))


class HeadStep:
    """One (head, K, S) combination: its compiled train step, and its state once allocated."""

    def __init__(
        self,
        kind: str,
        classes: int,
        samples: int,
        dim: int,
        batch_size: int,
        mesh,
        overrides: Sequence[str] = (),
        form: str = "auto",
    ):
        import jax
        import numpy as np

        from contrastive.experiment import classifier_from_config
        from contrastive.flop_count import jaxpr_matmul_flops
        from contrastive.mesh import batch_sharding
        from contrastive.optim import make_optimizer
        from contrastive.step import abstract_train_state, make_train_step
        from models.heteroscedastic import HeteroscedasticHead
        from scripts.benchmark_floor import HeadWorkFloor
        from scripts.config_loader import load_config

        self.kind, self.classes, self.samples = kind, classes, samples
        self.dim, self.batch_size, self.mesh = dim, batch_size, mesh
        # The floor of an S-sample HET-XL step is built from HET-XL's own config.
        config_kind = "hetxl" if kind == FLOOR else kind
        spec = f"{CLASSIFY_CONFIG}:head={config_kind},classes={classes},samples={samples}"
        values = load_config(spec, overrides).to_dict()
        # The classifier's own head, built by the one function that builds it for training.
        classifier = classifier_from_config(values)
        if kind == FLOOR:
            self.head = HeadWorkFloor(classifier.num_classes, samples, classifier.noise)
        else:
            self.head = HeteroscedasticHead(
                classifier.num_classes,
                classifier.head,
                classifier.likelihood,
                classifier.noise,
                classifier.temperature,
                classifier.sampling,
                prelogit_form=form,
            )
        # As the head sees it under jit: the global batch.
        noisy = kind in ("het", "hetxl")
        self.form = self.head.form_for(dim, batch_size, train=True) if kind == "hetxl" else None
        self.chunk = self.head.chunk_for(batch_size, train=True) if noisy else None
        generator = np.random.default_rng(0)
        self.batch = jax.device_put(
            {
                "pre_logits": generator.normal(size=(batch_size, dim)).astype(np.float32),
                "label": generator.integers(0, classes, batch_size).astype(np.int32),
            },
            batch_sharding(self.mesh),
        )
        self.rng = jax.random.key(values["seed"])
        param_shapes = jax.eval_shape(self.init_params, self.rng)
        self.optimizer, _ = make_optimizer(values["optim"], values["total_steps"], param_shapes)
        total = model_summary.count(param_shapes)
        self.extra_params = total - (classes * dim + classes)
        abstract_state, self.shardings = abstract_train_state(
            self.init_params, self.optimizer, self.rng, self.mesh
        )
        step = make_train_step(
            None, self.optimizer, self.mesh, self.shardings, value_and_grad=self.value_and_grad
        )
        traced = step.trace(abstract_state, self.batch)
        # The count covers the whole mesh's computation; each device does an equal share.
        self.gflop = jaxpr_matmul_flops(traced.jaxpr) / mesh.size / 1e9
        self.compiled = traced.lower().compile()
        self.state = None
        self.times_ms: list[float] = []
        self.warm_up_ms: float | None = None

    def init_params(self, key):
        import jax

        params_key, noise_key = jax.random.split(key)
        batch = self.batch
        return self.head.init(
            {"params": params_key, "noise": noise_key},
            batch["pre_logits"][:1],
            batch["label"][:1],
            train=True,
        )["params"]

    def value_and_grad(self, params, batch, rng):
        """((loss, metrics), parameter gradients); the input's gradient is computed as a tower
        below the head would need it, and its norm reported so that XLA keeps it."""
        import jax
        import jax.numpy as jnp

        def loss(params, pre_logits):
            log_lik = self.head.apply(
                {"params": params},
                pre_logits,
                batch["label"],
                train=True,
                rngs={"noise": rng},
            )
            return -jnp.mean(log_lik)

        value, (param_grads, input_grads) = jax.value_and_grad(loss, argnums=(0, 1))(
            params, batch["pre_logits"]
        )
        return (value, {"pre_logit_grad_norm": jnp.linalg.norm(input_grads)}), param_grads

    def allocate(self) -> None:
        from contrastive.step import init_train_state

        self.state, _ = init_train_state(self.init_params, self.optimizer, self.rng, self.mesh)

    def call_ms(self) -> float:
        import jax

        start = time.perf_counter()
        self.state, metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready(metrics)
        return (time.perf_counter() - start) * 1e3

    def peak_bytes(self) -> int:
        from contrastive.xla_stats import peak_bytes

        return peak_bytes(self.compiled)

    def state_bytes(self) -> int:
        """What the allocated state and batch hold between steps."""
        return int(self.compiled.memory_analysis().argument_size_in_bytes)

    def release(self) -> None:
        """Frees the state and the executable (the next K's steps need the memory)."""
        self.state = None
        self.compiled = None

    def row(self, reason: str | None) -> dict[str, Any]:
        stats = self.compiled.memory_analysis()
        if self.times_ms:
            step_ms = round(statistics.median(self.times_ms), 3)
        else:
            step_ms = None if self.warm_up_ms is None else round(self.warm_up_ms, 3)
        return dict(
            head=self.kind,
            classes=self.classes,
            samples=self.samples,
            dim=self.dim,
            batch=self.batch_size,
            devices=self.mesh.size,
            step_ms=step_ms,
            vs_det=None,
            vs_floor=None,
            vs_het=None,
            form=self.form,
            chunk=self.chunk,
            step_gflop=significant(self.gflop),
            floor_ms=None,
            floor_gflop=None,
            timed_calls=len(self.times_ms),
            peak_bytes=self.peak_bytes(),
            temp_bytes=int(stats.temp_size_in_bytes),
            extra_params=int(self.extra_params),
            reason=reason,
        )


def time_alternating(steps: list[HeadStep], repeats: int, budget_s: float) -> None:
    """A warm-up call of each step, then rounds of one call each, until every step has
    `repeats` timed calls or has spent budget_s seconds in them."""
    for step in steps:
        step.warm_up_ms = step.call_ms()
    running = [step for step in steps if step.warm_up_ms <= budget_s * 1e3]
    for _ in range(repeats):
        for step in running:
            step.times_ms.append(step.call_ms())
        running = [step for step in running if sum(step.times_ms) < budget_s * 1e3]
        if not running:
            break


def benchmark_heads(args, overrides: Sequence[str] = ()) -> list[dict]:
    """One row per (head, K, S); see the module docstring."""
    from contrastive.mesh import make_mesh
    from models.heteroscedastic import HEAD_KINDS

    unknown = [head for head in args.heads if head not in HEAD_KINDS]
    if unknown:
        raise SystemExit(f"--heads: unknown {unknown}; known: {list(HEAD_KINDS)}")
    mesh = make_mesh()
    if args.batch % mesh.size:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the {mesh.size} devices")
    if args.memory_gib is not None:
        memory = int(args.memory_gib * GIB)
    else:
        memory = available_memory_per_device(mesh.devices.flat[0])
    rows = []
    for classes in args.classes:
        start = time.perf_counter()
        steps = [
            HeadStep(kind, classes, samples, args.dim, args.batch, mesh, overrides, form)
            for kind in args.heads + ([FLOOR] if "hetxl" in args.heads else [])
            for samples in ([1] if kind == "det" else args.samples)
            for form in (args.forms if kind == "hetxl" else ["auto"])
        ]
        # The states of one K's steps are all allocated at once (their timings alternate).
        fits, reasons, remaining = [], {}, memory
        for step in steps:
            if step.peak_bytes() > remaining:
                reasons[step] = (
                    f"needs {step.peak_bytes() / GIB:.2f} GiB per device, "
                    f"{remaining / GIB:.2f} GiB available"
                )
                continue
            step.allocate()
            fits.append(step)
            remaining -= step.state_bytes()
        time_alternating(fits, args.repeats, args.budget_s)
        rows_of_k = []
        for step in steps:
            rows_of_k.append(step.row(reasons.get(step)))
            step.release()
        compare_rows(rows_of_k)
        rows += [row for row in rows_of_k if row["head"] != FLOOR]
        print(  # progress: a full table takes many minutes on a CPU
            f"K={classes:,}: {len(fits)} of {len(steps)} combinations timed "
            f"in {time.perf_counter() - start:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    return rows


def compare_rows(rows_of_k: list[dict]) -> None:
    """Fills the ratios of one K's rows: vs_det (to DET's step), and for HET-XL rows vs_floor
    (to the work floor of the same S, whose time and FLOPs the row also carries) and vs_het (to
    HET's step of the same S)."""

    def find(head, samples=None):
        return next(
            (
                row
                for row in rows_of_k
                if row["head"] == head
                and (samples is None or row["samples"] == samples)
                and row["step_ms"] is not None
            ),
            None,
        )

    det = find("det")
    for row in rows_of_k:
        if row["step_ms"] is None:
            continue
        if det:
            row["vs_det"] = round(row["step_ms"] / det["step_ms"], 3)
        if row["head"] != "hetxl":
            continue
        floor, het = find(FLOOR, row["samples"]), find("het", row["samples"])
        if floor:
            row["floor_ms"], row["floor_gflop"] = floor["step_ms"], floor["step_gflop"]
            row["vs_floor"] = round(row["step_ms"] / floor["step_ms"], 3)
        if het:
            row["vs_het"] = round(row["step_ms"] / het["step_ms"], 3)


def format_head_table(rows: list[dict]) -> str:
    """A fixed-width table of the rows, memory in MiB; the reason column only when needed."""
    columns = [
        ("head", 6, lambda row: row["head"]),
        ("classes", 8, lambda row: f"{row['classes']:,}"),
        ("S", 5, lambda row: str(row["samples"])),
        ("step ms", 10, lambda row: _number(row["step_ms"], ".1f")),
        ("vs DET", 7, lambda row: _number(row["vs_det"], ".2f")),
        ("vs floor", 8, lambda row: _number(row["vs_floor"], ".2f")),
        ("vs HET", 7, lambda row: _number(row["vs_het"], ".2f")),
        ("form", 6, lambda row: row["form"] or "-"),
        ("chunk", 5, lambda row: _number(row["chunk"], "d")),
        ("GFLOP", 8, lambda row: _number(row["step_gflop"], ".2f")),
        ("floor GFLOP", 11, lambda row: _number(row["floor_gflop"], ".2f")),
        ("calls", 5, lambda row: str(row["timed_calls"])),
        ("peak MiB", 9, lambda row: f"{row['peak_bytes'] / 2**20:.1f}"),
        ("temp MiB", 9, lambda row: f"{row['temp_bytes'] / 2**20:.1f}"),
        ("extra params", 13, lambda row: f"{row['extra_params']:,}"),
    ]
    if any(row["reason"] for row in rows):
        columns.append(("reason", 0, lambda row: row["reason"] or ""))
    lines = ["  ".join(f"{name:>{width}}" for name, width, _ in columns).rstrip()]
    for row in rows:
        lines.append("  ".join(f"{cell(row):>{width}}" for _, width, cell in columns).rstrip())
    return "\n".join(lines)


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
