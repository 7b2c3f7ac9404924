"""SD3 (a flow-matching transformer) end to end on CPU: the real architecture on the meta device, a tiny random
SD3 folder, TSCD -> feedback -> DMD through `hsd train`, LoRA files that diffusers' own StableDiffusion3Pipeline
loads to the same image as `hsd generate`, an exact resume, and the refusals."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dit_common import ROOT, captioned_images, check_ddp_equals_fsdp, check_resume_is_exact, hsd, \
    train_whole_plan
from hsd.config import load_config
from hsd.errors import ConfigError
from hsd.models.dit import DIT_ARCHS, build_dit, load_dit, dit_pipeline



@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_dit("tiny-sd3").save_pretrained(tmp_path_factory.mktemp("sd3") / "model")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return captioned_images(tmp_path_factory.mktemp("images"))


def test_the_real_sd3_architecture():
    """SD3-medium's transformer (2.03 B parameters, 24 joint blocks) built on the meta device from the configs in
    the code; its LoRA default set is PCM's SD3 set (attention q/k/v/out and the image stream's feed-forward)."""
    from diffusers import SD3Transformer2DModel

    from hsd.models.lora import attach_lora
    with torch.device("meta"):
        net = SD3Transformer2DModel(**DIT_ARCHS["sd3"].transformer)
    assert abs(sum(p.numel() for p in net.parameters()) / 1e9 - 2.03) < 0.01
    params = attach_lora(net, 64, 64)
    modules = {n.split(".lora_")[0] for n in params}
    assert len(modules) == 24 * 6 + 1  # 24 blocks x (q, k, v, out, ff in, ff out) + the final proj_out
    assert not any("context" in m or "add_" in m for m in modules)


def test_random_sd3_folder_round_trips(model):
    c, again = build_dit("tiny-sd3"), load_dit(model)
    a, b = c.transformer.state_dict(), again.transformer.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert again.scheduler.config.shift == 3.0 and len(again.text_encoders) == 2
    pipe = dit_pipeline(again)  # diffusers' own pipeline takes the folder's parts without T5
    x = pipe("a cat", num_inference_steps=2, sigmas=[1.0, 0.5], height=16, width=16, output_type="np").images
    assert x.shape == (1, 16, 16, 3)


@pytest.mark.slow
def test_sd3_trains_every_stage_and_diffusers_loads_the_loras(model, images, tmp_path):
    files = train_whole_plan("experiments/tiny/sd3.yaml", model, images, tmp_path)
    # hsd generate at 1/2/4/8 steps with the release's SD3 preset (CFG 3; hsd's file stores its alpha: fused at 1)...
    g = hsd("generate", "--model", str(model), "--lora", str(files[3]), "--preset", "hyper-sd3-4",
            "--steps", "1", "2", "4", "8", "--prompt", "a cat", "--out", str(tmp_path / "png"), cwd=tmp_path)
    assert g.returncode == 0, g.stderr[-3000:]
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert len(pngs) == 4 and all(np.asarray(Image.open(p)).std() > 0 for p in pngs)
    # ...is diffusers' own pipeline with load_lora_weights on hsd's file, image for image.
    from hsd.pipelines import load_generator
    gen = load_generator(str(model), lora=[(str(files[3]), 1.0)], scheduler="euler")  # hsd's file: its own alpha
    pipe = dit_pipeline(load_dit(model))
    pipe.load_lora_weights(str(files[3]))
    pipe.fuse_lora(lora_scale=1.0)
    for steps in (1, 2, 4, 8):
        sigmas = [1 - j / steps for j in range(steps)]
        theirs = pipe("a cat", num_inference_steps=steps, sigmas=sigmas, guidance_scale=3.0, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).images
        ours = gen.pipe(prompt=["a cat"], num_inference_steps=steps, guidance_scale=3.0, output_type="pt",
                        generator=[torch.Generator().manual_seed(0)], **gen._schedule(steps)).images
        assert (ours - theirs).abs().max() <= 1e-4, steps
    png = np.asarray(Image.open(tmp_path / "png" / "p0000_seed0_steps4.png"))
    again = np.asarray(pipe("a cat", num_inference_steps=4, sigmas=[1, 0.75, 0.5, 0.25], guidance_scale=3.0,
                            generator=torch.Generator().manual_seed(0)).images[0])
    assert np.array_equal(png, again)


@pytest.mark.slow
def test_sd3_resume_is_exact(model, images, tmp_path):
    check_resume_is_exact("experiments/tiny/sd3.yaml", model, images, tmp_path)


def test_sd3_refusals(model, images, tmp_path):
    r = hsd("generate", "--model", str(model), "--scheduler", "tcd", "--steps", "1", "--prompt", "a", "--out",
            str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("hsd: error: ") \
        and "flow-matching" in r.stderr and "Traceback" not in r.stderr
    unet_lora = tmp_path / "unet.safetensors"
    from safetensors.torch import save_file
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 32),
               "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(32, 4)}, str(unet_lora))
    r = hsd("generate", "--model", str(model), "--lora", str(unet_lora), "--steps", "1", "--prompt", "a", "--out",
            str(tmp_path / "o2"), cwd=tmp_path)
    assert r.returncode == 2 and "is a LoRA of a unet, but this model's denoiser is a transformer" in r.stderr


@pytest.mark.slow
def test_sd3_two_processes_ddp_and_fsdp_on_cpu_train_the_same_lora(model, images, tmp_path):
    check_ddp_equals_fsdp("experiments/tiny/sd3.yaml", model, images, tmp_path)


def test_a_preset_fuses_the_release_files_at_its_scale_and_hsd_files_at_one(tmp_path):
    """The release's SD3 LoRAs store no alpha (trained at alpha / rank = 0.125, fused at 0.125); hsd's files store
    theirs, which diffusers applies, so the preset's scale would apply it twice."""
    from safetensors.torch import save_file

    from hsd.models.lora_formats import LoraModule, write_lora
    from hsd.pipelines.recipes import PRESETS, preset_weight
    release = tmp_path / "release.safetensors"
    save_file({"transformer.proj_out.lora_A.weight": torch.zeros(4, 8),
               "transformer.proj_out.lora_B.weight": torch.zeros(8, 4)}, str(release))
    module = {"proj_out": LoraModule(torch.zeros(4, 8), torch.zeros(8, 4), 4.0)}
    ours = write_lora(tmp_path / "ours.safetensors", module, prefix="transformer.")
    assert preset_weight(release, PRESETS["hyper-sd3-8"]) == 0.125 and preset_weight(ours, PRESETS["hyper-sd3-8"]) == 1
    assert PRESETS["hyper-sd3-4"]["guidance"] == 3.0 and PRESETS["hyper-sd3-16"]["steps"] == [16]


