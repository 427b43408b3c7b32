"""Benchmarks, printed as JSON: wall-clock medians and XLA's compiled peak memory.

    python -m scripts.benchmark loss --batch 1024 --dim 512 --samples 16 64 [--json]
    python -m scripts.benchmark step --config configs/bench_ti.py[:arg] [--loss clip,hetxl] [--json]
        [--reference-big-vision DIR] [--config.a.b=value ...]
    python -m scripts.benchmark loop --config configs/bench_ti.py [--loss ...] [--steps 20] --json
    python -m scripts.benchmark head [--classes 1000,3000,10000,30000] [--samples 1,16,100,1000]
        [--heads det,het,hetxl] [--forms auto] [--dim 256] [--batch 128] [--json [OUT]]
    python -m scripts.benchmark plot --head HEAD.json [--loss LOSS.json ...] --out scaling.png

Every command prints a table, or with --json one JSON list instead; --json OUT writes the list to
the file OUT and still prints the table.

`step` and `loop` build the config's model, loss and optimizer as training does, with any
--config.a.b=value overrides applied. --loss is appended to the config's argument ("FILE.py:a=1"
becomes "FILE.py:a=1,loss=clip", the last key winning); a config whose get_config ignores it is
refused. The learning-rate schedule needs the run's length in steps: a config given in epochs
reads its training source's size, or give --config.total_steps=N.

`loop`: the cost of the train loop around the compiled step. The same compiled step runs
--steps times three ways: `bare` (dispatched back to back, one wait at the end), `trainer` (with
the trainer's per-step work: the preemption check, and at every --log_every-th step the sync
point that reads metrics and the non-finite counter) and `sync_every_step` (reading a device
value after every step, which stops the host from queueing the next step while one runs).
Variants alternate over --rounds timed rounds after an untimed one; the best round of each is
reported, with trainer_overhead = trainer / bare - 1.

`step`: one object per config (per --loss, timed side by side): step_ms (median), vs_first
(step_ms / that of the first --loss), images_per_sec, peak_bytes, and
host_memory_kept (whether scripts/host_memory.py's malloc tuning is on; HETXL_KEEP_HOST_MEMORY=0
turns it off to measure without it). How close the step comes to the machine's matmul speed:
matmul_peak_gflops is a plain --matmul-size square matmul (XLA's default precision, as in the
step) on the first device, in the dtype of the step's matmuls (matmul_dtype: the image tower's
dtype_mm, float32 unless the config sets bfloat16, as configs/bench_b16.py does), timed two
ways: call by call, alternating with the step's calls so both see the same load, and as one
burst of --repeats calls waited for once (no per-call dispatch and sync, which slow a GPU's
millisecond matmul); the peak is the faster. step_gflop is the matmul and convolution FLOPs of
the step, counted from its jaxpr (contrastive/flop_count.py: the same on every platform, scans
counted `length` times, rematerialised work included, so model FLOPs only without scan's
remat), divided by the number of devices; the probe's is counted the same way. A step whose
towers use a fused attention kernel (attention_impl "xla" or "cudnn") is counted on the same
step with flax's einsum attention: cuDNN's kernel is a custom call no jaxpr looks into.
XLA's own counts are not used: the compiled CPU step's agrees to ~1.5% (273.7 vs 269.7 GFLOP for
configs/bench_ti.py:loss=clip, the difference being elementwise work), but on an H200 the
compiled step's missed the matmuls done by cuBLAS (1,660 of 35,608 GFLOP for
configs/bench_b16.py), and the probe's came out negative compiled and zero lowered.
step_gflops = step_gflop / step time, and peak_fraction = step_gflops / matmul_peak_gflops.
With --reference-big-vision DIR the same run also builds big_vision's two-tower step of the same
model from a big_vision checkout at DIR and alternates its calls with ours: reference_step_ms,
reference_peak_bytes, reference_step_gflop and step_vs_reference = step_ms / reference_step_ms
(see tools/benchmark_reference.py).

`head`: the train step of a classification head alone for each head, K and S (see
scripts/benchmark_head.py for its rows and how they are measured).

`loss`: value and gradient of each contrastive loss (clip, siglip, and hetxl for every S) with
respect to its inputs (embeddings, noise parameters, tau), on all local devices with the batch
split over them. One object per measurement: loss, samples (null for the deterministic losses),
batch, dim, devices, chunk (HET-XL's samples per chunk), step_ms (median over --repeats rounds
in which every loss, and each HET-XL S's work floor, is called once, after an untimed round),
vs_clip (step_ms / CLIP's), gflop (matmul FLOPs per device, counted from the jaxpr as for
`step`), peak_bytes (per device, from the compiled executable's memory analysis) and, for
HET-XL, floor_ms, floor_gflop and vs_floor = step_ms / floor_ms: its work floor is CLIP's loss
on the S noisy copies of the images, an S-times larger logit block (scripts/benchmark_floor.py).

`plot`: the step time and peak memory of head rows against K, and of loss rows (one file per
global batch) against the batch, as a PNG (scripts/benchmark_plot.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from scripts import benchmark_head, terminal
from scripts.benchmark_head import significant
from scripts.config_loader import add_config_flag, load_config, parse_args_with_overrides
from scripts.host_memory import host_memory_kept
from scripts.terminal import positive_int

# jax and the project's packages are imported where used, after main has parsed its flags and
# silenced TensorFlow's start-up logs (scripts/terminal.py); --help loads none of them.


def random_loss_inputs(mesh, batch: int, dim: int, factors: int, seed: int = 0) -> dict:
    """Unit-norm embeddings and modest HET-XL noise, placed batch-sharded on the mesh."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from contrastive.mesh import batch_sharding, replicated
    from models.heteroscedastic import NoiseParameters

    rng = np.random.default_rng(seed)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    sharded = batch_sharding(mesh)
    put = lambda x: jax.device_put(jnp.asarray(x, jnp.float32), sharded)  # noqa: E731
    return {
        "image_embedding": put(unit(rng.normal(size=(batch, dim)))),
        "text_embedding": put(unit(rng.normal(size=(batch, dim)))),
        "tau": jax.device_put(jnp.float32(0.07), replicated(mesh)),
        "bias": jax.device_put(jnp.float32(-10.0), replicated(mesh)),
        "noise": NoiseParameters(
            factors=put(0.02 * rng.normal(size=(batch, dim, factors))),
            diag_scale=put(np.full((batch, dim), 0.02)),
            mean_shift=put(np.zeros((batch, dim))),
        ),
    }


