"""Config validation: a table of broken configs, each reported on one line naming the key and
the rule, all problems of a config at once, and shapes derived from the input where possible."""

import pytest

from contrastive.validation import pp_image_size, pp_tokenizer, validate_config
from data.config_blocks import ConfigError
from tests.contrastive.test_trainer import classification_config, contrastive_config
from tests.data.helpers import make_fashion_dir


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation_fashion")
    make_fashion_dir(root, n_train=16, n_test=8)
    return str(root)


def base(data_dir, loss="hetxl"):
    return contrastive_config(data_dir, loss=loss).to_dict()


def set_key(values, dotted, value):
    *parents, leaf = dotted.split(".")
    node = values
    for part in parents:
        node = node[part]
    node[leaf] = value


def edits(*pairs):
    def apply(values):
        for dotted, value in pairs:
            set_key(values, dotted, value)

    return apply


def remove(dotted):
    def apply(values):
        *parents, leaf = dotted.split(".")
        node = values
        for part in parents:
            node = node[part]
        del node[leaf]

    return apply


def as_loss(name):
    def apply(values):
        values["loss"] = {"name": name, "column_chunk_size": 8}

    return apply


def append_to_pp(suffix):
    def apply(values):
        values["input"]["pp"] += suffix

    return apply


# (id, base loss, edit, substrings that must all appear in one problem line)
BROKEN = [
    (
        "tower_name_typo",
        "hetxl",
        edits(("model.image_tower.name", "vitt")),
        ["Unknown tower 'vitt'"],
    ),
    ("unknown_tower_option", "hetxl", edits(("model.image_tower.depht", 2)), ["model", "depht"]),
    (
        "text_tower_typo",
        "hetxl",
        edits(("model.text_tower.name", "bert")),
        ["Unknown tower 'bert'"],
    ),
    (
        "hetxl_without_noise",
        "hetxl",
        edits(("model.noise", None)),
        ["loss.name='hetxl'", "model.noise"],
    ),
    ("zero_samples", "hetxl", edits(("sampling.train_samples", 0)), ["sampling", "train_samples"]),
    (
        "negative_sample_chunk",
        "hetxl",
        edits(("sampling.chunk_size", -2)),
        ["sampling", "chunk_size"],
    ),
    (
        "samples_left_in_the_loss",
        "hetxl",
        edits(("loss.num_samples", 64)),
        ["loss.num_samples has moved to sampling.train_samples"],
    ),
    (
        "samples_left_in_the_noise",
        "hetxl",
        edits(("model.noise.train_samples", 999)),
        ["model.noise.train_samples has moved to sampling.train_samples"],
    ),
    (
        "unknown_sampling_key",
        "hetxl",
        edits(("sampling.samples", 4)),
        ["sampling: unknown key(s) ['samples']"],
    ),
    (
        "mc_samples_in_an_eval",
        "hetxl",
        edits(("evals.zeroshot.mc_samples", 4)),
        ["evals.zeroshot.mc_samples has moved", "sampling.eval_samples"],
    ),
    (
        "zero_column_chunk",
        "clip",
        edits(("loss.column_chunk_size", 0)),
        ["loss", "column_chunk_size"],
    ),
    (
        "image_size_disagrees_with_pp",
        "hetxl",
        edits(("model.image_size", 32)),
        ["model.image_size=32", "input.pp", "28"],
    ),
    (
        "text_length_disagrees_with_pp",
        "hetxl",
        edits(("model.text_length", 10)),
        ["model.text_length=10", "max_len"],
    ),
    (
        "vocab_below_tokenizer",
        "hetxl",
        edits(("model.text_tower.vocab_size", 1000)),
        ["model.text_tower.vocab_size=1000", "30522"],
    ),
    (
        "missing_npz",
        "hetxl",
        edits(("model_init", {"image": {"npz": "/nonexistent/B_16.npz"}})),
        ["model_init.image.npz", "/nonexistent/B_16.npz"],
    ),
    (
        "warmup_longer_than_run",
        "hetxl",
        edits(("optim.schedule", {"name": "cosine", "warmup_steps": 50})),
        ["warmup", "total_steps (6)"],
    ),
    ("negative_lr", "hetxl", edits(("optim.lr", -1.0)), ["optim.lr"]),
    ("optimizer_name_typo", "hetxl", edits(("optim.name", "adam")), ["optim.name", "adam"]),
    (
        "key_of_another_optimizer",
        "hetxl",
        edits(("optim.momentum", 0.9)),
        ["optim.momentum", "adamw"],
    ),
    (
        "freeze_matches_nothing",
        "hetxl",
        edits(("optim.freeze", ["towers/.*"])),
        ["optim", "towers/.*"],
    ),
    (
        "unknown_top_level_key",
        "hetxl",
        edits(("totl_steps", 5)),
        ["config: unknown key(s) ['totl_steps']"],
    ),
    ("two_durations", "hetxl", edits(("total_epochs", 1.0)), ["exactly one", "total_epochs"]),
    ("no_duration", "hetxl", remove("total_steps"), ["exactly one"]),
    ("zero_steps", "hetxl", edits(("total_steps", 0)), ["total_steps=0"]),
    ("task_typo", "hetxl", edits(("task", "contrastiv")), ["task='contrastiv'"]),
    (
        "microbatches_do_not_split",
        "hetxl",
        edits(("accum_steps", 3)),
        ["batch_size=16", "microbatch"],
    ),
    ("unknown_input_key", "hetxl", edits(("input.shufle", 10)), ["input", "shufle"]),
    ("unknown_pp_op", "hetxl", append_to_pp("|blur(3)"), ["input", "unknown op 'blur'"]),
    (
        "unknown_source",
        "hetxl",
        edits(("input.source.name", "fashion")),
        ["input", "unknown source name 'fashion'"],
    ),
    ("zero_batch", "hetxl", edits(("input.batch_size", 0)), ["input", "batch_size=0"]),
    (
        # Counting an epoch reads the source: its missing files are named under input.source.
        "epochs_of_a_missing_data_dir",
        "hetxl",
        edits(
            ("total_steps", None),
            ("total_epochs", 1.0),
            ("input.source.data_dir", "/nonexistent/fashion"),
        ),
        ["input.source", "train-images", "/nonexistent/fashion"],
    ),
    ("training_input_with_epochs", "hetxl", edits(("input.num_epochs", 1)), ["input.num_epochs"]),
    (
        "missing_tokenizer_model",
        "hetxl",
        append_to_pp(
            "|tokenize(max_len=4, key='text', out_key='t2', "
            "model='sentencepiece:/nonexistent.model')"
        ),
        ["input", "/nonexistent.model"],
    ),
    ("loss_name_typo", "hetxl", edits(("loss.name", "hetx")), ["loss", "'hetx' is unknown"]),
    ("unknown_loss_option", "hetxl", edits(("loss.num_sample", 4)), ["loss", "num_sample"]),
    ("clip_with_unused_noise", "hetxl", as_loss("clip"), ["model.noise", "'clip'"]),
    ("siglip_without_bias", "clip", as_loss("siglip"), ["loss.name='siglip'", "bias_init"]),
    (
        "temperature_mode_typo",
        "hetxl",
        edits(("model.temperature.mode", "bounded_logg")),
        ["model", "bounded_logg"],
    ),
    (
        "unknown_noise_key",
        "hetxl",
        edits(("model.noise.num_factor", 3)),
        ["model.noise", "num_factor"],
    ),
    (
        "checkpoint_every_zero",
        "hetxl",
        edits(("checkpoint.every_steps", 0)),
        ["checkpoint.every_steps=0"],
    ),
    ("checkpoint_keep_zero", "hetxl", edits(("checkpoint.keep", 0)), ["checkpoint.keep=0"]),
    ("log_every_zero", "hetxl", edits(("log_every", 0)), ["log_every=0"]),
    (
        "eval_kind_typo",
        "hetxl",
        edits(("evals.zeroshot.kind", "zero_shot")),
        ["evals.zeroshot", "zero_shot"],
    ),
    (
        "eval_images_of_another_size",
        "hetxl",
        edits(("evals.zeroshot.input.pp", "decode|resize(32)|value_range(-1, 1)")),
        ["evals.zeroshot.input.pp", "32x32", "28x28"],
    ),
    ("mesh_that_does_not_fit", "hetxl", edits(("mesh", {"data": 3, "fsdp": 1})), ["mesh"]),
]