def test_transformer_lora_files_keep_their_prefix(tmp_path):
    from hsd.models.lora_formats import LoraFormatError, LoraModule, convert_lora, lora_summary, merge_loras, \
        read_lora, write_lora
    m = {"transformer_blocks.0.attn.to_q": LoraModule(torch.randn(4, 8), torch.randn(8, 4), 4.0)}
    dit = write_lora(tmp_path / "dit.safetensors", m, prefix="transformer.")
    unet = write_lora(tmp_path / "unet.safetensors",
                      {"down.to_q": LoraModule(torch.randn(4, 8), torch.randn(8, 4), 4.0)})
    f = read_lora(dit)
    assert f.prefix == "transformer." and torch.equal(f.modules["transformer_blocks.0.attn.to_q"].down,
                                                      m["transformer_blocks.0.attn.to_q"].down)
    assert read_lora(convert_lora(dit, tmp_path / "c.safetensors", "diffusers")).prefix == "transformer."
    merged = read_lora(merge_loras([str(dit), str(dit)], [0.5, 0.5], tmp_path / "m.safetensors", "diffusers"))
    assert merged.prefix == "transformer." and lora_summary(dit)["denoiser"] == "transformer"
    with pytest.raises(LoraFormatError, match="cannot be merged"):
        merge_loras([str(dit), str(unet)], [1.0, 1.0], tmp_path / "x.safetensors", "diffusers")
    with pytest.raises(LoraFormatError, match="kohya layout holds UNet LoRAs only"):
        convert_lora(dit, tmp_path / "k.safetensors", "kohya")


