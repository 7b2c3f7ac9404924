"""`hsd generate --controlnet` on tiny random-weight SD1.5 / SDXL folders: the control image guides the image,
under every recipe and a fused LoRA; its settings reach the PNGs; bad inputs give one line."""
import json

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image
from test_generate import _make_model, _pixels

from hsd.cli import main
from hsd.models.components import load_components, pipeline
from hsd.pipelines import GenerateError, load_generator
from hsd.pipelines.controlnet import controlnet_pipeline

FAMILIES = ["tiny-sd15", "tiny-sdxl"]


@pytest.fixture(scope="module", autouse=True)
def _threads():
    """One thread, as in test_generate: tiny models gain nothing from more, and a shared CPU makes them spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _make_controlnet(unet, path, seed=2):
    """A ControlNet of this UNet whose output is not zero: a fresh one's zero convolutions would make every control
    image give the same picture. Its image encoder downsamples by 2, the tiny VAE's factor (real ones: 8)."""
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    torch.manual_seed(seed)
    zero_convs = [controlnet.controlnet_cond_embedding.conv_out, *controlnet.controlnet_down_blocks,
                  controlnet.controlnet_mid_block]
    for conv in zero_convs:
        torch.nn.init.normal_(conv.weight, std=0.3)
    controlnet.save_pretrained(path)
    return path


