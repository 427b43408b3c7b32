"""Plant known bugs one at a time and check that the tests catch every one (mutation testing).

    python -m scripts.mutation_check [--only NAME ...] [--list] [--jobs N] [--timeout S]
                                     [--no-baseline]

Each mutation below is a plausible one-line mistake in the numerical core (a wrong axis, a missing
scale, an off-by-one, a sign, a sum for a mean, a dropped temperature, a wrong reduction over
devices), written as an exact snippet of the current source and its replacement, with the few
tests that must catch it. The working tree is copied to a temporary directory (without .venv, .git
and caches); there each mutation is applied alone, its tests run with this interpreter
(`pytest -x -q`), and the file is restored. A mutation is "killed" when its tests fail (a
collection error counts: the mutated module no longer imports), "SURVIVED" when they pass.

Before any mutation, every snippet must occur exactly once in its file, so an edit of the source
that makes the list stale fails loudly instead of silently testing nothing; and the selected tests
must pass on the unmutated copy (the baseline), so a kill means the planted bug was caught. The
exit status is non-zero when a snippet is stale, the baseline fails, or any mutation survives,
times out or selects no tests. Not part of `make test`: the whole list takes about ten minutes
on two CPU cores (a baseline of about four, then a few seconds to half a minute per mutation).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Never copied: the virtual environment (the interpreter running this script is used instead),
# git metadata, caches and run outputs.
IGNORED = (".venv", ".git", "__pycache__", ".pytest_cache", ".ruff_cache", "workdirs", "runs")
IGNORED_SUFFIXES = (".pyc", ".egg-info")

DEFAULT_TIMEOUT_S = 900


@dataclasses.dataclass(frozen=True)
class Mutation:
    """One planted bug.

    Attributes:
      name: unique identifier (for --only).
      path: the source file, relative to the repository root.
      original: a snippet that occurs exactly once in that file.
      replacement: what the snippet becomes.
      tests: pytest node ids or paths, as few as catch the bug.
      k: optional pytest -k expression applied to those tests.
    """

    name: str
    path: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    k: str | None = None


LOSSES = "tests/contrastive/test_losses.py"
HET = "tests/models/test_heteroscedastic.py"
CALIBRATION = "tests/contrastive/test_calibration.py"
ZEROSHOT = "tests/contrastive/test_zeroshot.py"
RETRIEVAL = "tests/contrastive/test_retrieval.py"
CLASSIFICATION = "tests/contrastive/test_classification_eval.py"
TEXT = "tests/models/test_text_transformer.py"
OPTIM = "tests/contrastive/test_optim.py"
PREPROCESS = "tests/data/test_preprocess.py"

MUTATIONS: tuple[Mutation, ...] = (
    # ---------------------------------------------------------------- contrastive/losses
    Mutation(
        "clip_text_to_image_scores_images_against_texts",
        "contrastive/losses/clip.py",
        "            texts, gather_batch(images, axis_names), scale, chunk",
        "            images, gather_batch(texts, axis_names), scale, chunk",
        (f"{LOSSES}::test_clip_matches_dense_reference",),
    ),
    Mutation(
        "clip_drops_temperature",
        "contrastive/losses/clip.py",
        'scale = 1.0 / outputs["tau"]',
        "scale = 1.0",
        (f"{LOSSES}::test_clip_matches_dense_reference",),
    ),
    Mutation(
        "siglip_divides_by_local_batch",
        "contrastive/losses/siglip.py",
        "loss = -jax.lax.psum(log_lik, axis_names) / global_batch",
        "loss = -jax.lax.psum(log_lik, axis_names) / local_batch",
        (f"{LOSSES}::test_siglip_matches_dense_reference",),
    ),
    Mutation(
        "siglip_bias_outside_the_sign",
        "contrastive/losses/siglip.py",
        "jax.nn.log_sigmoid(signs * (scale * dots + bias))",
        "jax.nn.log_sigmoid(signs * scale * dots + bias)",
        (f"{LOSSES}::test_siglip_matches_dense_reference",),
    ),
    Mutation(
        "global_mean_sums_over_devices",
        "contrastive/losses/metrics.py",
        "return jax.lax.pmean(jnp.mean(x), axis_names)",
        "return jax.lax.psum(jnp.mean(x), axis_names)",
        (f"{LOSSES}::test_clip_matches_dense_reference",),
    ),
    Mutation(
        "batch_offset_ignores_the_local_batch",
        "contrastive/losses/sharding.py",
        "return jax.lax.axis_index(axis_names) * local_batch",
        "return jax.lax.axis_index(axis_names)",
        (f"{LOSSES}::test_siglip_matches_dense_reference",),
    ),
    Mutation(
        "logsumexp_across_devices_drops_the_shift",
        "contrastive/losses/sharding.py",
        "return jnp.log(summed) + local_shift",
        "return jnp.log(summed)",
        (f"{LOSSES}::test_hetxl_matches_dense_reference",),
    ),
    Mutation(
        "hetxl_renormalizes_over_the_sample_axis",
        "contrastive/losses/hetxl.py",
        "noisy = noisy / jnp.linalg.norm(noisy, axis=-1, keepdims=True)",
        "noisy = noisy / jnp.linalg.norm(noisy, axis=0, keepdims=True)",
        (f"{LOSSES}::test_hetxl_options_match_dense_reference",),
    ),
    Mutation(
        "hetxl_text_noise_reuses_the_image_draws",
        "contrastive/losses/hetxl.py",
        "text_key = jax.random.fold_in(key, 1)",
        "text_key = key",
        (f"{LOSSES}::test_hetxl_with_text_noise_matches_dense_reference",),
    ),
    Mutation(
        "hetxl_metrics_swap_the_directions",
        "contrastive/losses/hetxl.py",
        '            "loss_image_to_text": loss_i2t,\n            "loss_text_to_image": loss_t2i,',
        '            "loss_image_to_text": loss_t2i,\n            "loss_text_to_image": loss_i2t,',
        (f"{LOSSES}::test_per_direction_losses_and_noise_metrics_match_dense_values",),
    ),
    # ---------------------------------------------------------------- models/heteroscedastic
    Mutation(
        "deterministic_log_probs_ignore_tau",
        "models/heteroscedastic/mc.py",
        "    scaled = distribution.mean / tau\n"
        '    if likelihood == "softmax":\n'
        "        return jax.nn.log_softmax(scaled, axis=-1)",
        "    scaled = distribution.mean\n"
        '    if likelihood == "softmax":\n'
        "        return jax.nn.log_softmax(scaled, axis=-1)",
        (f"{HET}::test_deterministic_softmax_prediction_divides_the_logits_by_tau",),
    ),
    Mutation(
        "deterministic_log_likelihood_ignores_tau",
        "models/heteroscedastic/mc.py",
        "    scaled = distribution.mean / tau\n"
        '    if likelihood == "softmax":\n'
        "        return jnp.take_along_axis(",
        "    scaled = distribution.mean\n"
        '    if likelihood == "softmax":\n'
        "        return jnp.take_along_axis(",
        (f"{HET}::test_deterministic_softmax_prediction_divides_the_logits_by_tau",),
    ),
    Mutation(
        "mc_gradient_pass_forgets_log_num_samples",
        "models/heteroscedastic/mc.py",
        "return log_sum - math.log(num_samples), (diff_operands, aux_operands, key, log_sum)",
        "return log_sum, (diff_operands, aux_operands, key, log_sum)",
        (f"{HET}::test_gradients_match_a_dense_reference_and_reach_t_v_d_and_w",),
    ),
    Mutation(
        "mc_chunk_count_rounds_down",
        "models/heteroscedastic/mc.py",
        "return chunk, -(-num_samples // chunk)",
        "return chunk, num_samples // chunk",
        (f"{HET}::test_mc_log_probs_average_probabilities_and_ignore_chunking",),
    ),
    Mutation(
        "mc_last_chunk_keeps_one_sample_too_many",
        "models/heteroscedastic/mc.py",
        "return (sample_ids < num_samples).reshape(",
        "return (sample_ids <= num_samples).reshape(",
        (f"{HET}::test_mc_log_probs_average_probabilities_and_ignore_chunking",),
    ),
    Mutation(
        "mc_backward_drops_the_output_cotangent",
        "models/heteroscedastic/mc.py",
        "weights = jnp.where(valid, jnp.exp(values - log_sum), 0.0) * output_cotangent",
        "weights = jnp.where(valid, jnp.exp(values - log_sum), 0.0)",
        (f"{HET}::test_gradients_match_a_dense_reference_and_reach_t_v_d_and_w",),
    ),
    Mutation(
        "hetxl_logits_drop_the_mean_shift",
        "models/heteroscedastic/mc.py",
        "shifted = pre_logits if noise.mean_shift is None else pre_logits + noise.mean_shift",
        "shifted = pre_logits",
        (f"{HET}::test_efficient_form_equals_naive_form_on_the_same_draws",),
    ),
    Mutation(
        "noise_scale_loses_its_floor",
        "models/heteroscedastic/noise.py",
        "diag_scale = jax.nn.softplus(diag_layer(features)) + config.min_scale",
        "diag_scale = jax.nn.softplus(diag_layer(features))",
        (f"{HET}::test_parameter_efficient_factors_are_diag_v_times_j_transpose",),
    ),
    Mutation(
        "initial_noise_scale_forgets_the_floor",
        "models/heteroscedastic/noise.py",
        "math.log(math.expm1(config.diag_scale_init - config.min_scale))",
        "math.log(math.expm1(config.diag_scale_init))",
        (f"{HET}::test_initial_scale_options_set_d_and_scale_the_noise_kernels",),
    ),
    Mutation(
        "full_factors_read_as_r_rows_of_n",
        "models/heteroscedastic/noise.py",
        "factors = flat.reshape(features.shape[:-1] + (n, r))",
        "factors = flat.reshape(features.shape[:-1] + (r, n)).swapaxes(-1, -2)",
        (f"{HET}::test_full_factors_are_one_dense_output_read_as_n_rows_of_r",),
    ),
    Mutation(
        "shared_scalar_covariance_made_diagonal",
        "models/heteroscedastic/noise.py",
        'return low_rank + jnp.einsum("bn,bm->bnm", self.diag_scale, self.diag_scale)',
        "return low_rank + jax.vmap(jnp.diag)(self.diag_scale**2)",
        (f"{HET}::test_empirical_covariance_of_sampled_noise",),
    ),
    Mutation(
        "log_bounded_tau_is_linear",
        "models/heteroscedastic/temperature.py",
        "return jnp.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * jax.nn.sigmoid(t))",
        "return lo + (hi - lo) * jax.nn.sigmoid(t)",
        (f"{HET}::test_bounded_temperatures_follow_their_formulas",),
    ),
    Mutation(
        "log_scale_temperature_sign_flipped",
        "models/heteroscedastic/temperature.py",
        "return jnp.exp(-param)",
        "return jnp.exp(param)",
        (f"{HET}::test_initial_temperature_is_the_configured_value",),
    ),
    # ---------------------------------------------------------------- evaluators, calibration
    Mutation(
        "classification_reports_the_error_rate",
        "contrastive/evaluators/classification.py",
        '"accuracy": metrics["top1"],',
        '"accuracy": 1 - metrics["top1"],',
        (CLASSIFICATION,),
    ),
    Mutation(
        "classification_sums_the_nll",
        "contrastive/evaluators/classification.py",
        '"nll": metrics["nll"],',
        '"nll": metrics["nll"] * metrics["num_examples"],',
        (CLASSIFICATION,),
    ),
    Mutation(
        "classification_scores_with_train_samples",
        "contrastive/evaluators/classification.py",
        'batch["image"], rngs={"noise": jax.random.key(0)}',
        'batch["image"], train=True, rngs={"noise": jax.random.key(0)}',
        (
            f"{CLASSIFICATION}::"
            "test_hetxl_head_is_scored_by_its_mc_prediction_with_eval_samples_and_tau",
        ),
    ),
    Mutation(
        "calibration_sums_the_nll",
        "contrastive/evaluators/calibration.py",
        "nll=self.nll_sum / n,",
        "nll=self.nll_sum,",
        (f"{CALIBRATION}::test_metrics_match_hand_computed_values",),
    ),
    Mutation(
        "per_class_table_counts_top5_hits",
        "contrastive/evaluators/calibration.py",
        "labels, weights=correct, minlength=self.num_classes",
        "labels, weights=rank < 5, minlength=self.num_classes",
        (f"{CALIBRATION}::test_random_predictions_match_a_numpy_reference_per_class_and_per_bin",),
    ),
    Mutation(
        "per_class_table_counts_top5_hits_in_zero_shot",
        "contrastive/evaluators/calibration.py",
        "labels, weights=correct, minlength=self.num_classes",
        "labels, weights=rank < 5, minlength=self.num_classes",
        (f"{ZEROSHOT}::test_zero_shot_metrics_match_dense_reference",),
    ),
    Mutation(
        "ece_takes_the_absolute_value_of_the_sum",
        "contrastive/evaluators/calibration.py",
        "np.sum(np.abs(np.asarray(bin_correct) - np.asarray(bin_confidence)))",
        "np.abs(np.sum(np.asarray(bin_correct) - np.asarray(bin_confidence)))",
        (f"{CALIBRATION}::test_metrics_match_hand_computed_values",),
    ),
    Mutation(
        "zero_shot_drops_temperature",
        "contrastive/evaluators/zeroshot.py",
        "logits = jnp.matmul(image_embeddings, classes.T, precision=PRECISION) / tau",
        "logits = jnp.matmul(image_embeddings, classes.T, precision=PRECISION)",
        (f"{ZEROSHOT}::test_known_embeddings_give_hand_computed_metrics",),
    ),
    Mutation(
        "zero_shot_monte_carlo_drops_temperature",
        "contrastive/evaluators/zeroshot.py",
        "logits = jnp.matmul(noisy, classes.T, precision=PRECISION) / tau",
        "logits = jnp.matmul(noisy, classes.T, precision=PRECISION)",
        (f"{ZEROSHOT}::test_monte_carlo_prediction_matches_its_analytic_value",),
    ),
    Mutation(
        "retrieval_ties_count_against_the_positive",
        "contrastive/evaluators/retrieval.py",
        "return jnp.sum(scores > positive, axis=1)",
        "return jnp.sum(scores >= positive, axis=1)",
        (f"{RETRIEVAL}::test_hand_worked_recall_with_a_duplicate_caption",),
    ),
    Mutation(
        "retrieval_recall_at_k_off_by_one",
        "contrastive/evaluators/retrieval.py",
        "float(np.mean(ranks < k))",
        "float(np.mean(ranks <= k))",
        (f"{RETRIEVAL}::test_hand_worked_recall_with_a_duplicate_caption",),
    ),
    Mutation(
        "retrieval_max_pairs_off_by_one",
        "contrastive/evaluators/retrieval.py",
        "if count > self.max_pairs:",
        "if count >= self.max_pairs:",
        (f"{RETRIEVAL}::test_exactly_max_pairs_is_allowed_and_an_empty_split_is_an_error",),
    ),
    # ---------------------------------------------------------------- step, accumulation
    Mutation(
        "accumulation_leaves_scalar_cotangents_unscaled",
        "contrastive/accumulation.py",
        "grad / accum_steps if grad.ndim == 0 else microbatch(grad, index, accum_steps)",
        "grad if grad.ndim == 0 else microbatch(grad, index, accum_steps)",
        (
            "tests/contrastive/test_accumulation.py::"
            "test_accumulated_loss_and_gradients_equal_the_full_batch_ones[clip]",
        ),
    ),
    Mutation(
        "accumulation_merges_microbatches_contiguously",
        "contrastive/accumulation.py",
        "return jnp.swapaxes(leaf, 0, 1).reshape(rows * accum_steps, *leaf.shape[2:])",
        "return leaf.reshape(rows * accum_steps, *leaf.shape[2:])",
        (
            "tests/contrastive/test_accumulation.py::test_microbatches_merge_back_to_the_original_row_order",
        ),
    ),
    Mutation(
        "step_counts_nonfinite_updates_without_accumulating",
        "contrastive/step.py",
        "nonfinite_in_a_row=jnp.where(finite, 0, state.nonfinite_in_a_row + 1),",
        "nonfinite_in_a_row=jnp.where(finite, 0, 1),",
        ("tests/contrastive/test_step.py::test_nonfinite_loss_skips_the_update_and_is_counted",),
    ),
    # ---------------------------------------------------------------- data preprocessing ops
    Mutation(
        "central_crop_left_edge_from_the_height",
        "data/ops.py",
        "left = (shape[1] - width) // 2",
        "left = (shape[0] - width) // 2",
        (f"{PREPROCESS}::test_central_crop_is_the_centre_window",),
    ),
    Mutation(
        "value_range_drops_the_offset",
        "data/ops.py",
        "scaled = (image - in_min) / (in_max - in_min) * (vmax - vmin) + vmin",
        "scaled = (image - in_min) / (in_max - in_min) * (vmax - vmin)",
        (f"{PREPROCESS}::test_value_range_matches_the_affine_formula",),
    ),
    Mutation(
        "to_uint8_truncates",
        "data/ops.py",
        "tf.saturate_cast(tf.round(image), tf.uint8)",
        "tf.saturate_cast(image, tf.uint8)",
        ("tests/data/test_transfer.py::test_resized_images_are_within_half_a_uint8_step",),
    ),
    # ---------------------------------------------------------------- optimizer schedule
    Mutation(
        "cosine_schedule_end_value_inverted",
        "contrastive/optim.py",
        'peak, decay_steps, alpha=resolved["end_lr_fraction"]',
        'peak, decay_steps, alpha=1.0 - resolved["end_lr_fraction"]',
        (f"{OPTIM}::test_cosine_schedule_with_warmup_and_end_value",),
    ),
    Mutation(
        "warmup_starts_one_step_ahead",
        "contrastive/optim.py",
        "[optax.linear_schedule(0.0, peak, warmup), after_warmup], [warmup]",
        "[optax.linear_schedule(peak / warmup, peak, warmup), after_warmup], [warmup]",
        (f"{OPTIM}::test_cosine_schedule_with_warmup_and_end_value",),
    ),
    Mutation(
        "rsqrt_schedule_without_the_root",
        "contrastive/optim.py",
        "lr = peak * jnp.sqrt(timescale / jnp.maximum(step, timescale))",
        "lr = peak * timescale / jnp.maximum(step, timescale)",
        (f"{OPTIM}::test_rsqrt_schedule_with_cooldown",),
    ),
    # ---------------------------------------------------------------- towers
    Mutation(
        "text_encoder_ignores_dtype_mm",
        "models/text_transformer.py",
        '            dtype_mm=self.dtype_mm,\n            name="Encoder_0",',
        '            name="Encoder_0",',
        (f"{TEXT}::test_bfloat16_matmuls_keep_float32_params_and_features",),
    ),
    Mutation(
        "text_map_head_ignores_dtype_mm",
        "models/text_transformer.py",
        "num_heads=self.num_heads, mlp_dim=self.mlp_dim, dtype_mm=self.dtype_mm\n"
        "            )(x, is_token)",
        "num_heads=self.num_heads, mlp_dim=self.mlp_dim\n            )(x, is_token)",
        (f"{TEXT}::test_bfloat16_matmuls_keep_float32_params_and_features",),
    ),
    Mutation(
        "text_position_rows_shifted_by_one",
        "models/text_transformer.py",
        "x = x + posemb[:, :length]",
        "x = x + posemb[:, 1 : length + 1]",
        (f"{TEXT}::test_forward_matches_numpy_reference",),
    ),
    Mutation(
        "text_noise_uses_the_image_noise_parameters",
        "models/two_towers.py",
        'outputs["text_noise"] = self.text_noise_params(embedding)',
        'outputs["text_noise"] = self.image_noise_params(embedding)',
        (
            "tests/models/test_two_towers.py::"
            "test_each_side_gets_noise_from_its_own_unit_embedding_and_parameters",
        ),
    ),
    Mutation(
        "vit_gap_pools_the_first_token",
        "models/vit.py",
        "pooled, encoded = jnp.mean(x, axis=1), x",
        "pooled, encoded = x[:, 0], x",
        ("tests/models/test_vit.py::test_forward_matches_numpy_reference",),
    ),
)


class StaleMutation(ValueError):
    """A mutation's snippet does not occur exactly once in its file."""