def test_sd3_t5_is_optional_and_conditions_when_loaded(tmp_path):
    """With model.t5 / --t5 the folder's T5 is loaded and its tokens follow CLIP's (77 + 256, the pipeline's
    max_sequence_length); without it the pipeline's text_encoder_3=None path puts zeros there."""
    from hsd.models.conditioning import PipelineText
    path = build_dit("tiny-sd3", t5=True).save_pretrained(tmp_path / "t5")
    with_t5, without = load_dit(path, "sd3", t5=True), load_dit(path, "sd3")
    assert len(with_t5.text_encoders) == 3 and len(without.text_encoders) == 2
    a, b = PipelineText(with_t5)(["a cat"]), PipelineText(without)(["a cat"])
    assert a["encoder_hidden_states"].shape[1] == 77 + 256 and b["encoder_hidden_states"][:, 77:].abs().max() == 0
    assert a["encoder_hidden_states"][:, 77:].abs().max() > 0 and torch.equal(a["pooled_projections"],
                                                                               b["pooled_projections"])
    with pytest.raises(Exception, match="has no text_encoder_3 folder"):
        load_dit(build_dit("tiny-sd3").save_pretrained(tmp_path / "no_t5"), "sd3", t5=True)
    with pytest.raises(ConfigError, match="model.t5: SD3's optional T5 encoder"):
        load_config([str(ROOT / "experiments/tiny/flux.yaml")], ["model.path=x", "data.folder=y", "model.t5=true"])


@pytest.mark.slow
def test_sd3_trained_with_t5_generates_as_diffusers_with_t5(images, tmp_path):
    """A LoRA trained with model.t5=true, sampled by `hsd generate --t5`, equals diffusers' own pipeline loaded
    from the folder (which reads its T5) with load_lora_weights on hsd's file."""
    from diffusers import StableDiffusion3Pipeline

    from hsd.pipelines import load_generator
    model = build_dit("tiny-sd3", t5=True).save_pretrained(tmp_path / "model")
    r = hsd("train", str(ROOT / "experiments/tiny/sd3.yaml"), f"model.path={model}", f"data.folder={images}",
            f"out_dir={tmp_path}", "name=run", "model.t5=true", "dmd.iterations=0",
            "tscd.stages=[{k: 2, grid_steps: 8, iterations: 2}]", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lora = tmp_path / "run" / "lora_stage0_k2.safetensors"
    gen = load_generator(str(model), lora=[(str(lora), 1.0)], scheduler="euler", t5=True)
    pipe = StableDiffusion3Pipeline.from_pretrained(model, local_files_only=True)
    assert pipe.text_encoder_3 is not None
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(lora_scale=1.0)
    kw = dict(num_inference_steps=2, guidance_scale=3.0, output_type="pt")
    theirs = pipe("a cat", sigmas=[1.0, 0.5], generator=torch.Generator().manual_seed(0), **kw).images
    ours = gen.pipe(prompt=["a cat"], generator=[torch.Generator().manual_seed(0)], **kw, **gen._schedule(2)).images
    assert (ours - theirs).abs().max() <= 1e-4
    r = hsd("generate", "--model", str(model), "--t5", "--lora", str(lora), "--steps",
            "2", "--prompt", "a cat", "--out", str(tmp_path / "png"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
