"""Parameter counts of DET, HET and HET-XL heads, counted from the instantiated modules.

    python -m scripts.param_table --dim 1024 --classes 1000 21843 --factors 50 [--full] [--json]

For each K: the DET head's parameters (W and b), the extra parameters of HET and of HET-XL over DET,
and the ratio HET extra / HET-XL extra. Nothing is computed from a formula: each head is built with
jax.eval_shape (no memory is allocated) and its parameter leaves are counted.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from scripts.terminal import positive_int

# jax and the models are imported where used: --help stays fast. This script never loads
# TensorFlow, so it has none of its start-up logs to silence.
if TYPE_CHECKING:
    from models.heteroscedastic import HeteroscedasticHead


def count_head_parameters(head: HeteroscedasticHead, dim: int) -> int:
    """Number of scalars in the head's parameters for pre-logits of dimension dim."""
    import jax
    import jax.numpy as jnp

    from scripts import model_summary

    key = jax.random.key(0)
    shapes = jax.eval_shape(
        lambda: head.init({"params": key, "noise": key}, jnp.zeros((1, dim)))["params"]
    )
    return model_summary.count(shapes)


def parameter_rows(
    dim: int, classes: list[int], factors: int, full: bool = False, learned_temperature: bool = True
) -> list[dict]:
    """One row per K with keys classes, det_params, het_extra_params, hetxl_extra_params, ratio.

    DET is the plain linear classifier (W, b); HET and HET-XL carry the learned temperature when
    learned_temperature is set, so their extras include its one parameter.
    """
    from models.heteroscedastic import HeteroscedasticHead, NoiseConfig, TemperatureConfig

    noise = NoiseConfig(num_factors=factors, parameter_efficient=not full)
    temperature = TemperatureConfig("bounded" if learned_temperature else "fixed")
    rows = []
    for num_classes in classes:
        det = count_head_parameters(
            HeteroscedasticHead(num_classes, "det", temperature=TemperatureConfig("fixed")), dim
        )
        het_extra = (
            count_head_parameters(
                HeteroscedasticHead(num_classes, "het", noise=noise, temperature=temperature), dim
            )
            - det
        )
        hetxl_extra = (
            count_head_parameters(
                HeteroscedasticHead(num_classes, "hetxl", noise=noise, temperature=temperature), dim
            )
            - det
        )
        rows.append(
            dict(
                classes=num_classes,
                det_params=det,
                het_extra_params=het_extra,
                hetxl_extra_params=hetxl_extra,
                ratio=het_extra / hetxl_extra,
            )
        )
    return rows


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'classes':>10} {'DET params':>14} {'HET extra':>14} {'HET-XL extra':>14} {'ratio':>9}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['classes']:>10,} {row['det_params']:>14,} {row['het_extra_params']:>14,} "
            f"{row['hetxl_extra_params']:>14,} {row['ratio']:>9.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=positive_int, required=True, help="pre-logit dimension D")
    parser.add_argument("--classes", type=positive_int, nargs="+", required=True, help="K values")
    parser.add_argument("--factors", type=positive_int, required=True, help="low-rank factors R")
    parser.add_argument("--full", action="store_true", help="full V(x) instead of diag(v) J^T")
    parser.add_argument(
        "--temperature",
        choices=("learned", "fixed"),
        default="learned",
        help="learned tau adds one parameter to HET and HET-XL (default: learned)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON list")
    args = parser.parse_args(argv)
    rows = parameter_rows(
        args.dim, args.classes, args.factors, args.full, args.temperature == "learned"
    )
    print(json.dumps(rows) if args.json else format_table(rows))


if __name__ == "__main__":
    main()
