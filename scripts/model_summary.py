"""Parameter counts and FLOPs of a config's two-tower model.

    python -m scripts.model_summary --config configs/clip_hetxl.py [--config.a.b=value ...] [--json]

Counts come from the model's parameter shapes (jax.eval_shape, nothing is allocated); FLOPs per
example from XLA's cost analysis of each tower's compiled forward pass on one example.
JSON keys: image_tower_params, text_tower_params, hetxl_extra_params (noise layers of the image
and, with text_noise, the text side), other_params (temperature, bias), total_params,
image_flops_per_example, text_flops_per_example, flops_per_example (both towers, forward).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from scripts import distributed, terminal
from scripts.config_loader import add_config_flag, load_config, parse_args_with_overrides


def count(tree) -> int:
    """Number of scalars in a tree of arrays or of their shapes (jax.ShapeDtypeStruct)."""
    import jax

    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def summarize(model_config) -> dict:
    import jax

    from contrastive.xla_stats import compile_function, flops
    from models.two_towers import example_inputs, two_towers_from_config

    model_config = dict(model_config)
    model = two_towers_from_config(model_config)
    images, tokens = example_inputs(model_config)
    params = jax.eval_shape(model.init, jax.random.key(0), images, tokens)["params"]
    noise_names = ("image_noise_params", "text_noise_params")
    image_params, text_params = count(params["img"]), count(params["txt"])
    noise_params = sum(count(params[name]) for name in noise_names if name in params)
    total = count(params)

    # XLA's cost analysis counts a loop body once, so FLOPs are read off the unrolled towers
    # (the same arithmetic: scan only changes how the layers are laid out).
    unrolled_config = dict(model_config)
    for tower in ("image_tower", "text_tower"):
        if dict(model_config[tower]).get("scan"):
            unrolled_config[tower] = {**model_config[tower], "scan": False}
    unrolled = two_towers_from_config(unrolled_config)
    unrolled_params = jax.eval_shape(unrolled.init, jax.random.key(0), images, tokens)["params"]

    def tower_flops(method_name, inputs):
        def forward(p, x):
            return unrolled.apply({"params": p}, x, method=getattr(unrolled, method_name))

        return flops(compile_function(forward, unrolled_params, inputs))

    image_flops = tower_flops("embed_images", images)
    text_flops = tower_flops("embed_texts", tokens)
    return dict(
        image_tower_params=image_params,
        text_tower_params=text_params,
        hetxl_extra_params=noise_params,
        other_params=total - image_params - text_params - noise_params,
        total_params=total,
        image_flops_per_example=image_flops,
        text_flops_per_example=text_flops,
        flops_per_example=image_flops + text_flops,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_flag(parser)
    parser.add_argument("--json", action="store_true")
    distributed.add_flags(parser)
    terminal.add_verbose_flag(parser)
    args, overrides = parse_args_with_overrides(parser, argv)
    terminal.quiet_libraries(args.verbose)
    # Run on every host of a TPU slice, the hosts must join before any of them compiles: the
    # TPU backend of a multi-host slice does not start in one process alone.
    distributed.initialize(args)
    config = load_config(args.config, overrides)
    summary = summarize(config.model.to_dict())
    import jax

    if jax.process_index() != 0:
        return
    if args.json:
        print(json.dumps(summary))
        return
    for key, value in summary.items():
        print(f"{key:>24}: {value:,.0f}")


if __name__ == "__main__":
    sys.exit(terminal.run(main))
