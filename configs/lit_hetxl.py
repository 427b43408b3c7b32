"""LiT with HET-XL: a locked, pretrained big_vision ViT-B/16 and the pretrained MiniLM text encoder.

    python -m scripts.train --config configs/lit_hetxl.py:npz=B_16.npz,files=pairs-*.tfrecord \
        --workdir runs/lit
    args: npz (big_vision ViT-B/16 checkpoint), files (TFRecord glob), batch=16384,
    steps=50000, lock_text=false, imagenet_dir (TFDS data_dir holding imagenet2012 for the
    zero-shot eval; empty: no eval), loss=hetxl|clip|siglip and temperature ("": each loss's
    usual one, or bounded_log | log_scale | fixed for all) for matched baselines

The image tower is frozen (no gradients through it, no optimizer state); the text tower starts
from all-MiniLM-L6-v2 and is fine-tuned unless lock_text; both projections, the HET-XL noise
layers and the temperature train.
"""

from configs import blocks

IMAGE_SIZE, TEXT_LENGTH = 224, 32


def get_config(arg=None):
    args = blocks.parse_arg(
        arg,
        dict(
            npz="B_16.npz",
            files="pairs-*.tfrecord",
            batch=16384,
            steps=50_000,
            lock_text=False,
            imagenet_dir="",
            loss="hetxl",
            temperature="",
        ),
    )
    freeze = ["img/(?!head/).*"] + (["txt/(?!head/).*"] if args["lock_text"] else [])
    temperature, bias_init = blocks.contrastive_temperature(args["loss"], args["temperature"])
    evals = {}
    if args["imagenet_dir"]:
        evals["imagenet_zeroshot"] = blocks.imagenet_zeroshot(
            args["imagenet_dir"], IMAGE_SIZE, TEXT_LENGTH, every_steps=5000
        )
    return blocks.config_dict(
        task="contrastive",
        seed=0,
        input=blocks.caption_records_input(
            args["files"],
            f"resize_small(256)|central_crop({IMAGE_SIZE})",
            TEXT_LENGTH,
            "minilm",
            args["batch"],
            shuffle_buffer=100_000,
        ),
        model=dict(
            image_tower=dict(name="vit", variant="B/16", pool_type="tok"),
            text_tower=dict(name="bert_minilm"),
            embed_dim=512,
            noise=blocks.hetxl_noise(args["loss"], num_factors=16),
            bias_init=bias_init,
            temperature=temperature,
            image_size=IMAGE_SIZE,
            text_length=TEXT_LENGTH,
        ),
        model_init=dict(image=dict(npz=args["npz"]), text="minilm"),
        loss=blocks.loss_block(args["loss"], column_chunk=4096),
        sampling=blocks.sampling(16, chunk=4),
        optim=blocks.adamw(lr=1e-3, weight_decay=1e-4, warmup_steps=5000, freeze=freeze),
        total_steps=args["steps"],
        log_every=100,
        evals=evals,
        mesh=dict(data=-1, fsdp=1),
        checkpoint=dict(every_steps=2000, keep=3, async_save=True),
    )