def snippet_problem(mutation: Mutation, root: Path) -> str | None:
    """Why the mutation cannot be applied to the tree at root, or None when it can."""
    path = root / mutation.path
    if not path.is_file():
        return f"{mutation.path} does not exist"
    if mutation.original == mutation.replacement:
        return "the replacement equals the original"
    count = path.read_text().count(mutation.original)
    if count != 1:
        return f"the original snippet occurs {count} times in {mutation.path} (expected once)"
    return None


def apply_mutation(mutation: Mutation, root: Path) -> str:
    """Write the mutated file under root; returns the original text (to restore it)."""
    problem = snippet_problem(mutation, root)
    if problem:
        raise StaleMutation(f"{mutation.name}: {problem}")
    path = root / mutation.path
    text = path.read_text()
    path.write_text(text.replace(mutation.original, mutation.replacement))
    return text


def copy_tree(source: Path, destination: Path) -> None:
    """The working tree without IGNORED directories and compiled files."""

    def ignore(_directory: str, names: list[str]) -> list[str]:
        return [n for n in names if n in IGNORED or n.endswith(IGNORED_SUFFIXES)]

    shutil.copytree(source, destination, ignore=ignore, symlinks=True)


def pytest_command(tests: Sequence[str], k: str | None = None) -> list[str]:
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    return command + (["-k", k] if k else [])