def benchmark_losses(args) -> list[dict]:
    """One row per loss (and per S for HET-XL), timed in alternating rounds; see the module
    docstring."""
    import jax

    from contrastive.flop_count import jaxpr_matmul_flops
    from contrastive.losses import make_loss, shard_loss
    from contrastive.mesh import make_mesh
    from contrastive.xla_stats import peak_bytes
    from models.heteroscedastic import Sampling
    from scripts.benchmark_floor import ClipWorkFloor

    mesh = make_mesh()
    if args.batch % mesh.size:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the {mesh.size} devices")
    inputs = random_loss_inputs(mesh, args.batch, args.dim, args.factors)
    rng = jax.random.key(0)
    chunk = dict(column_chunk_size=args.column_chunk)
    losses = [
        ("clip", None, make_loss("clip", **chunk)),
        ("siglip", None, make_loss("siglip", **chunk)),
    ]
    for samples in args.samples:
        sampling = Sampling(samples, samples, chunk_size=args.sample_chunk)
        losses.append(("hetxl", samples, make_loss("hetxl", sampling=sampling, **chunk)))
        losses.append(("floor", samples, ClipWorkFloor(samples, args.column_chunk)))
    local_batch = args.batch // mesh.size
    rows, calls = [], {}
    for index, (name, samples, loss) in enumerate(losses):
        sharded = shard_loss(loss, mesh)
        value_and_grad = jax.jit(
            jax.value_and_grad(lambda outputs, fn=sharded: fn(outputs, rng)[0])
        )
        traced = value_and_grad.trace(inputs)
        compiled = traced.lower().compile()
        calls[index] = lambda compiled=compiled: compiled(inputs)
        rows.append(
            dict(
                loss=name,
                samples=samples,
                batch=args.batch,
                dim=args.dim,
                devices=mesh.size,
                chunk=loss.samples_per_chunk(local_batch, args.batch) if name == "hetxl" else None,
                step_ms=None,
                vs_clip=None,
                vs_floor=None,
                floor_ms=None,
                floor_gflop=None,
                # Per device: the count covers the whole mesh's computation.
                gflop=significant(jaxpr_matmul_flops(traced.jaxpr) / mesh.size / 1e9),
                peak_bytes=peak_bytes(compiled),
            )
        )
    times = alternating_call_ms(calls, args.repeats)
    for index, row in enumerate(rows):
        row["step_ms"] = round(statistics.median(times[index]), 3)
    clip_ms = rows[0]["step_ms"]
    for index, row in enumerate(rows):
        row["vs_clip"] = round(row["step_ms"] / clip_ms, 3)
        if row["loss"] == "hetxl":  # its floor is the next row
            floor = rows[index + 1]
            row.update(floor_ms=floor["step_ms"], floor_gflop=floor["gflop"])
            row["vs_floor"] = round(row["step_ms"] / floor["step_ms"], 3)
    return [row for row in rows if row["loss"] != "floor"]