@pytest.mark.parametrize(
    "loss, edit, expected", [case[1:] for case in BROKEN], ids=[case[0] for case in BROKEN]
)
def test_each_broken_config_is_one_line_naming_the_key(data_dir, loss, edit, expected):
    values = base(data_dir, loss)
    validate_config(values)  # the base is valid
    edit(values)
    with pytest.raises(ConfigError) as raised:
        validate_config(values)
    problems = raised.value.problems
    matching = [line for line in problems if all(text in line for text in expected)]
    assert matching, f"no line has all of {expected}: {problems}"
    assert all("\n" not in line and "Traceback" not in line for line in problems)


def test_the_table_is_at_least_thirty_configs():
    assert len({case[0] for case in BROKEN}) == len(BROKEN) >= 30


def test_every_problem_is_reported_at_once(data_dir):
    values = base(data_dir)
    for case_id in (
        "unknown_tower_option",
        "zero_samples",
        "negative_lr",
        "optimizer_name_typo",
        "log_every_zero",
        "vocab_below_tokenizer",
        "missing_npz",
    ):
        edit = next(case[2] for case in BROKEN if case[0] == case_id)
        edit(values)
    with pytest.raises(ConfigError) as raised:
        validate_config(values)
    text = "\n".join(raised.value.problems)
    for fragment in (
        "depht",
        "train_samples",
        "optim.lr",
        "optim.name",
        "log_every=0",
        "vocab_size=1000",
        "model_init.image.npz",
    ):
        assert fragment in text, fragment


