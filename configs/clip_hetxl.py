"""CLIP-style pretraining with HET-XL at pod scale: ViT-B/16 + text transformer B on TFRecords.

    python -m scripts.train --config configs/clip_hetxl.py:files=gs://bucket/pairs-*.tfrecord \
        --workdir gs://bucket/runs/clip_hetxl
    args: files (TFRecord glob from scripts.make_tfrecords), tokenizer (sentencepiece model
    path; default MiniLM WordPiece; the text vocabulary is derived from it), batch=32768,
    steps=100000, samples=16, fsdp=1, imagenet_dir (TFDS data_dir holding imagenet2012 for the
    zero-shot eval; empty: no eval), loss=hetxl|clip|siglip and temperature ("": each loss's
    usual one, or bounded_log | log_scale | fixed for all) for matched baselines, attention=flax
    (the towers' attention_impl; cudnn: cuDNN's fused kernel, on NVIDIA GPUs)

Global batch 32k spread over the mesh's data (and optional FSDP) axes; HET-XL noise on the
image embedding in the 512-d shared space, temperature learned in [0.01, 1] (log-bounded).
"""

from configs import blocks

IMAGE_SIZE, TEXT_LENGTH = 224, 64


def get_config(arg=None):
    args = blocks.parse_arg(
        arg,
        dict(
            files="pairs-*.tfrecord",
            tokenizer="minilm",
            batch=32768,
            steps=100_000,
            samples=16,
            fsdp=1,
            imagenet_dir="",
            loss="hetxl",
            temperature="",
            attention="flax",
        ),
    )
    tokenizer = (
        args["tokenizer"] if args["tokenizer"] == "minilm" else f"sentencepiece:{args['tokenizer']}"
    )
    temperature, bias_init = blocks.contrastive_temperature(args["loss"], args["temperature"])
    evals = {}
    if args["imagenet_dir"]:
        evals["imagenet_zeroshot"] = blocks.imagenet_zeroshot(
            args["imagenet_dir"], IMAGE_SIZE, TEXT_LENGTH, every_steps=5000, tokenizer=tokenizer
        )
    return blocks.config_dict(
        task="contrastive",
        seed=0,
        input=blocks.caption_records_input(
            args["files"],
            f"inception_crop({IMAGE_SIZE})|flip_lr",
            TEXT_LENGTH,
            tokenizer,
            args["batch"],
            shuffle_buffer=250_000,
        ),
        model=dict(
            image_tower=dict(
                name="vit",
                variant="B/16",
                pool_type="map",
                scan=True,
                dtype_mm="bfloat16",
                attention_impl=args["attention"],
            ),
            text_tower=dict(
                name="text_transformer",
                variant="B",
                max_len=TEXT_LENGTH,
                pool_type="last",
                scan=True,
                dtype_mm="bfloat16",
                attention_impl=args["attention"],
            ),
            embed_dim=512,
            noise=blocks.hetxl_noise(args["loss"], num_factors=16),
            bias_init=bias_init,
            temperature=temperature,
            image_size=IMAGE_SIZE,
            text_length=TEXT_LENGTH,
        ),
        loss=blocks.loss_block(args["loss"], column_chunk=4096),
        sampling=blocks.sampling(args["samples"], chunk=4),
        optim=blocks.adamw(lr=1e-3, weight_decay=1e-4, warmup_steps=10_000, schedule="cosine"),
        total_steps=args["steps"],
        log_every=100,
        evals=evals,
        mesh=dict(data=-1, fsdp=args["fsdp"]),
        checkpoint=dict(every_steps=2000, keep=3, async_save=True),
        max_nonfinite_in_a_row=20,
    )
