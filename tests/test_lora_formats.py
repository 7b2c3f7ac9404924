"""LoRA files: diffusers/kohya round trips, diffusers' own loaders, the released Hyper-SD layout, merge/fuse, CLI."""
import argparse
import json
import warnings

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from peft import LoraConfig
from safetensors.torch import load_file, save, save_file

from hsd.lora_cli import add_lora_commands
from hsd.models.components import ARCHS
from hsd.models.lora import (
    LoraFormatError,
    attach_lora,
    fuse_loras,
    load_lora,
    load_lora_adapter,
    lora_params,
    save_lora,
    unet_lora,
)
from hsd.models.lora_formats import convert_lora, lora_summary, merge_loras, read_lora

# Hyper-SD's target modules (those of diffusers' LCM-LoRA scripts); with these, rank 64, fp32 and an alpha per
# module, the safetensors sizes equal the released files' byte for byte (test_hyper_sd_layout_...).
HYPER_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                 "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
# The real SD1.5 and SDXL UNet architectures (their public configs).
SD15, SDXL = ARCHS["sd15"].unet, ARCHS["sdxl"].unet
# Byte sizes of the released files (huggingface.co/ByteDance/Hyper-SD commits 123f4ee, 2900d27, discussion #33).
HYPER_SD15_BYTES, HYPER_SDXL_BYTES = 269127064, 787359648
TINY = dict(block_out_channels=(32, 64), cross_attention_dim=32, sample_size=8, norm_num_groups=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
TINY_SD15 = dict(TINY, layers_per_block=1, attention_head_dim=8)
TINY_SDXL = dict(TINY, layers_per_block=2, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=80)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny models: on a shared CPU, thread hand-offs cost far more than they save


def tiny_unet(kind: str = "sd15") -> UNet2DConditionModel:
    torch.manual_seed(0)  # every call gives the same base weights
    return UNet2DConditionModel(**(TINY_SD15 if kind == "sd15" else TINY_SDXL)).eval()


def output(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 32, generator=g)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=g),
                                      "time_ids": torch.rand(1, 6, generator=g)}
    with torch.no_grad():
        return unet(x, 10, ctx, **extra).sample


def random_adapter(unet, rank: int, alpha: float, targets=HYPER_TARGETS, name: str = "default"):
    torch.manual_seed(rank)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False), name)
    return unet


def kohya_file(path, unet, rank: int, alpha: float, name=lambda n: n, metadata=None):
    """A file written without hsd code, in the released Hyper-SD layout: kohya keys, fp32, 0-dim alphas."""
    torch.manual_seed(7)
    state = {}
    for n, m in unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(n.endswith("." + t) for t in HYPER_TARGETS):
            base = "lora_unet_" + name(n).replace(".", "_")
            lin = isinstance(m, torch.nn.Linear)
            state[base + ".lora_down.weight"] = torch.randn(rank, m.in_features) if lin else \
                torch.randn(rank, m.in_channels, *m.kernel_size)
            state[base + ".lora_up.weight"] = torch.randn(m.out_features, rank) if lin else \
                torch.randn(m.out_channels, rank, 1, 1)
            state[base + ".alpha"] = torch.tensor(float(alpha))
    save_file(state, path, metadata=metadata)
    return path


