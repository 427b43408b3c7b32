"""Speed benchmark for accelerators: ViT-B/16 at 224 px (MAP pooling) and text transformer B on
64 tokens with a 32k vocabulary, embedding 512, bf16 matmuls, global batch 256, AdamW: the
configs/clip_hetxl.py towers at a batch one device holds.

    python -m scripts.benchmark step --config configs/bench_b16.py[:batch=512] [--loss clip|hetxl]
        --matmul-size 8192 --json
    args: loss=clip|hetxl|siglip, samples=16 (HET-XL MC samples), batch=256, scan=False (True:
    layers under nn.scan with full rematerialisation, as pod runs use: less memory, but the
    recomputed forward passes count in step_gflop, which is then no longer the model's),
    tokenizer (spec of the vocabulary the config check reads; default minilm;
    "wordpiece:/path/vocab.txt" on a host without the MiniLM package), attention=flax (the towers'
    attention_impl: flax | xla | cudnn, cuDNN's fused kernel on NVIDIA GPUs)

The benchmark's matmul probe runs in the towers' bf16, so peak_fraction is the model FLOPs
utilisation against the device's measured bf16 matmul speed (with scan=False: no recomputation).
"""

from configs import bench_ti, blocks

IMAGE_SIZE, TEXT_LENGTH = 224, 64


def get_config(arg=None):
    args = blocks.parse_arg(
        arg,
        dict(
            loss="hetxl",
            samples=16,
            batch=256,
            scan=False,
            tokenizer="minilm",
            attention="flax",
        ),
    )
    config = bench_ti.get_config(f"loss={args['loss']},samples={args['samples']}")
    config.input.pp = (
        f"decode|resize({IMAGE_SIZE})|value_range(-1, 1)"
        f"|tokenize(max_len={TEXT_LENGTH}, model={args['tokenizer']!r})"
    )
    config.input.batch_size = args["batch"]
    towers = dict(scan=args["scan"], dtype_mm="bfloat16", attention_impl=args["attention"])
    config.model.image_tower.update(variant="B/16", **towers)
    config.model.text_tower.update(variant="B", max_len=TEXT_LENGTH, **towers)
    config.model.update(embed_dim=512, image_size=IMAGE_SIZE, text_length=TEXT_LENGTH)
    return config
