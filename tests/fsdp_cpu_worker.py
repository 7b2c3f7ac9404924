"""Two gloo processes on CPU running torch FSDP with hsd's settings (`hsd.lit.strategies.fsdp_kwargs`) on a tiny UNet.

Lightning refuses FSDP on a CPU accelerator, so tests/test_sd.py runs this to check the premises the FSDP
strategy rests on: the sharded UNet computes what the unsharded one does, the ignored LoRA tensors stay
whole, the EMA target via functional_call sees them, exported LoRA names carry no wrapper segments, and the all-reduced LoRA gradients equal the full-batch
gradient. Prints one "ok <check>" line per rank and check.
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank: int, world: int, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.func import functional_call

    from hsd.lit.strategies import fsdp_kwargs
    from hsd.models.components import build_components
    from hsd.models.lora import attach_lora, lora_params, unet_lora
    torch.manual_seed(0)
    unet = build_components("tiny-sd15").unet
    attach_lora(unet, 4, 4)
    for p in lora_params(unet).values():
        torch.nn.init.normal_(p, std=0.1)
    x, t, e = torch.randn(4, 4, 8, 8), torch.tensor([10, 200, 500, 900]), torch.randn(4, 77, 32)
    full = unet(x, t, encoder_hidden_states=e).sample
    full.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in lora_params(unet).items()}
    unet.zero_grad(set_to_none=True)
    ema = {n: p.detach() * 0.5 for n, p in lora_params(unet).items()}
    with torch.no_grad():
        ema_ref = functional_call(unet, ema, (x, t), {"encoder_hidden_states": e}, strict=False).sample

    lora, names = list(lora_params(unet).values()), set(unet_lora(unet))
    sharded = FSDP(unet, device_id=torch.device("cpu"), **fsdp_kwargs(lora))
    def check(ok: bool, what: str) -> None:  # one write per line: the two ranks share stdout
        sys.stdout.write(f"{'ok' if ok else 'FAIL'} {what} rank{rank}\n")
        sys.stdout.flush()

    with torch.no_grad():
        check(torch.allclose(sharded(x, t, encoder_hidden_states=e).sample, full, atol=1e-5), "forward")
        target = functional_call(sharded, ema, (x, t), {"encoder_hidden_states": e}, strict=False).sample
        check(torch.allclose(target, ema_ref, atol=1e-5), "ema-target")
    check(all(p.shape == grads[n].shape for n, p in lora_params(unet).items()), "lora-whole")
    check(set(unet_lora(unet)) == names, "export-names")  # what save_lora writes: no FSDP wrapper segments
    part = slice(2 * rank, 2 * rank + 2)  # each rank its half of the batch, as the data module splits it
    out = sharded(x[part], t[part], encoder_hidden_states=e[part]).sample
    (out.pow(2).mean()).backward()
    for p in lora:  # what TSCDModule._step does under FSDP
        dist.all_reduce(p.grad)
        p.grad /= world
    check(all(torch.allclose(p.grad, grads[n], atol=1e-6) for n, p in lora_params(unet).items()), "grad-average")
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(2, sys.argv[1] if len(sys.argv) > 1 else "29533"), nprocs=2)