def diffusers_loaded(path, kind="sd15") -> torch.Tensor:
    """Output of a UNet given the file by diffusers' own pipeline loader (what users' scripts do)."""
    unet = tiny_unet(kind)
    state, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state, alphas, unet, adapter_name="theirs", metadata=metadata)
    return output(unet)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_diffusers_kohya_round_trip_gives_identical_outputs(kind, tmp_path):
    unet = random_adapter(tiny_unet(kind), rank=4, alpha=8.0)
    ref = output(unet)
    assert not torch.allclose(ref, output(tiny_unet(kind)))  # the LoRA does something
    d = save_lora(tmp_path / "d.safetensors", unet)
    k = save_lora(tmp_path / "k.safetensors", unet, fmt="kohya")
    assert read_lora(d).format == "diffusers" and read_lora(k).format == "kohya"
    assert load_file(k)["lora_unet_mid_block_attentions_0_proj_in.alpha"].item() == 8.0
    k2d = convert_lora(k, tmp_path / "k2d.safetensors", "diffusers")
    for path in (d, k, k2d, convert_lora(k2d, tmp_path / "d2k.safetensors", "kohya")):
        other = tiny_unet(kind)
        load_lora_adapter(other, path)
        torch.testing.assert_close(output(other), ref, rtol=0, atol=0)
    other = tiny_unet(kind)
    attach_lora(other, 4, 1.0, HYPER_TARGETS)  # same rank, another alpha: the file's scale is folded into B
    load_lora(other, k)
    torch.testing.assert_close(output(other), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_diffusers_own_loaders_read_our_files_the_same(kind, tmp_path):
    unet = random_adapter(tiny_unet(kind), rank=4, alpha=8.0)  # alpha != rank: the scale must travel with the file
    ref = output(unet)
    for fmt in ("kohya", "diffusers"):
        path = save_lora(tmp_path / f"{fmt}.safetensors", unet, fmt=fmt)
        torch.testing.assert_close(diffusers_loaded(path, kind), ref)


def safetensors_size(entries: dict[str, tuple[str, list[int], int]], metadata=None) -> int:
    """Bytes of a safetensors file with these (dtype, shape, itemsize) entries: 8 + padded JSON header + data
    (tensors ordered by dtype size, then name)."""
    header, offset = ({"__metadata__": metadata} if metadata else {}), 0
    for key, (dtype, shape, size) in sorted(entries.items(), key=lambda e: (-e[1][2], e[0])):
        n = size * torch.Size(shape).numel()
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    length = len(json.dumps(header, separators=(",", ":")))
    return 8 + length + -length % 8 + offset


def hyper_layout(config: dict, rank: int = 64) -> dict[str, tuple[str, list[int], int]]:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    entries = {}
    for n, m in unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(n.endswith("." + t) for t in HYPER_TARGETS):
            base = "lora_unet_" + n.replace(".", "_")
            lin = isinstance(m, torch.nn.Linear)
            entries[base + ".lora_down.weight"] = ("F32", [rank, m.in_features] if lin else
                                                   [rank, m.in_channels, *m.kernel_size], 4)
            entries[base + ".lora_up.weight"] = ("F32", [m.out_features, rank] if lin else
                                                 [m.out_channels, rank, 1, 1], 4)
            entries[base + ".alpha"] = ("F32", [], 4)
    return entries


def test_hyper_sd_layout_matches_the_released_files_and_real_architectures(tmp_path):
    small = {"a.alpha": ("F32", [], 4), "a.lora_down.weight": ("F16", [2, 3], 2)}
    assert safetensors_size(small, {"format": "pt"}) == len(save(
        {"a.alpha": torch.tensor(1.0), "a.lora_down.weight": torch.zeros(2, 3, dtype=torch.float16)}, {"format": "pt"}))
    sd15, sdxl = hyper_layout(SD15), hyper_layout(SDXL)
    assert (len(sd15) // 3, len(sdxl) // 3) == (278, 788)
    assert safetensors_size(sd15) == HYPER_SD15_BYTES  # 2/4/8-step; the 1-step one adds {"format": "pt"}
    assert safetensors_size(sdxl, {"format": "pt"}) == HYPER_SDXL_BYTES
    for config, entries in ((SD15, sd15), (SDXL, sdxl)):  # every key names a module of the real architecture
        save_file({k: torch.zeros([1] * len(shape)) for k, (_, shape, _) in entries.items()}, tmp_path / "h.st")
        with torch.device("meta"):
            real = dict(UNet2DConditionModel(**config).named_modules())
        names = read_lora(tmp_path / "h.st").modules
        assert all(isinstance(real.get(n), (torch.nn.Linear, torch.nn.Conv2d)) for n in names)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_released_layout_loads_like_diffusers_and_trains(kind, tmp_path):
    path = kohya_file(tmp_path / "hyper.safetensors", tiny_unet(kind), rank=8, alpha=4.0, metadata={"format": "pt"})
    unet = tiny_unet(kind)
    params = load_lora_adapter(unet, path)
    torch.testing.assert_close(output(unet), diffusers_loaded(path, kind))
    assert params and params.keys() == lora_params(unet).keys() and all(p.requires_grad for p in params.values())
    assert all(not p.requires_grad for n, p in unet.named_parameters() if "lora_" not in n)
    assert {m.rank for m in unet_lora(unet).values()} == {8}


def sgm_name(name: str) -> str:
    """diffusers module path -> the SGM/LDM name sd-scripts writes for SDXL-shaped UNets (2 resnets per level)."""
    p = name.split(".")
    if p[2] == "downsamplers":
        return f"input_blocks.{3 * int(p[1]) + 3}.0.op"
    if p[2] == "upsamplers":
        return f"output_blocks.{3 * int(p[1]) + 2}.2.conv"
    if p[0] == "mid_block":
        head, rest = f"middle_block.{ {'resnets.0': 0, 'attentions.0': 1, 'resnets.1': 2}[p[1] + '.' + p[2]] }", p[3:]
    else:
        down = p[0] == "down_blocks"
        head = f"{'input' if down else 'output'}_blocks.{3 * int(p[1]) + int(p[3]) + down}.{int(p[2] == 'attentions')}"
        rest = p[4:]
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}
    return f"{head}.{resnet.get('.'.join(rest), '.'.join(rest))}"


def test_kohya_sgm_block_names_decode_to_the_same_modules(tmp_path):
    unet = tiny_unet("sdxl")
    ours = read_lora(kohya_file(tmp_path / "d.safetensors", unet, 4, 2.0), unet.config).modules
    sgm = read_lora(kohya_file(tmp_path / "s.safetensors", unet, 4, 2.0, name=sgm_name), unet.config).modules
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_down.weight" in load_file(
        tmp_path / "s.safetensors")
    assert sgm.keys() == ours.keys() and all(torch.equal(sgm[n].up, ours[n].up) for n in ours)