def test_shapes_are_derived_from_the_op_string_and_tokenizer(data_dir):
    values = base(data_dir)
    del values["model"]["image_size"], values["model"]["text_length"]
    del values["model"]["text_tower"]["vocab_size"]
    checked = validate_config(values)
    assert checked["model"]["image_size"] == 28  # resize(28) in the op string
    assert checked["model"]["text_length"] == pp_tokenizer(values["input"]["pp"])[0]
    assert checked["model"]["text_tower"]["vocab_size"] == 30522  # lines of MiniLM's vocab.txt


def test_classification_image_size_is_derived(data_dir):
    values = classification_config(data_dir).to_dict()
    del values["model"]["image_size"]
    assert validate_config(values)["model"]["image_size"] == 28


@pytest.mark.parametrize(
    "pp, size",
    [
        ("decode|resize(224)|value_range(-1, 1)", (224, 224)),
        ("decode|resize((32, 48))", (32, 48)),
        ("decode|resize_small(256)|central_crop(224)", (224, 224)),
        ("decode|inception_crop(160)|flip_lr", (160, 160)),
        ("decode|resize_small(256)", None),
        ("decode|resize(64)|resize(32, key='other')", (64, 64)),
    ],
)
def test_image_size_of_an_op_string(pp, size):
    assert pp_image_size(pp) == size


def test_tokenizer_of_an_op_string():
    assert pp_tokenizer("decode|tokenize(16)") == (16, "minilm")
    assert pp_tokenizer("decode|tokenize(max_len=8, key='caption', out_key='text')") == (
        8,
        "minilm",
    )
    assert pp_tokenizer("decode|resize(4)") is None


def test_a_broken_input_with_an_epoch_length_still_reports_the_optimizer_once_each(data_dir):
    # An epoch length needs a valid input block: the input's problem is reported once (not again
    # as a run-length problem), and the optimizer's own keys are still checked.
    values = base(data_dir)
    values["total_steps"] = None
    values["total_epochs"] = 1.0
    values["input"]["shuffle_buffer"] = -5
    values["optim"]["lr"] = -1.0
    with pytest.raises(ConfigError) as raised:
        validate_config(values)
    assert raised.value.problems == [
        "input.shuffle_buffer=-5: expected an integer >= 0",
        "optim.lr=-1.0: expected a number in (0.0, inf)",
    ]
