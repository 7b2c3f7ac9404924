"""FLUX.1 (a guidance-distilled flow-matching transformer) end to end on CPU: the real architecture on the meta device,
a tiny random FLUX folder, the training call equal to FluxPipeline's own (packed latents, ids, sigma time, embedded
guidance, dynamic shift), TSCD -> feedback -> DMD through `hsd train`, LoRA files that diffusers' own FluxPipeline
loads to the same image as `hsd generate`, an exact resume, 2-process DDP and FSDP, and the refusals."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from dit_common import ROOT, captioned_images, check_ddp_equals_fsdp, check_resume_is_exact, hsd, \
    train_whole_plan
from hsd.config import load_config
from hsd.diffusion.schedule import NoiseSchedule, trailing_sigmas
from hsd.diffusion.segments import inference_timesteps
from hsd.diffusion.solvers import guided
from hsd.models.conditioning import PipelineText
from hsd.models.denoisers import denoiser_blocks, denoiser_out
from hsd.models.dit import DIT_ARCHS, build_dit, dit_pipeline, image_tokens, load_dit

TARGETS = load_config([str(ROOT / "experiments/flux/tscd.yaml")], [], inputs=False).lora.targets


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_dit("tiny-flux").save_pretrained(tmp_path_factory.mktemp("flux") / "model")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return captioned_images(tmp_path_factory.mktemp("images"))


def test_the_real_flux_architecture():
    """FLUX.1-dev's transformer (11.9 B parameters: 19 double- and 38 single-stream blocks) and T5-XXL (4.76 B) built
    on the meta device from the configs in the code; the recipe's LoRA set is the image stream's linears."""
    from diffusers import FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from hsd.models.lora import attach_lora
    arch = DIT_ARCHS["flux"]
    with torch.device("meta"):
        net = FluxTransformer2DModel(**arch.transformer)
        t5 = T5EncoderModel(T5Config(**arch.text[1]))
    assert abs(sum(p.numel() for p in net.parameters()) / 1e9 - 11.90) < 0.01
    assert abs(sum(p.numel() for p in t5.parameters()) / 1e9 - 4.76) < 0.01
    assert len(denoiser_blocks(net)) == 19 + 38
    params = attach_lora(net, 64, 64, TARGETS)
    modules = {n.split(".lora_")[0] for n in params}
    assert len(modules) == 19 * 6 + 38 * 5 + 1  # double: q, k, v, out, ff in/out; single: q, k, v, mlp, out; proj_out
    assert not any("context" in m or "add_" in m for m in modules)


def test_random_flux_folder_round_trips(model):
    c, again = build_dit("tiny-flux"), load_dit(model, "flux")
    a, b = c.transformer.state_dict(), again.transformer.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert again.scheduler.config.use_dynamic_shifting and type(again.text_encoders[1]).__name__ == "T5EncoderModel"
    x = dit_pipeline(again)("a cat", num_inference_steps=2, height=16, width=16, output_type="np").images
    assert x.shape == (1, 16, 16, 3)
    with pytest.raises(Exception, match="world sd3 expects a StableDiffusion3Pipeline folder"):
        load_dit(model, "sd3")


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_the_training_call_is_fluxpipelines(model, steps):
    """hsd's k-step Euler on 4-D latents (the schedule's dynamic shift from the token count, `denoiser_out` packing
    the latents with their ids and giving sigma and the guidance) lands where FluxPipeline lands from the same noise,
    with FLUX's default sigmas linspace(1, 1/k, k)."""
    c = load_dit(model, "flux")
    pipe = dit_pipeline(c)
    res = 32  # 16 x 16 latents, 64 tokens: a shift of its own
    sched = NoiseSchedule.from_scheduler(c.scheduler, image_tokens(c.vae, res))
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    theirs = pipe("a cat", num_inference_steps=steps, height=res, width=res, guidance_scale=3.5, output_type="latent",
                  latents=pipe._pack_latents(z, 1, 4, 16, 16)).images
    cond = PipelineText(c, guidance=3.5)(["a cat"])
    ts = inference_timesteps(sched.T, steps).tolist() + [-1]
    assert torch.allclose(sched.lookup(torch.tensor(ts[:-1])).float(),
                          torch.as_tensor(pipe.scheduler.sigmas[:-1]).float(), atol=1e-6)
    x = z
    with torch.no_grad():
        for t, s in zip(ts[:-1], ts[1:]):
            t, s = torch.tensor([t]), torch.tensor([s])
            x = sched.jump(x, denoiser_out(c.transformer, x, sched.model_time(t), cond), t, s)
    assert (pipe._pack_latents(x.float(), 1, 4, 16, 16) - theirs).abs().max() < 1e-5
    assert trailing_sigmas(steps) == list(np.linspace(1, 1 / steps, steps))