def alternating_call_ms(calls: dict, repeats: int) -> dict[str, list[float]]:
    """Wall times (ms) of each zero-argument call over `repeats` rounds of one call each, after
    an untimed round: every call sees the same machine load."""
    import jax

    times = {name: [] for name in calls}
    for round_index in range(repeats + 1):
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            if round_index:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def config_spec(config: str, loss: str | None) -> str:
    """The --config spec with loss=LOSS appended to its argument, if a loss is given."""
    if loss is None:
        return config
    path, _, arg = config.partition(":")
    return f"{path}:{arg},loss={loss}" if arg else f"{path}:loss={loss}"


def load_benchmark_config(args, overrides, loss: str | None) -> tuple[str, dict]:
    """(spec, validated config values) of --config with loss=LOSS and the overrides applied."""
    from contrastive.validation import validate_config

    spec = config_spec(args.config, loss)
    values = validate_config(load_config(spec, overrides))
    built = (values.get("loss") or {}).get("name")
    if loss is not None and built != loss:
        raise SystemExit(
            f"error: --loss {loss}: {spec} builds a {built} loss; its get_config does not "
            "read a loss=... argument, so choose the loss in the config instead"
        )
    return spec, values


def compiled_step(values):
    """(mesh, compiled step, its FLOPs, state, device batch, run length in steps) for the train
    step of a validated config on a random batch of its shapes."""
    import jax
    import numpy as np

    from contrastive.experiment import build_experiment
    from contrastive.flop_count import jaxpr_matmul_flops
    from contrastive.mesh import batch_sharding, make_mesh
    from models.two_towers import example_inputs

    mesh = make_mesh(values.get("mesh"))
    # The trainer's own setup: frozen towers, gradient accumulation and the schedule included.
    experiment = build_experiment(values, mesh)
    # Random parameters (no pretrained towers to read): the step time does not depend on them.
    state, shardings = experiment.init_state(load_params=lambda params: params)
    step = experiment.train_step(shardings)
    batch_size = values["input"]["batch_size"]
    images, tokens = example_inputs(values["model"], batch_size)
    generator = np.random.default_rng(0)
    batch = jax.device_put(
        {
            "image": generator.uniform(-1, 1, images.shape).astype(np.float32),
            "text": generator.integers(1, 1000, tokens.shape).astype(np.int32),
        },
        batch_sharding(mesh),
    )
    traced = step.trace(state, batch)  # once, for both the FLOP count and the compile
    einsum_values = with_einsum_attention(values)
    if einsum_values is not None:
        # A fused attention kernel is one custom call whose matmuls no jaxpr shows; the model's
        # FLOPs are those of the same step with einsum attention (same parameters, same batch).
        count_step = build_experiment(einsum_values, mesh).train_step(shardings)
        count_jaxpr = count_step.trace(state, batch).jaxpr
    else:
        count_jaxpr = traced.jaxpr
    # The count covers the whole mesh's computation; each device does an equal share of it.
    per_device_flops = jaxpr_matmul_flops(count_jaxpr) / mesh.size
    return mesh, traced.lower().compile(), per_device_flops, state, batch, experiment.num_steps


