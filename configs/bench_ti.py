"""Speed benchmark shapes: ViT-Ti/16 at 64 px (MAP pooling) and text transformer Ti on 16 tokens
with a 32k vocabulary, embedding 192, global batch 256, AdamW.

    python -m scripts.benchmark step --config configs/bench_ti.py [--loss clip|hetxl] --json
    args: loss=clip|hetxl|siglip, samples=16 (HET-XL MC samples)

The input block describes the shapes only; the benchmark feeds random batches of them.
"""

from configs import blocks

IMAGE_SIZE, TEXT_LENGTH, VOCAB = 64, 16, 32_000


def get_config(arg=None):
    args = blocks.parse_arg(arg, dict(loss="hetxl", samples=16))
    temperature, bias_init = blocks.contrastive_temperature(args["loss"])
    return blocks.config_dict(
        task="contrastive",
        seed=0,
        input=dict(
            source=dict(name="tfrecord", files="unused-*.tfrecord"),
            pp=f"decode|resize({IMAGE_SIZE})|value_range(-1, 1)|tokenize(max_len={TEXT_LENGTH})",
            batch_size=256,
        ),
        model=dict(
            image_tower=dict(name="vit", variant="Ti/16", pool_type="map"),
            text_tower=dict(
                name="text_transformer",
                variant="Ti",
                vocab_size=VOCAB,
                max_len=TEXT_LENGTH,
                pool_type="last",
            ),
            embed_dim=192,
            noise=blocks.hetxl_noise(args["loss"]),
            temperature=temperature,
            bias_init=bias_init,
            image_size=IMAGE_SIZE,
            text_length=TEXT_LENGTH,
        ),
        loss=blocks.loss_block(args["loss"]),
        sampling=blocks.sampling(args["samples"]),
        optim=blocks.adamw(lr=1e-3, weight_decay=1e-4, warmup_steps=0),
        total_steps=1000,
    )