@pytest.fixture(scope="module")
def two_loras(tmp_path_factory):
    """Files of different layouts, ranks, alphas and modules, and the UNet output with both at weights 0.7, -0.4."""
    d = tmp_path_factory.mktemp("loras")
    a = save_lora(d / "a.safetensors", random_adapter(tiny_unet(), 4, 8.0), fmt="kohya")
    b = save_lora(d / "b.safetensors", random_adapter(tiny_unet(), 2, 1.0, ATTENTION))
    unet = tiny_unet()
    load_lora_adapter(unet, a, "a")
    with warnings.catch_warnings():  # peft notes the model then has two adapters, which is the point here
        warnings.filterwarnings("ignore", "Already found a `peft_config`")
        load_lora_adapter(unet, b, "b")
    unet.set_adapters(["a", "b"], weights=[0.7, -0.4])
    return a, b, output(unet)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_merge_is_exact(fmt, two_loras, tmp_path):
    a, b, ref = two_loras
    merged = read_lora(merge_loras([a, b], [0.7, -0.4], tmp_path / "m.safetensors", fmt))
    assert {(m.rank, m.alpha) for m in merged.modules.values()} == {(6, 6.0)}  # one rank and alpha: any reader
    la, lb = read_lora(a).modules, read_lora(b).modules
    for name, m in merged.modules.items():
        want = 0.7 * la[name].delta() + (-0.4 * lb[name].delta() if name in lb else 0)
        torch.testing.assert_close(m.delta(), want, rtol=0, atol=1e-5)
    unet = tiny_unet()
    load_lora_adapter(unet, merged.path)
    torch.testing.assert_close(output(unet), ref, rtol=0, atol=1e-5)
    if fmt == "kohya":
        torch.testing.assert_close(diffusers_loaded(merged.path), ref, rtol=0, atol=1e-5)


def test_fuse_is_exact_and_saves_a_plain_unet(two_loras, tmp_path):
    a, b, ref = two_loras
    unet = tiny_unet()
    fuse_loras(unet, [a, b], [0.7, -0.4])
    torch.testing.assert_close(output(unet), ref, rtol=0, atol=1e-5)
    unet.save_pretrained(tmp_path / "fused")
    torch.testing.assert_close(output(UNet2DConditionModel.from_pretrained(tmp_path / "fused")), ref, rtol=0, atol=1e-5)


def run_cli(*argv: str):
    parser = argparse.ArgumentParser()
    add_lora_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.fn(args)


def test_cli_merge_fuse_convert_info(two_loras, tmp_path, capsys):
    a, b, ref = two_loras
    run_cli("lora", "merge", f"{a}:0.7", f"{b}:-0.4", "--out", str(tmp_path / "m.safetensors"))
    assert read_lora(tmp_path / "m.safetensors").format == "kohya"
    tiny_unet().save_pretrained(tmp_path / "pipe" / "unet")  # a pipeline folder
    run_cli("lora", "merge", f"{a}:0.7", f"{b}:-0.4", "--unet", str(tmp_path / "pipe"), "--out", str(tmp_path / "f"))
    torch.testing.assert_close(output(UNet2DConditionModel.from_pretrained(tmp_path / "f")), ref, rtol=0, atol=1e-5)
    run_cli("lora", "convert", str(a), "--out", str(tmp_path / "a.safetensors"), "--format", "diffusers")
    capsys.readouterr()
    run_cli("lora", "info", str(tmp_path / "a.safetensors"))
    info = capsys.readouterr().out
    assert "format: diffusers" in info and "rank: 4" in info and "alpha: 8" in info
    assert f"modules: {len(read_lora(a).modules)}" in info and "diffusers-lora" in info
    assert lora_summary(b)["ranks"] == [2]


def test_bad_files_are_named(two_loras, tmp_path):
    a, _, _ = two_loras
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(1)}, tmp_path / "ckpt.safetensors")
    with pytest.raises(LoraFormatError, match=r"ckpt\.safetensors.*unet\.<module>\.lora_A\.weight.*"
                                              r"lora_unet_<module>\.lora_down\.weight"):
        read_lora(tmp_path / "ckpt.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoraFormatError, match=r"junk\.safetensors"):
        read_lora(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors"):
        read_lora(tmp_path / "missing.safetensors")
    unet = tiny_unet()
    attach_lora(unet, 2, 2.0, HYPER_TARGETS)
    with pytest.raises(LoraFormatError, match=r"a\.safetensors has rank 4 .* has rank 2"):
        load_lora(unet, a)
    save_file({"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 32),
               "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 2)},
              tmp_path / "other.safetensors")
    for load in (load_lora_adapter, load_lora):
        with pytest.raises(LoraFormatError, match=r"other\.safetensors.*down_blocks\.7\.attentions\.0\.proj_in"):
            load(unet, tmp_path / "other.safetensors")
    with pytest.raises(LoraFormatError, match=r"other\.safetensors.*down_blocks\.7"):
        fuse_loras(tiny_unet(), [tmp_path / "other.safetensors"], [1.0])