def test_the_guided_step_of_a_guidance_distilled_teacher_is_one_forward_told_w(model):
    c = load_dit(model, "flux")
    text = PipelineText(c)
    cond = text(["a cat", "a dog"])
    seen = []

    def net_fn(x, t, cnd):
        seen.append((x.shape[0], cnd["guidance"].tolist()))
        return x

    guided(net_fn, torch.zeros(2, 4, 8, 8), torch.tensor([10, 20]), cond, text.uncond(cond), torch.tensor([2.0, 5.0]))
    assert seen == [(2, [2.0, 5.0])] and cond["guidance"].tolist() == [3.5, 3.5]  # one forward, cond untouched


@pytest.mark.slow
def test_flux_trains_every_stage_and_diffusers_loads_the_loras(model, images, tmp_path):
    files = train_whole_plan("experiments/tiny/flux.yaml", model, images, tmp_path)
    with safe_open(files[0], "pt") as h:
        assert any("single_transformer_blocks.0.proj_mlp" in k for k in h.keys())  # the recipe's FLUX set
    # hsd generate at 1/2/4/8 steps at the release's embedded guidance 3.5 (hsd's file stores its alpha: fused at 1)...
    g = hsd("generate", "--model", str(model), "--lora", str(files[3]), "--preset", "hyper-flux-8",
            "--steps", "1", "2", "4", "8", "--height", "16", "--width", "16", "--prompt", "a cat", "--out",
            str(tmp_path / "png"), cwd=tmp_path)
    assert g.returncode == 0, g.stderr[-3000:]
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert len(pngs) == 4 and all(np.asarray(Image.open(p)).std() > 0 for p in pngs)
    # ...is diffusers' own FluxPipeline with load_lora_weights on hsd's file, image for image.
    from hsd.pipelines import load_generator
    gen = load_generator(str(model), lora=[(str(files[3]), 1.0)], scheduler="euler")
    pipe = dit_pipeline(load_dit(model))
    pipe.load_lora_weights(str(files[3]))
    pipe.fuse_lora(lora_scale=1.0)
    for steps in (1, 2, 4, 8):
        kw = dict(num_inference_steps=steps, guidance_scale=3.5, height=16, width=16, output_type="pt")
        theirs = pipe("a cat", sigmas=trailing_sigmas(steps), generator=torch.Generator().manual_seed(0), **kw).images
        ours = gen.pipe(prompt=["a cat"], generator=[torch.Generator().manual_seed(0)], **kw,
                        **gen._schedule(steps)).images
        assert (ours - theirs).abs().max() <= 1e-4, steps
    png = np.asarray(Image.open(tmp_path / "png" / "p0000_seed0_steps4.png"))
    again = np.asarray(pipe("a cat", num_inference_steps=4, guidance_scale=3.5, height=16, width=16,
                            generator=torch.Generator().manual_seed(0)).images[0])
    assert np.array_equal(png, again)


@pytest.mark.slow
def test_flux_resume_is_exact(model, images, tmp_path):
    check_resume_is_exact("experiments/tiny/flux.yaml", model, images, tmp_path)


@pytest.mark.slow
def test_flux_two_processes_ddp_and_fsdp_on_cpu_train_the_same_lora(model, images, tmp_path):
    check_ddp_equals_fsdp("experiments/tiny/flux.yaml", model, images, tmp_path)


def test_flux_refusals(model, images, tmp_path):
    for args, says in [(["--preset", "hyper-sd3-4"], "hyper-sd3-4 is a recipe for SD3 models; "),
                       (["--steps", "1", "--negative-prompt", "blurry"], "FLUX.1-dev is guidance-distilled"),
                       (["--steps", "1", "--scheduler", "tcd"], "flow-matching")]:
        r = hsd("generate", "--model", str(model), *args, "--prompt", "a", "--out", str(tmp_path / "o"), cwd=tmp_path)
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("hsd: error: ") and says in r.stderr \
            and "Traceback" not in r.stderr, r.stderr
    sd3 = build_dit("tiny-sd3").save_pretrained(tmp_path / "sd3")
    r = hsd("train", str(ROOT / "experiments/tiny/flux.yaml"), f"model.path={sd3}", f"data.folder={images}",
            f"out_dir={tmp_path}", cwd=tmp_path)
    assert r.returncode == 2 and "world flux expects a FluxPipeline folder" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("arch", ["tiny-sd3", "tiny-flux", "sd3", "flux"])