def with_einsum_attention(values) -> dict | None:
    """`values` with every tower's attention_impl set to "flax" (einsum attention), or None where
    none is set otherwise."""
    model = dict(values["model"])
    for name in ("image_tower", "text_tower"):
        tower = model.get(name) or {}
        if tower.get("attention_impl", "flax") != "flax":
            model[name] = {**tower, "attention_impl": "flax"}
    return None if model == values["model"] else {**values, "model": model}


def matmul_dtype(values) -> str:
    """The dtype of the step's matmuls: the image tower's dtype_mm (float32 unless set)."""
    return (values["model"].get("image_tower") or {}).get("dtype_mm") or "float32"


def matmul_probe(size: int, device, dtype: str = "float32"):
    """(compiled dtype[size, size] @ dtype[size, size] on device, its operands, its FLOPs)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from contrastive.flop_count import jaxpr_matmul_flops

    generator = np.random.default_rng(0)
    operands = [
        jax.device_put(jnp.asarray(generator.normal(size=(size, size)), dtype), device)
        for _ in range(2)
    ]
    traced = jax.jit(lambda a, b: a @ b).trace(*operands)
    return traced.lower().compile(), operands, jaxpr_matmul_flops(traced.jaxpr)


def benchmark_step(args, overrides=()) -> list[dict]:
    """The full train step (both towers, loss, AdamW update) of a config on random batches, for
    each --loss side by side, the matmul speed it is measured against and, with
    --reference-big-vision, big_vision's step of the same model (tools/benchmark_reference.py)."""
    import jax

    from contrastive.xla_stats import peak_bytes
    from tools import benchmark_reference

    configs = [load_benchmark_config(args, overrides, loss) for loss in args.loss or [None]]
    # Built before compiling ours, so a config big_vision cannot build is refused at once.
    reference_model = (
        benchmark_reference.reference_model(configs[0][1], args.reference_big_vision)
        if args.reference_big_vision
        else None
    )
    steps = {}
    for spec, values in configs:
        mesh, compiled, step_flops, state, batch, num_steps = compiled_step(values)
        steps[spec] = dict(
            values=values, compiled=compiled, flops=step_flops, state=state, batch=batch
        )
    probe_dtype = matmul_dtype(configs[0][1])
    matmul, operands, matmul_flops = matmul_probe(
        args.matmul_size, mesh.devices.flat[0], probe_dtype
    )

    def step_call(spec):
        step = steps[spec]
        step["state"], metrics = step["compiled"](step["state"], step["batch"])
        # The caller waits for the new state too: metrics can be ready before the update is.
        return step["state"], metrics

    calls = {spec: (lambda spec=spec: step_call(spec)) for spec in steps}
    calls["matmul"] = lambda: matmul(*operands)
    if reference_model is not None:
        values, batch = configs[0][1], steps[configs[0][0]]["batch"]
        reference, reference_state, reference_flops = benchmark_reference.compiled_reference_step(
            reference_model, values, mesh, batch, num_steps
        )

        def reference_call():
            nonlocal reference_state
            *reference_state, loss, measurements = reference(*reference_state, batch)
            return reference_state, loss, measurements

        calls["reference"] = reference_call
    # The calls alternate, so every one sees the same machine load; the first round warms up.
    times = alternating_call_ms(calls, args.repeats)
    # The probe also runs back to back, waited for once: per-call dispatch and sync cost a 1-2 ms
    # GPU matmul a tenth of its speed. The peak is the faster of the two ways.
    start = time.perf_counter()
    jax.block_until_ready([matmul(*operands) for _ in range(args.repeats)])
    burst_ms = (time.perf_counter() - start) * 1e3 / args.repeats
    matmul_ms = min(statistics.median(times["matmul"]), burst_ms)
    matmul_peak_gflops = matmul_flops / matmul_ms / 1e6
    rows = []
    for spec, step in steps.items():
        values = step["values"]
        step_ms = statistics.median(times[spec])
        step_gflops = step["flops"] / step_ms / 1e6
        batch_size = values["input"]["batch_size"]
        rows.append(
            dict(
                config=spec,
                loss=values["loss"]["name"],
                batch=batch_size,
                devices=mesh.size,
                step_ms=round(step_ms, 2),
                vs_first=round(step_ms / statistics.median(times[configs[0][0]]), 4),
                images_per_sec=round(batch_size / step_ms * 1e3, 1),
                peak_bytes=peak_bytes(step["compiled"]),
                host_memory_kept=host_memory_kept(),
                step_gflop=significant(step["flops"] / 1e9),
                step_gflops=significant(step_gflops),
                matmul_dtype=probe_dtype,
                matmul_peak_gflops=significant(matmul_peak_gflops),
                peak_fraction=significant(step_gflops / matmul_peak_gflops),
            )
        )
    if "reference" in times:
        reference_ms = statistics.median(times["reference"])
        rows[0].update(
            reference_step_ms=round(reference_ms, 2),
            reference_peak_bytes=peak_bytes(reference),
            reference_step_gflop=significant(reference_flops / 1e9),
            step_vs_reference=significant(rows[0]["step_ms"] / reference_ms),
        )
    return rows


