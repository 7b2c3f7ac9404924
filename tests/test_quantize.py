"""The quantized frozen base (model.quantize, hsd.models.quantize; issue 23): torchao int8 / fp8 / NF4 weight-only
under a peft LoRA, on CPU. Every mode quantizes the Linear weights to its size, a LoRA trains on top and the adapters
off are the quantized base exactly; a tiny SD1.5 (with the adversarial term) and a tiny FLUX (TSCD, feedback, DMD)
train end to end on a quantized base, and their LoRA files load onto the unquantized base; one process only."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dit_common import ROOT, captioned_images, hsd, train_whole_plan
from hsd.config import load_config
from hsd.errors import ConfigError
from hsd.models.adapters import TSCD, Adapters
from hsd.models.dit import build_dit, load_dit
from hsd.models.lora import load_lora_adapter, plain_unet, save_lora
from hsd.models.quantize import dense, is_quantized, quantize_frozen, quantized_bytes, tensor_bytes

# bytes after / before for float32 weights: values (1, 1, 1/2 byte) and their scales (one per row of 32 here)
SHRINK = {"int8": 0.3, "fp8": 0.3, "nf4": 0.2}


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> Path:
    return build_dit("tiny-flux").save_pretrained(tmp_path_factory.mktemp("flux") / "model")


def _call(net, x, t, cond):
    from hsd.models.denoisers import denoiser_out
    return denoiser_out(net, x, t, cond)


def _inputs(net):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 4, 4, generator=g)
    cond = {"encoder_hidden_states": torch.randn(2, 5, 32, generator=g), "pooled_projections": torch.randn(
        2, 32, generator=g), "guidance": torch.full((2,), 3.5)}
    return x, torch.tensor([500.0, 900.0]), cond


@pytest.mark.parametrize("mode", ["int8", "fp8", "nf4"])
def test_each_mode_quantizes_the_linears_and_a_lora_trains_on_top(flux, mode):
    net = load_dit(flux).transformer
    x, t, cond = _inputs(net)
    with torch.no_grad():
        ref = _call(net, x, t, cond)
    held = quantize_frozen(net, mode)
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert held.layers == held.linear_layers == len(linears) and all(is_quantized(m.weight) for m in linears)
    assert held.params == held.linear_params == sum(m.weight.numel() for m in linears)
    assert held.bytes_after < SHRINK[mode] * held.bytes_before
    assert f"quantized to {mode}" in held.line()
    with torch.no_grad():
        base = _call(net, x, t, cond)
    assert 0 < (base - ref).abs().max() < 0.2 * ref.abs().max()  # quantized, not broken
    adapters = Adapters(net)
    params = adapters.attach(TSCD, 4, 4.0, ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "proj_out"])
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    target = base.detach() + 0.1
    losses = []
    for _ in range(8):
        loss = (_call(net, x, t, cond) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]  # the gradient reaches the LoRA through the quantized layers
    assert not any(p.requires_grad for n, p in net.named_parameters() if "lora_" not in n)
    with torch.no_grad(), adapters.off():
        assert torch.equal(_call(net, x, t, cond), base)  # the teacher: the quantized base exactly
        plain = plain_unet(net)  # a dense copy (feedback merges, DMD's full copies): dequantized values
        assert not any(is_quantized(p) for p in plain.parameters())
        assert (_call(plain, x, t, cond) - base).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["int8", "fp8", "nf4"])
@pytest.mark.parametrize("shape", [(384, 256), (64, 3), (7, 5), (3072, 64)])
def test_the_memory_models_bytes_are_torchaos(mode, dtype, shape):
    layer = torch.nn.Linear(shape[1], shape[0]).to(dtype)
    quantize_frozen(torch.nn.Sequential(layer), mode)
    assert quantized_bytes(shape, dtype.itemsize, mode) == tensor_bytes(layer.weight)


def test_dense_is_identity_on_plain_tensors():
    w = torch.randn(4, 4)
    assert dense(w) is w and not is_quantized(w)


def test_an_nf4_layer_needs_whole_blocks():
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 3))  # 192 weights: 3 blocks of 64
    odd = torch.nn.Linear(5, 7)
    held = quantize_frozen(torch.nn.Sequential(net, odd), "nf4")
    assert (held.layers, held.linear_layers) == (2, 3) and not is_quantized(odd.weight)


def test_tiny_sd15_trains_on_an_int8_base_and_its_lora_loads_on_the_plain_one(tmp_path):
    from hsd.models.components import build_components, load_components
    model = build_components("tiny-sd15").save_pretrained(tmp_path / "model")
    (tmp_path / "images").mkdir()
    images = captioned_images(tmp_path / "images")
    files = {}
    for mode in ("none", "int8"):
        r = hsd("train", str(ROOT / "experiments/tiny/sd15.yaml"), f"model.path={model}", f"data.folder={images}",
                f"out_dir={tmp_path}", f"name={mode}", f"model.quantize={mode}", cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        assert ("frozen base quantized to int8" in r.stderr) == (mode == "int8")
        files[mode] = tmp_path / mode / "lora_stage3_k1.safetensors"  # the adversarial stages ran on it too
    a, b = load_file(files["none"]), load_file(files["int8"])
    assert a.keys() == b.keys()
    up = [k for k in a if "lora_B" in k]
    assert all(b[k].abs().sum() > 0 for k in up) and any(not torch.equal(a[k], b[k]) for k in up)
    plain = load_components(model).unet
    load_lora_adapter(plain, files["int8"])  # the release layout, onto an unquantized base
    assert not any(is_quantized(p) for p in plain.parameters())


def test_tiny_flux_trains_every_stage_on_an_nf4_base(flux, tmp_path):
    (tmp_path / "images").mkdir()
    images = captioned_images(tmp_path / "images")
    err = []
    files = train_whole_plan("experiments/tiny/flux.yaml", flux, images, tmp_path, "model.quantize=nf4",
                             stderr=err)
    assert "frozen base quantized to nf4" in err[0]
    plain = load_dit(flux).transformer
    for f in (files[3], files[-1]):  # the last TSCD stage and the DMD-trained unified LoRA
        load_lora_adapter(plain, f, adapter_name=f.stem)
    save_lora(tmp_path / "again.safetensors", plain, adapter=files[-1].stem)
    again, made = load_file(tmp_path / "again.safetensors"), load_file(files[-1])
    assert again.keys() == made.keys() and all(torch.allclose(again[k], made[k]) for k in made)


@pytest.mark.parametrize("overrides", [["trainer.strategy=fsdp"], ["trainer.devices=2"],
                                       ["trainer.strategy=ddp", "trainer.num_nodes=2"]])
def test_a_quantized_base_is_for_one_process(overrides):
    with pytest.raises(ConfigError, match=r"model.quantize=int8 is for one process .*model.quantize=none to use FSDP"):
        load_config([str(ROOT / "experiments/lab/tscd.yaml")], ["model.quantize=int8", *overrides])