def run_pytest(
    root: Path, tests: Sequence[str], k: str | None, timeout_s: float
) -> tuple[int | None, float, str]:
    """(exit code or None on timeout, seconds, output) of pytest on the tree at root."""
    # No bytecode: a restored file of the same size written within the same second could
    # otherwise be imported from the mutated version's cache.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.monotonic()
    process = subprocess.Popen(
        pytest_command(tests, k),
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, so a timeout ends all its children
    )
    try:
        output, _ = process.communicate(timeout=timeout_s)
        code: int | None = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        code = None
    return code, time.monotonic() - start, output


def outcome(exit_code: int | None) -> str:
    """pytest's exit code as a mutation outcome: 1 (tests failed) and 2 (collection error, e.g.
    the mutated module does not import) kill it; 0 means it survived."""
    if exit_code is None:
        return "TIMEOUT"
    if exit_code in (1, 2):
        return "killed"
    if exit_code == 0:
        return "SURVIVED"
    if exit_code == 5:
        return "NO TESTS"
    return f"ERROR ({exit_code})"


def baseline_groups(mutations: Sequence[Mutation]) -> dict[str | None, list[str]]:
    """The distinct tests of the mutations, grouped by -k expression (one pytest run each)."""
    groups: dict[str | None, list[str]] = {}
    for mutation in mutations:
        tests = groups.setdefault(mutation.k, [])
        tests.extend(t for t in mutation.tests if t not in tests)
    return groups


