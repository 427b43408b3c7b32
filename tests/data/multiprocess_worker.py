"""One process of the two-process input test (tests/data/test_multiprocess.py).

    python -m tests.data.multiprocess_worker PROCESS_ID NUM_PROCESSES PORT FILES BATCHES REPORT

Joins a jax.distributed cluster on 127.0.0.1 (gloo collectives on CPU), reads BATCHES global
batches ("all": one epoch, to the end), and writes one JSON object to the file REPORT (not stdout,
where gloo's C++ output can land in the middle of ours): the example indices this process
supplied, the indices of the whole global batches gathered from all processes, and the
skipped-record counts of this process and of all processes.
"""

from __future__ import annotations

import itertools
import json
import sys

import jax


def main(argv: list[str]) -> None:
    process_id, num_processes, port, files, batches, report_path = argv
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=int(num_processes),
        process_id=int(process_id),
        initialization_timeout=60,
    )
    import numpy as np
    from jax.experimental import multihost_utils

    from data.pipeline import make_global_iterator

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    config = {
        "source": {"name": "tfrecord", "files": files},
        "pp": "decode|resize(8)|value_range(0, 255)|tokenize(max_len=8)",
        "batch_size": 8,
        "shuffle_buffer": 4,
        "seed": 0,
        "prefetch": 1,
    }
    limit = None if batches == "all" else int(batches)
    if limit is None:
        config["num_epochs"] = 1
    iterator = make_global_iterator(config, mesh)
    local, gathered = [], []
    for batch in itertools.islice(iterator, limit):
        image = batch["image"]
        for shard in image.addressable_shards:
            local += np.asarray(shard.data)[:, 0, 0, 0].astype(int).tolist()
        everything = multihost_utils.process_allgather(image, tiled=True)
        gathered += np.asarray(everything)[:, 0, 0, 0].astype(int).tolist()
    report = {
        "process": jax.process_index(),
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "local": local,
        "gathered": gathered,
        "skipped_local": iterator.local_skipped(),
        "skipped_total": iterator.skipped(),
    }
    with open(report_path, "w") as file:
        json.dump(report, file)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