def _control_images(root):
    """Two different control images, neither RGB nor the output size: the generator converts and resizes them."""
    y, x = np.mgrid[0:20, 0:28]
    edges = Image.fromarray(((x // 4 + y // 4) % 2 * 255).astype(np.uint8), mode="L")   # grayscale checkerboard
    ramp = Image.fromarray(np.stack([x * 9, y * 12, 255 - x * 9, 255 + 0 * x], -1).astype(np.uint8), mode="RGBA")
    edges.save(root / "edges.png")
    ramp.save(root / "ramp.png")
    return root / "edges.png", root / "ramp.png"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for name in FAMILIES:
        root = tmp_path_factory.mktemp(name)
        m = _make_model(name, root)
        m.controlnet = _make_controlnet(load_components(m.folder).unet, root / "controlnet")
        m.control_a, m.control_b = _control_images(root)
        out[name] = m
    return out


@pytest.fixture(params=FAMILIES)
def model(request, models):
    return models[request.param]


def test_control_image_guides_the_image(model):
    gen = load_generator(model.folder, lora=[(model.lora, 1.0)], scheduler="tcd", controlnet=model.controlnet)
    seen = []   # the control image as the ControlNet receives it
    gen.pipe.controlnet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["controlnet_cond"].shape),
                                                  with_kwargs=True)
    a = gen.generate(["a red cube"], 2, [3], height=16, width=24, control_image=model.control_a)
    b = gen.generate(["a red cube"], 2, [3], height=16, width=24, control_image=model.control_b)
    assert [im.size for im in a + b] == [(24, 16)] * 2
    assert set(seen) == {(1, 3, 16, 24)}                                   # RGB, at the output size
    assert not np.array_equal(_pixels(a), _pixels(b))                      # same seed, other control image
    meta = a[0].info["hsd"]
    assert (meta["controlnet"], meta["control_image"], meta["control_scale"]) == (
        str(model.controlnet), str(model.control_a), 1.0)
    assert meta["lora"] == [{"path": str(model.lora), "weight": 1.0}]

    # Scale 0 adds zero residuals: exactly the plain model with the same LoRA, which differs from no LoRA.
    off = gen.generate(["a red cube"], 2, [3], height=16, width=24, control_image=model.control_a, control_scale=0)
    plain = load_generator(model.folder, lora=[(model.lora, 1.0)], scheduler="tcd")
    no_lora = load_generator(model.folder, scheduler="tcd")
    assert np.array_equal(_pixels(off), _pixels(plain.generate(["a red cube"], 2, [3], height=16, width=24)))
    assert not np.array_equal(_pixels(off), _pixels(no_lora.generate(["a red cube"], 2, [3], height=16, width=24)))


def test_controlnet_pipeline_reuses_the_modules(models):
    base = pipeline(load_components(models["tiny-sdxl"].folder))
    both = controlnet_pipeline(base, ControlNetModel.from_pretrained(models["tiny-sdxl"].controlnet))
    shared = {k: v for k, v in base.components.items() if v is not None}
    assert type(both).__name__ == "StableDiffusionXLControlNetPipeline" and len(shared) == 7
    assert all(both.components[k] is v for k, v in shared.items())


@pytest.mark.parametrize("scheduler,extra", [
    ("ddim", ["--steps", "1", "2"]),
    ("lcm", ["--steps", "1", "--unet", "UNET"]),
    ("default", ["--steps", "2", "--guidance", "5", "--negative-prompt", "blurry, low quality"])])
def test_cli_writes_controlled_pngs(model, scheduler, extra, tmp_path):
    extra = [str(model.unet_dir) if e == "UNET" else e for e in extra]
    lora = [] if scheduler == "lcm" else ["--lora", f"{model.lora}:0.8"]
    main(["generate", "--model", str(model.folder), "--scheduler", scheduler, *lora, *extra,
          "--prompt", "a red cube", "--seed", "4", "--n-per-prompt", "2", "--controlnet", str(model.controlnet),
          "--control-image", str(model.control_b), "--control-scale", "0.7", "--height", "24", "--out",
          str(tmp_path / "out")])
    steps = extra[extra.index("--steps") + 1:][:2 if scheduler == "ddim" else 1]
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == sorted(f"p0000_seed{s}_steps{n}.png" for s in (4, 5) for n in steps)
    image = Image.open(tmp_path / "out" / names[-1])
    assert image.size == (16, 24)                                          # width native, height as asked
    meta = json.loads(image.text["hsd"])
    assert (meta["controlnet"], meta["control_image"], meta["control_scale"]) == (
        str(model.controlnet), str(model.control_b), 0.7)
    assert image.text["controlnet"] == str(model.controlnet) and image.text["control_image"] == str(model.control_b)
    assert meta["scheduler"] == scheduler and meta["unet"] == (str(model.unet_dir) if scheduler == "lcm" else None)
    assert meta["negative_prompt"] == ("blurry, low quality" if scheduler == "default" else None)


def _one_line_error(capsys, argv, message):
    with pytest.raises(SystemExit, match=message) as e:
        main(["generate", *argv, "--prompt", "a", "--steps", "1", "--out", "o"])
    assert e.value.code == 2 and "\n" not in str(e.value)
    assert capsys.readouterr().err.strip().splitlines()[-1] == str(e.value)


def test_errors_name_their_cause(models, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)           # a case that wrongly ran would write its --out folder there
    sd15, sdxl = models["tiny-sd15"], models["tiny-sdxl"]
    (tmp_path / "text.png").write_text("not an image")
    png = sd15.control_b.read_bytes()
    (tmp_path / "cut.png").write_bytes(png[:len(png) // 2])                # header intact, pixels cut short
    cn, img = ["--controlnet", str(sd15.controlnet)], ["--control-image", str(sd15.control_a)]
    model = ["--model", str(sd15.folder)]
    for argv, message in [
        ([*model, *img], "--control-image needs --controlnet DIR: a diffusers ControlNetModel folder"),
        ([*model, *cn], "--controlnet needs --control-image FILE: .*image file"),
        ([*model, "--control-scale", "0.5"], "--control-scale needs --controlnet"),
        ([*model, *cn, "--control-image", str(tmp_path / "none.png")], "control image not found: .*none.png"),
        ([*model, *cn, "--control-image", str(tmp_path / "text.png")],
         "cannot read the control image .*text.png .*UnidentifiedImageError.*expected an image file"),
        ([*model, *cn, "--control-image", str(tmp_path / "cut.png")],
         "cannot read the control image .*cut.png .*truncated"),
        ([*model, *img, "--controlnet", str(tmp_path / "nowhere")],
         "ControlNet .*nowhere not found: expected a diffusers ControlNetModel folder"),
        ([*model, *img, "--controlnet", str(sd15.control_a)], "ControlNet .*edges.png is not a folder"),
        ([*model, *img, "--controlnet", str(sd15.unet_dir)], "holds a UNet2DConditionModel, not a ControlNetModel"),
        (["--model", str(sdxl.folder), *img, *cn],
         "is an SD1.5 ControlNet \\(cross_attention_dim=32, addition_embed_type=None\\) but this SDXL model's UNet "
         "has cross_attention_dim=64, addition_embed_type=text_time"),
        ([*model, *img, "--controlnet", str(sdxl.controlnet)], "is an SDXL ControlNet .* this SD1.5 model's UNet"),
    ]:
        _one_line_error(capsys, argv, message)

    gen = load_generator(sd15.folder, controlnet=sd15.controlnet)
    with pytest.raises(GenerateError, match="needs a control image"):
        gen.generate(["a"], 1, [0])
    with pytest.raises(GenerateError, match="a control image needs a ControlNet"):
        load_generator(sd15.folder).generate(["a"], 1, [0], control_image=sd15.control_a)