def test_a_transformer_discriminator_reads_image_tokens_on_their_grid(arch):
    """The adversarial term's features on a transformer: the image tokens after every stride-th block (at most 8
    levels: SD3-medium's 24 blocks give 8, FLUX.1-dev's 57 give 7), as [B, width, H / p, W / p] maps; stopping after
    the last level read gives the same features as the whole forward (the FSDP path)."""
    from hsd.models.discriminator import build_discriminator, denoiser_features, feature_channels, token_blocks
    adv = load_config([], ["tscd.adv.hidden=8", "tscd.adv.conditioned=true"]).tscd.adv
    if not arch.startswith("tiny"):  # the real architectures: the levels and heads only, on the meta device
        with torch.device("meta"):
            net = build_dit(arch).transformer
        assert len(token_blocks(net)) == {"sd3": 8, "flux": 7}[arch]
        assert feature_channels(net) == [{"sd3": 1536, "flux": 3072}[arch]] * len(token_blocks(net))
        return
    c = build_dit(arch)
    cond = PipelineText(c)(["a cat", "a dog"])
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 800.0])
    early = denoiser_features(c.transformer, x, t, cond, stop=True)
    full = denoiser_features(c.transformer, x, t, cond, stop=False)
    side = 8 // (2 if arch == "tiny-flux" else c.transformer.config.patch_size)
    assert [f.shape for f in early] == [(2, ch, side, side) for ch in feature_channels(c.transformer)]
    assert all(torch.equal(a, b) for a, b in zip(early, full))
    disc = build_discriminator(c.transformer, adv)
    logits = disc(early, [f.detach() for f in full])
    assert [tuple(lg.shape) for lg in logits] == [(2, 1, side, side)] * len(early)


def test_flux_trains_the_adversarial_term(model, images, tmp_path):
    """w_adv > 0 on FLUX: the discriminator trains beside the LoRA and the adversarial term's gradient is logged."""
    r = hsd("train", str(ROOT / "experiments/tiny/flux.yaml"), f"model.path={model}", f"data.folder={images}",
            f"out_dir={tmp_path}", "name=adv", "dmd.iterations=0", "trainer.grad_norms_every=1",
            "tscd.stages=[{k: 1, grid_steps: 16, iterations: 2, w_adv: 1.0}]", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    [events] = (tmp_path / "adv" / "tensorboard").rglob("events*")
    ea = EventAccumulator(str(events))
    ea.Reload()
    adv, mse = ([e.value for e in ea.Scalars(f"grad/{k}")] for k in ("adv", "mse"))
    assert len(adv) == 2 and all(a > 0 for a in adv) and all(m > 0 for m in mse)
    assert "train/d_loss_k1" in ea.Tags()["scalars"]


def test_flux_presets_are_the_releases():
    from hsd.pipelines.recipes import PRESETS
    assert {n: (p["steps"], p["guidance"], p["scale"]) for n, p in PRESETS.items() if p["family"] == "flux"} == \
        {"hyper-flux-8": ([8], 3.5, 0.125), "hyper-flux-16": ([16], 3.5, 0.125)}


def test_hsd_eval_scores_a_flux_model_at_its_embedded_guidance(model, tmp_path):
    """`hsd eval --model FLUX_DIR` generates with the Euler recipe at FLUX's default guidance 3.5 (recorded in the
    spec) and scores every image with the four scorers."""
    import json

    from hsd.scorers.random_weights import write_random_scorers
    weights = write_random_scorers(tmp_path / "scorers", "tiny", seed=0)
    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    r = hsd("eval", "--weights", str(weights), "--prompts", str(tmp_path / "p.txt"), "--model", str(model),
            "--name", "tiny", "--scheduler", "euler", "--steps", "2", "--size", "16", "--out", str(tmp_path / "o"),
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    [spec] = (tmp_path / "o").glob("tiny-*/spec.json")
    assert json.loads(spec.read_text())["guidance"] == 3.5
    [row] = json.loads((tmp_path / "o" / "table.json").read_text())["rows"]
    assert row["spec"]["guidance"] == 3.5 and row["Steps"] == 2
    assert all(isinstance(row[m], float) for m in ("CLIP", "Aes", "ImageReward", "PickScore")), row
