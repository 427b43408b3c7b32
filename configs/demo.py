"""The demo: contrastive image-text training on Fashion-MNIST on a laptop CPU, then zero-shot.

    python -m scripts.train --config configs/demo.py:loss=hetxl --workdir workdirs/demo
    args: loss=hetxl|clip|siglip, temperature ("" = the loss's usual one, or bounded_log |
    log_scale | fixed: the same for every loss, for matched baselines), epochs=5, batch=256,
    data_dir (the Fashion-MNIST IDX files), label_noise_model=class|image,
    label_noise_confusable=0.0, label_noise_other=0.0 (class), label_noise_rate=0.0 (image),
    label_noise_seed=0 (caption noise on the training images: data/label_noise.py),
    zeroshot_mc=False (also the Monte-Carlo zero-shot metrics of the HET-XL prediction),
    noise_scale_init=0.01 and noise_kernel_scale=0.01 (where HET-XL's noise starts:
    docs/HETXL.md section 7)

Images: the 60k Fashion-MNIST training images (28 px, grey -> RGB); texts: captions built from
templates x synonyms x attributes that never equal a CLIP prompt. Towers: ViT (width 128, 4
blocks, a 16-channel 3x3 convolution before 7 px patches, MAP pooling) and a one-block text
transformer of the same width on MiniLM WordPiece tokens. Zero-shot: the 10k test images against
the 10 class names in CLIP's 80 templates.

Why these sizes: on 2 CPU cores the image tower is what limits zero-shot accuracy (a linear probe
on its embeddings scores what zero-shot does, and the training captions' class embeddings classify
no better than CLIP's prompts), while the text side only has to name 10 classes. One text block
instead of four makes a step ~30% cheaper; the convolution gives the patches local features; the
saved time and a cheaper input pipeline buy a fifth epoch. README, "Two commands", has the
measurements.
"""

from configs import blocks

IMAGE_SIZE, TEXT_LENGTH = 28, 16


def tower(width=128, depth=4) -> dict:
    return dict(width=width, depth=depth, mlp_dim=4 * width, num_heads=width // 64)


def get_config(arg=None):
    args = blocks.parse_arg(
        arg,
        dict(
            loss="hetxl",
            temperature="",
            epochs=5.0,
            batch=256,
            data_dir=blocks.FASHION_MNIST_DIR,
            label_noise_confusable=0.0,
            label_noise_other=0.0,
            label_noise_seed=0,
            label_noise_model="class",
            label_noise_rate=0.0,
            zeroshot_mc=False,
            noise_scale_init=0.01,
            noise_kernel_scale=0.01,
        ),
    )
    data_dir = args["data_dir"]
    temperature, bias_init = blocks.contrastive_temperature(args["loss"], args["temperature"])
    steps_per_epoch = -(
        -60_000 // args["batch"]
    )  # evaluations at whole epochs, the last at the end
    train_input = blocks.fashion_mnist_input(
        "train", args["batch"], IMAGE_SIZE, TEXT_LENGTH, True, data_dir
    )
    # Caption noise on the training images only: zero-shot is scored on the clean test labels.
    train_input["source"].update({k: v for k, v in args.items() if k.startswith("label_noise_")})
    zeroshot = blocks.zeroshot_eval(
        "fashion_mnist",
        blocks.fashion_mnist_input("test", 512, IMAGE_SIZE, TEXT_LENGTH, False, data_dir),
        TEXT_LENGTH,
        every_steps=steps_per_epoch,
    )
    if args["zeroshot_mc"] and args["loss"] == "hetxl":
        zeroshot["monte_carlo"] = True
    return blocks.config_dict(
        task="contrastive",
        seed=0,
        input=train_input,
        model=dict(
            image_tower=dict(
                name="vit", patch_size=(7, 7), stem_channels=(16,), pool_type="map", **tower()
            ),
            text_tower=dict(
                name="text_transformer",
                vocab_size=30522,
                max_len=TEXT_LENGTH,
                pool_type="last",
                **tower(depth=1),
            ),
            embed_dim=128,
            noise=blocks.hetxl_noise(
                args["loss"],
                scale_init=args["noise_scale_init"],
                kernel_scale=args["noise_kernel_scale"],
            ),
            temperature=temperature,
            bias_init=bias_init,
            image_size=IMAGE_SIZE,
            text_length=TEXT_LENGTH,
        ),
        loss=blocks.loss_block(args["loss"]),
        sampling=blocks.sampling(16),
        optim=blocks.adamw(lr=2e-3, weight_decay=1e-4, warmup_fraction=0.08),
        total_epochs=args["epochs"],
        log_every=20,
        evals=dict(zeroshot=zeroshot),
        mesh=dict(data=-1, fsdp=1),
        # A checkpoint per epoch, next to its evaluation: each save costs the CPU a second or two.
        checkpoint=dict(every_steps=steps_per_epoch, keep=2, async_save=True),
        max_nonfinite_in_a_row=10,
        grad_norm_groups=blocks.noise_grad_norms(
            "image_noise_params/.*" if args["loss"] == "hetxl" else None
        ),
    )
