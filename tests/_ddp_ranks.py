"""One rank of the 2-process gloo DDP checks in tests/test_elastic.py (run by the test, not collected):

    RANK=0 WORLD_SIZE=2 MASTER_PORT=29555 python tests/_ddp_ranks.py CONFIG.json OUT_DIR

(1) gradient accumulation over an epoch of 5 micro-batches at 2 per step (the last step is a lone micro-batch),
each rank on its own data: writes OUT_DIR/params-RANK.pt; (2) evaluate_splits sharded over the ranks for the model in
CONFIG["model"]: writes OUT_DIR/eval-RANK.json.
"""
import faulthandler
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from flipray.config import config_from_dict
from flipray.pretext.models import SpatialAlignmentNet
from flipray.pretext.train import evaluate_splits, make_optimizer, new_state, train_one_epoch


def main(config_path: str, out: str):
    faulthandler.dump_traceback_later(240, exit=True)  # a hung rank prints every thread's stack and exits
    spec = json.loads(Path(config_path).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    cfg = config_from_dict(spec["cfg"])
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(SpatialAlignmentNet(cfg))
    optimizer = make_optimizer(model, cfg)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data, as DDP shards do
    batches = [{"skipped": 0, "video": torch.randn(2, cfg.data.num_frames, 3, cfg.data.crop, cfg.data.crop,
                                                   generator=g),
                "audio": torch.randn(2, cfg.data.audio_channels, cfg.window_samples, generator=g),  # waveforms
                "label": torch.randint(0, 2, (2,), generator=g).float()} for _ in range(spec["micro_batches"])]
    state = new_state()
    train_one_epoch(model, batches, optimizer, cfg, "cpu", state, world_size=world,
                    accum_steps=cfg.train.batch_size // world // 2)
    torch.save(torch.cat([p.detach().flatten() for p in model.module.parameters()]), Path(out) / f"params-{rank}.pt")
    json.dump({"steps": state["step"]}, open(Path(out) / f"steps-{rank}.json", "w"))

    evaluated = SpatialAlignmentNet(cfg)
    evaluated.load_state_dict(torch.load(spec["model"], weights_only=True))
    result = evaluate_splits(evaluated, cfg, "cpu", rank=rank, world_size=world, batch_size=3)
    (Path(out) / f"eval-{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    # no destroy_process_group: seen to hang in rank 0 (the TCPStore host) once rank 1 had gone, 1 run in 3 on a
    # loaded machine; every result is written, so leave without the teardown
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:])
