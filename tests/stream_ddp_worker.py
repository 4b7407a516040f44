"""Run by tests/test_stream.py under torchrun (2 gloo processes): each rank streams one epoch of a photo
folder (files) and of its shards, and rank 0 writes what every rank read.

    torchrun --standalone --nproc_per_node=2 tests/stream_ddp_worker.py PHOTOS SHARDS OUT.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from imclass.data.folder import folder_decoder, folder_images
from imclass.data.source import open_images
from imclass.data.shards import ShardSource
from imclass.train import distributed


def main() -> None:
    photos, shard_dir, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    with distributed.session("cpu"):
        rank, world = distributed.rank(), distributed.world_size()
        files = open_images(folder_images(photos, "train"), folder_decoder((32, 32)), "stream", workers=1,
                            verbose=False)
        loader = files.loader(16, seed=7, rank=rank, world_size=world)
        read_files = [i for idx, _, _ in loader.indexed_batches(0) for i in idx.tolist()]
        shard_loader = ShardSource(shard_dir, "train", workers=2).loader(8, seed=7, rank=rank, world_size=world)
        read_shards = [k for keys, _, _ in shard_loader.indexed_batches(0) for k in keys.tolist()]
        seen = distributed.all_gather_objects({"files": read_files, "shards": read_shards,
                                               "steps": [len(loader), len(shard_loader)]})
        if distributed.is_main():
            out.write_text(json.dumps({key: [s[key] for s in seen] for key in ("files", "shards", "steps")}))


if __name__ == "__main__":
    main()
