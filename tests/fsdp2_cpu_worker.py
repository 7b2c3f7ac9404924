"""N gloo processes on CPU sharding a tiny UNet copy as hsd's FSDP strategy does (`hsd.lit.sharded.shard_copy`).

tests/test_sharded.py runs it with 2 and 4 processes to check the premises of sharded full fine-tunes: every rank
holds 1/N of each tensor (DTensors under the unsharded names), the reduce-scattered gradients of N micro-batches
equal the full-batch gradient (also with DMD's pattern: a forward without gradient, then two with), torch's
clip_grad_norm_ sees the whole norm, and a sharded AdamW step keeps the tensors sharded under their names.
Prints one "ok <check>" line per rank and check.

    python tests/fsdp2_cpu_worker.py WORLD PORT
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank: int, world: int, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    from hsd.lit.sharded import is_sharded, shard_copy
    from hsd.models.components import build_components
    torch.manual_seed(0)
    unet = build_components("tiny-sd15").unet.float().requires_grad_(True)
    ref = build_components("tiny-sd15").unet.float().requires_grad_(True)
    ref.load_state_dict(unet.state_dict())
    names = [n for n, _ in ref.named_parameters()]
    shard_copy(unet, init_device_mesh("cpu", (world,)), "32-true")

    def check(ok: bool, what: str) -> None:  # one write per line: the ranks share stdout
        sys.stdout.write(f"{'ok' if ok else 'FAIL'} {what} rank{rank}\n")
        sys.stdout.flush()

    params = dict(unet.named_parameters())
    check(list(params) == names and all(is_sharded(p) for p in params.values()), "dtensors-under-names")
    check(all(p.to_local().numel() <= -(-p.numel() // world) for p in params.values()), "one-nth-per-rank")
    n = 2 * world
    x, e = torch.randn(n, 4, 8, 8), torch.randn(n, 77, 32)
    t = torch.linspace(10, 990, n).long()

    def loss(net, s: slice):
        out = net(x[s], t[s], encoder_hidden_states=e[s]).sample
        return out.pow(2).mean() + net(x[s] * 0.5, t[s], encoder_hidden_states=e[s]).sample.mean()

    mine = slice(2 * rank, 2 * rank + 2)  # each rank its micro-batch, as the data module splits them
    with torch.no_grad():  # DMD draws samples from the copies without gradient between updates
        unet(x[mine], t[mine], encoder_hidden_states=e[mine])
    loss(unet, mine).backward()
    (sum(loss(ref, slice(2 * r, 2 * r + 2)) for r in range(world)) / world).backward()
    scale = max(p.grad.abs().max().item() for p in ref.parameters())
    grads = {k: p.grad.full_tensor() for k, p in params.items()}
    worst = max((grads[k] - q.grad).abs().max().item() for k, q in ref.named_parameters())
    check(worst <= 1e-5 * scale, f"grad-average(worst={worst / scale:.1e}-of-max)")
    norm = torch.nn.utils.clip_grad_norm_(list(params.values()), 1e-3)
    ref_norm = torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 1e-3)
    norm = norm.full_tensor() if is_sharded(norm) else norm
    check(torch.allclose(norm, ref_norm, rtol=1e-5), "clip-norm")
    opt = torch.optim.AdamW(list(params.values()), lr=1e-3)
    opt.step()
    after = dict(unet.named_parameters())
    check(all(after[k] is params[k] and is_sharded(after[k]) for k in names), "step-keeps-shards")
    dist.destroy_process_group()


if __name__ == "__main__":
    world = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    mp.spawn(worker, args=(world, sys.argv[2] if len(sys.argv) > 2 else "29561"), nprocs=world)