def benchmark_loop(args, overrides=()) -> list[dict]:
    """Step time of the compiled step alone, inside the trainer's loop, and with a host sync
    after every step (see the module docstring)."""
    import jax

    from contrastive.trainer import PreemptionWatch

    if args.loss and len(args.loss) > 1:
        raise SystemExit(f"error: --loss: loop times one loss, got {','.join(args.loss)}")
    spec, values = load_benchmark_config(args, overrides, args.loss[0] if args.loss else None)
    mesh, compiled, _, state, batch, _ = compiled_step(values)
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)

    def bare(state):
        for _ in range(args.steps):
            state, metrics = compiled(state, batch)
        return state, metrics

    def trainer_loop(state):
        # The trainer's per-step host work (contrastive/trainer.py): the preemption check each
        # step, device values read only at sync points.
        with PreemptionWatch() as preemption:
            for step in range(1, args.steps + 1):
                state, metrics = compiled(state, batch)
                sync_point = step % args.log_every == 0
                if sync_point:
                    metrics = jax.device_get(metrics)
                    int(state.nonfinite_in_a_row)
                preemption.requested(step, sync_point)
        return state, metrics

    def sync_every_step(state):
        for _ in range(args.steps):
            state, metrics = compiled(state, batch)
            int(state.nonfinite_in_a_row)
        return state, metrics

    loops = {"bare": bare, "trainer": trainer_loop, "sync_every_step": sync_every_step}
    times = {name: [] for name in loops}
    # Interleaved rounds, first one discarded: the first loops of a process still grow its heap
    # and would make whichever variant runs first look slow.
    for round_index in range(args.rounds + 1):
        for name, loop in loops.items():
            start = time.perf_counter()
            state, metrics = loop(state)
            jax.block_until_ready((state, metrics))
            if round_index:
                times[name].append((time.perf_counter() - start) * 1e3 / args.steps)
    rows = {name: min(values) for name, values in times.items()}
    return [
        dict(
            config=spec,
            loss=values["loss"]["name"],
            steps=args.steps,
            log_every=args.log_every,
            rounds=args.rounds,
            bare_step_ms=round(rows["bare"], 2),
            trainer_step_ms=round(rows["trainer"], 2),
            sync_every_step_ms=round(rows["sync_every_step"], 2),
            trainer_overhead=round(rows["trainer"] / rows["bare"] - 1, 4),
        )
    ]


