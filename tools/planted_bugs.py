"""The bugs tools.mutation_check plants: one exact snippet of the current source each, what it
becomes, and the few tests that must catch it.

A snippet must occur exactly once in its file; when you change code an entry points at, update
the entry (`python -m tools.mutation_check --list` names the stale ones).
"""

from __future__ import annotations

import dataclasses


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
        "clip_text_to_image_normalises_over_texts",
        "contrastive/losses/sharding.py",
        "    return positive - row_total, positive - column_total",
        "    return positive - row_total, positive - row_total",
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
        "models/heteroscedastic/logit_distributions.py",
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
        "contrastive/learning_rate.py",
        'peak, decay_steps, alpha=resolved["end_lr_fraction"]',
        'peak, decay_steps, alpha=1.0 - resolved["end_lr_fraction"]',
        (f"{OPTIM}::test_cosine_schedule_with_warmup_and_end_value",),
    ),
    Mutation(
        "warmup_starts_one_step_ahead",
        "contrastive/learning_rate.py",
        "[optax.linear_schedule(0.0, peak, warmup), after_warmup], [warmup]",
        "[optax.linear_schedule(peak / warmup, peak, warmup), after_warmup], [warmup]",
        (f"{OPTIM}::test_cosine_schedule_with_warmup_and_end_value",),
    ),
    Mutation(
        "rsqrt_schedule_without_the_root",
        "contrastive/learning_rate.py",
        "lr = peak * jnp.sqrt(timescale / jnp.maximum(step, timescale))",
        "lr = peak * timescale / jnp.maximum(step, timescale)",
        (f"{OPTIM}::test_rsqrt_schedule_with_cooldown",),
    ),
    # ---------------------------------------------------------------- towers
    Mutation(
        "text_encoder_ignores_dtype_mm",
        "models/text_transformer.py",
        "            dtype_mm=self.dtype_mm,\n            attention_impl",
        "            attention_impl",
        (f"{TEXT}::test_bfloat16_matmuls_keep_float32_params_and_features",),
    ),
    Mutation(
        "text_map_head_ignores_dtype_mm",
        "models/text_transformer.py",
        "                dtype_mm=self.dtype_mm,\n"
        "                attention_impl=self.attention_impl,\n"
        "            )(x, is_token)",
        "                attention_impl=self.attention_impl,\n            )(x, is_token)",
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
        "pipeline_rewind_keeps_the_skipped_counts",
        "data/pipeline.py",
        "start = StreamState(InputPosition(), (0,) * len(BAD_RECORD_REASONS))",
        "start = StreamState(InputPosition(), self._state.skipped)",
        (
            "tests/data/test_pipeline.py::"
            "test_a_finite_pass_rewinds_to_the_same_batches_and_counts_from_zero",
        ),
    ),
    Mutation(
        "order_arrange_goes_through_autograph",
        "data/order.py",
        ".map(no_autograph(arrange))",
        ".map(arrange)",
        ("tests/data/test_pipeline.py::test_no_dataset_function_goes_through_autograph",),
    ),
    Mutation(
        "vit_gap_pools_the_first_token",
        "models/vit.py",
        "pooled, encoded = jnp.mean(x, axis=1), x",
        "pooled, encoded = x[:, 0], x",
        ("tests/models/test_vit.py::test_forward_matches_numpy_reference",),
    ),
)
