"""`hsd` killed (SIGKILL, as the OOM killer or a preempted job would) in the middle of writing a checkpoint.

    python tests/kill_mid_save.py file N hsd-args...    the N-th checkpoint file of the run dies half-written
    python tests/kill_mid_save.py folder DIR            a one-process folder checkpoint (hsd.lit.sharded) dies
                                                        half-written at DIR

Either way the process leaves the temp file or folder of that write behind, as a real kill would.
"""
import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace


def die_half_written(f) -> None:
    f.write(b"half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_the_nth_file_save(n: int, argv: list[str]) -> None:
    import torch

    from hsd.cli import main
    save, calls = torch.save, []

    def dying_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            die_half_written(f)
        return save(obj, f, *args, **kwargs)
    torch.save = dying_save
    main(argv)


def kill_a_folder_save(path: Path) -> None:
    import torch
    import torch.distributed.checkpoint as dcp
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from hsd.lit import sharded

    class Module(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(4))

        def trained_tensors(self):
            return {"w": self.w}

    def dying_dcp_save(state, checkpoint_id):
        with open(Path(checkpoint_id) / "__0_0.distcp", "wb") as f:
            die_half_written(f)
    module = Module()
    strategy = SimpleNamespace(is_global_zero=True, broadcast=lambda x: x, barrier=lambda *_: None,
                               optimizers=[torch.optim.AdamW(module.parameters())], checkpoint_io=TorchCheckpointIO())
    dcp.save = dying_dcp_save
    sharded.save_sharded(strategy, {"global_step": 1}, module, path)


if __name__ == "__main__":
    if sys.argv[1] == "file":
        kill_the_nth_file_save(int(sys.argv[2]), sys.argv[3:])
    else:
        kill_a_folder_save(Path(sys.argv[2]))
    sys.exit("the write was expected to be killed")