def format_rows(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["  ".join(f"{key:>12}" for key in keys)]
    lines += ["  ".join(f"{str(row[key]):>12}" for key in keys) for row in rows]
    return "\n".join(lines)


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=None,
        metavar="OUT",
        help="print the rows as one JSON list instead of a table; with OUT, write it to that "
        "file and still print the table",
    )


def loss_list(text: str) -> list[str]:
    """ "clip,hetxl" -> ["clip", "hetxl"] (argparse type)."""
    known = ("clip", "siglip", "hetxl")
    losses = [item for item in text.split(",") if item]
    if not losses or any(loss not in known for loss in losses) or len(set(losses)) < len(losses):
        raise argparse.ArgumentTypeError(
            f"expected distinct comma-separated losses of {list(known)}, got {text!r}"
        )
    return losses


def read_rows(path: str, flag: str) -> list[dict]:
    """The JSON list of rows a benchmark wrote with --json OUT."""
    try:
        with open(path) as file:
            rows = json.load(file)
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"error: {flag} {path}: {error}") from error
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise SystemExit(f"error: {flag} {path}: expected the JSON list of a benchmark's rows")
    return rows


def write_plot(args) -> None:
    from scripts.benchmark_plot import write_scaling_plot

    head_rows = read_rows(args.head, "--head")
    if not all("classes" in row for row in head_rows):
        raise SystemExit(f"error: --head {args.head}: not rows of `benchmark head`")
    loss_rows = [row for path in args.loss for row in read_rows(path, "--loss")]
    if not all("loss" in row for row in loss_rows):
        raise SystemExit("error: --loss: not rows of `benchmark loss`")
    print(f"wrote {write_scaling_plot(head_rows, loss_rows, args.out)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="step and loop take --config FILE.py[:arg] and --config.a.b=value overrides "
        "of its fields; see `benchmark step --help`; head takes overrides of "
        f"{benchmark_head.CLASSIFY_CONFIG}",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    loss = commands.add_parser("loss", help="contrastive losses: value + gradient")
    loss.add_argument("--batch", type=positive_int, required=True, help="global batch")
    loss.add_argument("--dim", type=positive_int, required=True, help="embedding dimension")
    loss.add_argument(
        "--samples", type=positive_int, nargs="+", default=[16], help="HET-XL MC samples"
    )
    loss.add_argument("--factors", type=positive_int, default=8, help="HET-XL low-rank factors R")
    loss.add_argument(
        "--sample-chunk",
        type=positive_int,
        default=None,
        help="HET-XL samples per chunk (default: as many as fit the sampling block's chunk_bytes)",
    )
    loss.add_argument("--column-chunk", type=positive_int, default=1024)
    loss.add_argument("--repeats", type=positive_int, default=10)
    step = commands.add_parser("step", help="the whole train step of a config")
    loop = commands.add_parser("loop", help="the train loop's cost around the compiled step")
    for command in (step, loop):
        add_config_flag(command)
        command.add_argument(
            "--loss",
            type=loss_list,
            default=None,
            help="appended to the config's argument as loss=... (it wins over one given there); "
            "step takes several, comma-separated (clip,hetxl), timed side by side",
        )
    step.add_argument("--repeats", type=positive_int, default=10)
    step.add_argument(
        "--matmul-size",
        type=positive_int,
        default=2048,
        help="side of the square matmul of the peak",
    )
    step.add_argument(
        "--reference-big-vision",
        metavar="DIR",
        default=None,
        help="also time big_vision's two-tower step of the same model, imported from the "
        "big_vision checkout DIR, alternating with ours (see tools/benchmark_reference.py)",
    )
    loop.add_argument("--steps", type=positive_int, default=20, help="steps per variant")
    loop.add_argument(
        "--log_every", type=positive_int, default=10, help="steps between sync points"
    )
    loop.add_argument(
        "--rounds", type=positive_int, default=2, help="timed rounds (best one reported)"
    )
    head = commands.add_parser(
        "head",
        help="a classification head's train step for each head, K and S",
        epilog=f"takes --config.a.b=value overrides of {benchmark_head.CLASSIFY_CONFIG}, e.g. "
        "--config.model.noise.num_factors=50 or --config.sampling.chunk_size=16",
    )
    head.add_argument(
        "--classes",
        type=benchmark_head.int_list,
        default=[1000, 3000, 10_000, 30_000],
        help="numbers of classes K, comma-separated (default: 1000,3000,10000,30000)",
    )
    head.add_argument(
        "--samples",
        type=benchmark_head.int_list,
        default=[1, 16, 100, 1000],
        help="MC samples S of HET and HET-XL, comma-separated (default: 1,16,100,1000)",
    )
    head.add_argument(
        "--heads",
        type=benchmark_head.head_list,
        default=["det", "het", "hetxl"],
        help="comma-separated (default: det,het,hetxl)",
    )
    head.add_argument(
        "--forms",
        type=benchmark_head.form_list,
        default=["auto"],
        help="HET-XL's algebra, comma-separated: auto (the cost model's choice), dense, w_once; "
        "several time each as its own row (default: auto)",
    )
    head.add_argument("--dim", type=positive_int, default=256, help="pre-logit dimension D")
    head.add_argument("--batch", type=positive_int, default=128, help="global batch")
    head.add_argument("--repeats", type=positive_int, default=5, help="timed calls per combination")
    head.add_argument(
        "--budget-s",
        type=float,
        default=20.0,
        help="a combination stops being timed once its timed calls pass this many seconds",
    )
    head.add_argument(
        "--memory-gib",
        type=float,
        default=None,
        help="memory per device for the fit check (default: what the device has available)",
    )
    plot = commands.add_parser(
        "plot", help="scaling curves (PNG) from the JSON rows of head and loss runs"
    )
    plot.add_argument("--head", required=True, metavar="JSON", help="rows of `benchmark head`")
    plot.add_argument(
        "--loss",
        nargs="*",
        default=[],
        metavar="JSON",
        help="rows of `benchmark loss`, one file per global batch",
    )
    plot.add_argument("--out", required=True, help="PNG to write (local or a bucket URL)")
    for command in (loss, step, loop, head):
        add_json_flag(command)
        terminal.add_verbose_flag(command)
    args, overrides = parse_args_with_overrides(parser, argv)
    if args.command == "plot":
        if overrides:
            parser.error(f"benchmark plot reads no config: {overrides[0]!r} applies to nothing")
        write_plot(args)
        return
    if args.command == "loss" and overrides:
        parser.error(f"benchmark loss reads no config: {overrides[0]!r} applies to nothing")
    terminal.quiet_libraries(args.verbose)
    if args.command == "loss":
        rows = benchmark_losses(args)
    else:
        run = {
            "step": benchmark_step,
            "loop": benchmark_loop,
            "head": benchmark_head.benchmark_heads,
        }
        rows = run[args.command](args, overrides)
    table = benchmark_head.format_head_table(rows) if args.command == "head" else format_rows(rows)
    if args.json is None:
        print(table)
    elif args.json == "-":
        print(json.dumps(rows))
    else:
        with open(args.json, "w") as out:
            json.dump(rows, out)
        print(table)


if __name__ == "__main__":
    sys.exit(terminal.run(main))
