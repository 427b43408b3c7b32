"""Contrastive pretraining on your own image-caption TFRecords (from scripts.make_tfrecords).

    python -m scripts.train --config configs/pretrain.py:files=data/pairs-*.tfrecord \
        --workdir runs/mine

Defaults suit a laptop: a small ViT (width 128, 4 blocks, 8 px patches) on 64 px images, a text
transformer of the same size, batch 256, 200 steps with a 5% warmup, HET-XL. Everything scales
by args, e.g. for a pod slice:

    configs/pretrain.py:files=gs://b/pairs-*.tfrecord,variant=B/16,image=224,batch=32768,steps=100000

args:
  files       TFRecord glob (required)
  tokenizer   minilm (MiniLM's WordPiece vocabulary, the default), wordpiece:/path/vocab.txt,
              sentencepiece:/path/model (e.g. from scripts.train_tokenizer); the text tower's
              vocabulary size is derived from it
  loss        hetxl | clip | siglip; temperature: "" (each loss's usual parameterisation) or
              bounded_log | log_scale | fixed for all (a baseline then differs only in the noise)
  variant     "" (the small towers above) or a ViT size/patch such as S/16, B/16 (the text
              tower then takes the same size)
  image       image side in pixels; text_length: caption tokens
  batch, steps, warmup (fraction of steps), lr, samples (HET-XL MC samples), fsdp
  val_files   held-out TFRecord glob: image<->text retrieval every eval_every steps
  imagenet_dir  TFDS data_dir holding imagenet2012: zero-shot ImageNet every eval_every steps
"""

from configs import blocks
from contrastive.evaluators.inputs import caption_eval_pp, eval_input

SMALL_TOWER = dict(width=128, depth=4, mlp_dim=512, num_heads=2)


def tokenizer_spec(tokenizer: str) -> str:
    """A bare path is taken as a SentencePiece model, the form scripts.train_tokenizer writes."""
    if tokenizer == "minilm" or tokenizer.startswith(("wordpiece:", "sentencepiece:")):
        return tokenizer
    return f"sentencepiece:{tokenizer}"


def get_config(arg=None):
    args = blocks.parse_arg(
        arg,
        dict(
            files="",
            tokenizer="minilm",
            loss="hetxl",
            temperature="",
            variant="",
            image=64,
            text_length=32,
            batch=256,
            steps=200,
            warmup=0.05,
            lr=1e-3,
            samples=16,
            fsdp=1,
            val_files="",
            imagenet_dir="",
            eval_every=100,
        ),
    )
    if not args["files"]:
        raise ValueError(
            "configs/pretrain.py needs files=GLOB (TFRecords from scripts.make_tfrecords), "
            "e.g. --config configs/pretrain.py:files=data/pairs-*.tfrecord"
        )
    tokenizer = tokenizer_spec(args["tokenizer"])
    image, text_length = args["image"], args["text_length"]
    if args["variant"]:
        image_tower = dict(name="vit", variant=args["variant"], pool_type="map")
        text_tower = dict(name="text_transformer", variant=args["variant"].split("/")[0])
    else:
        patch = max(1, image // 8)
        image_tower = dict(name="vit", patch_size=(patch, patch), pool_type="map", **SMALL_TOWER)
        text_tower = dict(name="text_transformer", **SMALL_TOWER)
    text_tower.update(max_len=text_length, pool_type="last")
    temperature, bias_init = blocks.contrastive_temperature(args["loss"], args["temperature"])

    evals = {}
    if args["val_files"]:
        evals["retrieval"] = dict(
            kind="retrieval",
            every_steps=args["eval_every"],
            input=eval_input(
                dict(name="tfrecord", files=args["val_files"]),
                caption_eval_pp(image, text_length, tokenizer),
                batch_size=min(args["batch"], 512),
            ),
        )
    if args["imagenet_dir"]:
        evals["imagenet_zeroshot"] = blocks.imagenet_zeroshot(
            args["imagenet_dir"], image, text_length, args["eval_every"], tokenizer=tokenizer
        )
    return blocks.config_dict(
        task="contrastive",
        seed=0,
        input=blocks.caption_records_input(
            args["files"],
            f"inception_crop({image})|flip_lr",
            text_length,
            tokenizer,
            args["batch"],
            shuffle_buffer=min(250_000, 50 * args["batch"]),
        ),
        # image_size, text_length and the text vocabulary are derived from the op string.
        model=dict(
            image_tower=image_tower,
            text_tower=text_tower,
            embed_dim=256 if not args["variant"] else 512,
            noise=blocks.hetxl_noise(args["loss"]),
            temperature=temperature,
            bias_init=bias_init,
        ),
        loss=blocks.loss_block(args["loss"]),
        sampling=blocks.sampling(args["samples"], chunk=4),
        optim=blocks.adamw(lr=args["lr"], weight_decay=1e-4, warmup_fraction=args["warmup"]),
        total_steps=args["steps"],
        log_every=max(1, min(50, args["steps"] // 20)),
        evals=evals,
        mesh=dict(data=-1, fsdp=args["fsdp"]),
        checkpoint=dict(every_steps=max(1, min(1000, args["steps"] // 5)), keep=3),
        max_nonfinite_in_a_row=20,
    )