def format_table(rows: Sequence[tuple[str, str, float]]) -> str:
    width = max([len("mutation")] + [len(name) for name, _, _ in rows])
    lines = [f"{'mutation':<{width}}  {'result':<10}  {'seconds':>7}", "-" * (width + 21)]
    lines += [f"{name:<{width}}  {result:<10}  {seconds:>7.1f}" for name, result, seconds in rows]
    return "\n".join(lines)


def check_mutations(
    mutations: Sequence[Mutation], workers: int, timeout_s: float, baseline: bool = True
) -> int:
    """Runs every mutation on copies of the tree; prints the table; returns the exit status."""
    with tempfile.TemporaryDirectory(prefix="mutation_check_") as scratch:
        trees: queue.Queue[Path] = queue.Queue()
        for index in range(workers):
            tree = Path(scratch) / f"tree{index}"
            copy_tree(REPO, tree)
            trees.put(tree)
        if baseline:
            tree = trees.get()
            for k, tests in baseline_groups(mutations).items():
                code, seconds, output = run_pytest(tree, tests, k, timeout_s * len(tests))
                if code != 0:
                    print(output[-4000:])
                    print(f"baseline: the selected tests do not pass unmutated (exit {code})")
                    return 1
                print(f"baseline: {len(tests)} test selections pass ({seconds:.0f} s)", flush=True)
            trees.put(tree)

        def run_one(mutation: Mutation) -> tuple[str, str, float]:
            tree = trees.get()
            try:
                original = apply_mutation(mutation, tree)
                try:
                    code, seconds, _ = run_pytest(tree, mutation.tests, mutation.k, timeout_s)
                finally:
                    (tree / mutation.path).write_text(original)
            finally:
                trees.put(tree)
            result = outcome(code)
            print(f"{mutation.name}: {result} ({seconds:.0f} s)", flush=True)
            return mutation.name, result, seconds

        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            rows = list(pool.map(run_one, mutations))
    print()
    print(format_table(rows))
    killed = sum(result == "killed" for _, result, _ in rows)
    print(f"\n{len(rows)} mutations: {killed} killed, {len(rows) - killed} not killed")
    return 0 if killed == len(rows) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", action="append", metavar="NAME", help="run this mutation (repeatable)"
    )
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument(
        "--jobs", type=int, default=1, help="mutations tested at once, each on its own copy"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds allowed per mutation (default {DEFAULT_TIMEOUT_S})",
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip running the tests unmutated first"
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    names = [m.name for m in MUTATIONS]
    if len(set(names)) != len(names):
        parser.error("mutation names are not unique")
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:
        parser.error(f"unknown mutation(s) {unknown}; --list shows the known ones")
    selected = [m for m in MUTATIONS if not args.only or m.name in args.only]

    stale = [(m.name, snippet_problem(m, REPO)) for m in selected]
    stale = [(name, problem) for name, problem in stale if problem]
    if args.list:
        for mutation in selected:
            k = f" -k {mutation.k!r}" if mutation.k else ""
            print(f"{mutation.name}\n    {mutation.path}\n    {' '.join(mutation.tests)}{k}")
    for name, problem in stale:
        print(f"STALE {name}: {problem}", file=sys.stderr)
    if stale:
        return 1
    if args.list:
        return 0
    return check_mutations(selected, args.jobs, args.timeout, not args.no_baseline)


if __name__ == "__main__":
    sys.exit(main())
