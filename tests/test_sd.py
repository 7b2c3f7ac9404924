"""SD1.5 / SDXL: components, conditioning, the discriminator, TSCD with it, DDP, exact resume, bad input.

Everything runs on random-weight models of the real architectures (meta device for their sizes) or tiny
ones saved with save_pretrained and read back through the user-facing loader.
"""
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from hsd.config import load_config
from hsd.diffusion.schedule import NoiseSchedule
from hsd.lit.tscd import TSCDModule
from hsd.losses.adversarial import d_loss, g_loss
from hsd.models.components import ARCHS, ModelError, build_components, check_family, load_components
from hsd.models.conditioning import LatentEncoder, TextConditioner
from hsd.models.discriminator import FeatureDiscriminator, build_discriminator, feature_channels, denoiser_features
from hsd.models.lora import attach_lora, load_lora, lora_params

ROOT = Path(__file__).resolve().parent.parent
HSD = [sys.executable, "-m", "hsd.cli"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20 + 2 * i, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a photo of thing {i}")
    return folder


@pytest.fixture(scope="module", params=["tiny-sd15", "tiny-sdxl"])
def model_dir(request, tmp_path_factory) -> Path:
    return build_components(request.param).save_pretrained(tmp_path_factory.mktemp(request.param) / "model")


def test_real_architectures_have_the_published_sizes():
    from diffusers import UNet2DConditionModel
    sizes = {"sd15": 859_520_964, "sdxl": 2_567_463_684}  # the released UNets' parameter counts
    for name, n in sizes.items():
        with torch.device("meta"):
            unet = UNet2DConditionModel(**ARCHS[name].unet)
        assert sum(p.numel() for p in unet.parameters()) == n


def test_loader_round_trip_and_family(model_dir):
    c = load_components(model_dir)
    expected = "sdxl" if "sdxl" in str(model_dir) else "sd15"
    assert c.family == expected and len(c.text_encoders) == (2 if expected == "sdxl" else 1)
    other = "sd15" if expected == "sdxl" else "sdxl"
    with pytest.raises(ModelError, match=f"holds {expected.upper()} weights.*asks for {other.upper()}"):
        check_family(c, other, str(model_dir))


def test_missing_model_and_single_file_errors(tmp_path):
    with pytest.raises(ModelError, match="model not found: .*nowhere"):
        load_components(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="model_index.json is missing"):
        load_components(tmp_path / "empty")
    (tmp_path / "sd.safetensors").write_bytes(b"x")
    with pytest.raises(ModelError, match="single-file checkpoint: set model.config"):
        load_components(tmp_path / "sd.safetensors")


def test_single_file_checkpoint_loads_offline_with_a_config_folder(tmp_path):
    """An original-layout (LDM) SD1.5 .safetensors, written by tests/ldm_checkpoint.py, loads to the same weights."""
    from safetensors.torch import save_file
    sys.path.insert(0, str(ROOT / "tests"))
    from ldm_checkpoint import sd15_to_ldm
    c = build_components("tiny-sd15")
    config = c.save_pretrained(tmp_path / "config")
    save_file(sd15_to_ldm(c), tmp_path / "sd15.safetensors")
    loaded = load_components(tmp_path / "sd15.safetensors", config=config)
    assert loaded.family == "sd15"
    for a, b in [(c.unet, loaded.unet), (c.vae, loaded.vae), (c.text_encoders[0], loaded.text_encoders[0])]:
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k].reshape(sa[k].shape)) for k in sa)


def test_sdxl_conditioning_matches_the_pipeline():
    """Our SDXL text conditioning equals StableDiffusionXLPipeline.encode_prompt; size ids as the pipeline's."""
    from hsd.models.components import pipeline
    c = build_components("tiny-sdxl")
    text = TextConditioner(c.family, c.text_encoders, c.tokenizers)
    cond = text(["a cat", "a dog"], torch.tensor([[20, 24], [16, 16]]), torch.tensor([[2, 0], [0, 0]]), (16, 16))
    emb, _, pooled, _ = pipeline(c).encode_prompt(["a cat", "a dog"], do_classifier_free_guidance=False)
    torch.testing.assert_close(cond["encoder_hidden_states"], emb)
    torch.testing.assert_close(cond["added_cond_kwargs"]["text_embeds"], pooled)
    assert cond["added_cond_kwargs"]["time_ids"][0].tolist() == [20, 24, 2, 0, 16, 16]
    un = text.uncond(cond)
    assert not un["encoder_hidden_states"].any() and torch.equal(un["added_cond_kwargs"]["time_ids"],
                                                                  cond["added_cond_kwargs"]["time_ids"])


@pytest.mark.parametrize("up", [False, True])
def test_unet_features_stop_early_equals_full_forward_and_pass_gradient(up):
    c = build_components("tiny-sd15")
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    cond = {"encoder_hidden_states": torch.randn(2, 77, 32)}
    t = torch.tensor([10, 500])
    early = denoiser_features(c.unet, x, t, cond, up=up, stop=True)
    full = denoiser_features(c.unet, x, t, cond, up=up, stop=False)
    assert [f.shape[1] for f in early] == feature_channels(c.unet, up)
    assert len(early) == len(c.unet.down_blocks) + 1 + up * len(c.unet.up_blocks)
    assert all(torch.equal(a, b) for a, b in zip(early, full))
    # conditioned on a start point (SDXL-Lightning): the heads see both; the logits change with the start point
    start = [f.detach() for f in denoiser_features(c.unet, torch.randn(2, 4, 8, 8), t + 100, cond, up=up)]
    disc = FeatureDiscriminator(feature_channels(c.unet, up), 16, conditioned=True)
    g_loss(disc(early, start)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    other = [torch.randn_like(f) for f in start]
    assert not torch.allclose(disc(early, start)[0], disc(early, other)[0])
    with pytest.raises(ValueError, match="start point"):
        disc(early)


def test_adversarial_losses_closed_form():
    real, fake = [torch.tensor([2.0, 0.5])], [torch.tensor([-2.0, 0.5])]
    assert d_loss(real, fake, "hinge").item() == pytest.approx((0 + 0.5) / 2 + (0 + 1.5) / 2)
    assert g_loss(fake, "hinge").item() == pytest.approx(0.75)
    sp = torch.nn.functional.softplus
    assert d_loss(real, fake, "ns").item() == pytest.approx((sp(-real[0]).mean() + sp(fake[0]).mean()).item())


def _sd_module(name: str, w_adv: float = 1.0):
    c = build_components(name)
    L.seed_everything(0, verbose=False)
    attach_lora(c.unet, 4, 4)
    cfg = load_config([], [f"tscd.stages=[{{k: 2, grid_steps: 8, iterations: 4, w_adv: {w_adv}}}]",
                           "tscd.batch_size=2", "tscd.lr=1e-3", "tscd.adv.hidden=16", "trainer.progress_bar=false",
                           "trainer.ckpt_every=2"])
    disc = build_discriminator(c.unet, cfg.tscd.adv) if w_adv else None
    enc = LatentEncoder(c.vae, TextConditioner(c.family, c.text_encoders, c.tokenizers), 16)
    return TSCDModule(c.unet, NoiseSchedule.from_scheduler(c.scheduler), cfg.tscd.stages[0], cfg.tscd, seed=1,
                      encoder=enc, disc=disc), cfg


def _fit(images: Path, out: Path, updates: int, ckpt=None, record=None):
    from hsd.data import ImageTextData
    from hsd.lit.trainer import make_trainer
    module, cfg = _sd_module("tiny-sd15")
    n = module.steps_per_update
    data = ImageTextData(folder=str(images), resolution=16, batch_size=2, steps=4, seed=3)
    trainer = make_trainer(cfg, out, updates * n, 2 * n, [record] if record else [])
    trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    return module


class _Record(L.Callback):
    def __init__(self):
        self.loss = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.loss[int(batch["index"])] = outputs["loss"].item()


def test_tscd_with_discriminator_resumes_exactly(images, tmp_path):
    """G and D alternate; a run stopped after 2 of 4 updates and resumed equals the uninterrupted run,
    LoRA, EMA and discriminator included (they are all in the checkpoint)."""
    full_rec, a_rec, b_rec = _Record(), _Record(), _Record()
    full = _fit(images, tmp_path / "full", 4, record=full_rec)
    _fit(images, tmp_path / "cut", 2, record=a_rec)
    ckpt = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert any(k.startswith("disc.") for k in state) and any(k.startswith("ema.") for k in state)
    assert len(torch.load(ckpt, weights_only=True)["optimizer_states"]) == 2
    resumed = _fit(images, tmp_path / "cut", 4, ckpt=ckpt, record=b_rec)
    assert sorted(a_rec.loss) == [0, 1] and sorted(b_rec.loss) == [2, 3]
    for i in range(4):
        assert (a_rec.loss | b_rec.loss)[i] == pytest.approx(full_rec.loss[i], rel=1e-5)
    for name, p in lora_params(full.unet).items():
        torch.testing.assert_close(lora_params(resumed.unet)[name], p)
    for (n, a), (_, b) in zip(full.disc.state_dict().items(), resumed.disc.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)


def test_gradient_checkpointing_keeps_lora_gradients():
    module, _ = _sd_module("tiny-sdxl", w_adv=0.0)
    module.unet.enable_gradient_checkpointing()
    module.unet.train()
    batch = {"pixels": torch.rand(2, 3, 16, 16) * 2 - 1, "captions": ["a", "b"], "index": 0}
    g = torch.Generator().manual_seed(0)
    pred, target, _ = module.tscd_pair(module.encoder(batch, g), g)
    ((pred - target) ** 2).mean().backward()
    lora = lora_params(module.unet)
    assert all(p.grad is not None for p in lora.values())
    assert all(p.grad is None for n, p in module.unet.named_parameters() if "lora_" not in n)


def _train(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*HSD, "train", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.slow
def test_hsd_train_every_stage_exports_both_formats(model_dir, images, tmp_path):
    world = "sdxl" if "sdxl" in str(model_dir) else "sd15"
    r = _train([str(ROOT / f"experiments/tiny/{world}.yaml"), f"model.path={model_dir}", f"data.folder={images}",
                f"out_dir={tmp_path}", "name=run"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "run"
    c = load_components(model_dir)
    attach_lora(c.unet, 4, 4)
    for i, k in enumerate([8, 4, 2, 1]):
        diffusers_file, kohya = out / f"lora_stage{i}_k{k}.safetensors", out / f"lora_stage{i}_k{k}.kohya.safetensors"
        load_lora(c.unet, diffusers_file)
        a = {n: p.clone() for n, p in lora_params(c.unet).items()}
        load_lora(c.unet, kohya)
        assert all(torch.equal(a[n], p) for n, p in lora_params(c.unet).items())
    assert any(p.abs().sum() > 0 for n, p in lora_params(c.unet).items() if "lora_B" in n)
    assert (out / "loras.md").exists() and "kohya" in r.stdout
    # Every stage's LoRA generates through the stock diffusers pipeline at 1/2/4/8 steps (DDIM trailing).
    from hsd.pipelines import load_generator
    for i, k in enumerate([8, 4, 2, 1]):
        gen = load_generator(str(model_dir), lora=[(str(out / f"lora_stage{i}_k{k}.kohya.safetensors"), 1.0)])
        for steps in (1, 2, 4, 8):
            img = gen.generate(["a cat"], steps, [0])[0]
            assert img.size == (16, 16) and np.asarray(img).std() > 0
    # A released-style kohya LoRA as the starting point of a new run (rank, alpha, targets read from it).
    init = _train([str(ROOT / f"experiments/tiny/{world}.yaml"), f"model.path={model_dir}", f"data.folder={images}",
                   f"out_dir={tmp_path}", "name=init", f"model.lora_init={out}/lora_stage3_k1.kohya.safetensors",
                   "tscd.stages=[{k: 1, grid_steps: 16, iterations: 1}]"], tmp_path)
    assert init.returncode == 0, init.stderr[-3000:]
    assert (tmp_path / "init" / "lora_stage0_k1.kohya.safetensors").exists()
    # A rerun finds every stage done and trains nothing.
    again = _train([str(ROOT / f"experiments/tiny/{world}.yaml"), f"model.path={model_dir}",
                    f"data.folder={images}", f"out_dir={tmp_path}", "name=run"], tmp_path)
    assert again.returncode == 0 and "Trainer.fit" not in again.stderr


@pytest.mark.slow
def test_recipe_precision_bf16_frozen_weights_with_fp32_vae(model_dir, images, tmp_path):
    """The shipped recipes' precision (bf16 frozen weights, bf16-mixed, fp32 VAE) trains and samples."""
    world = "sdxl" if "sdxl" in str(model_dir) else "sd15"
    r = _train([str(ROOT / f"experiments/tiny/{world}.yaml"), f"model.path={model_dir}", f"data.folder={images}",
                f"out_dir={tmp_path}", "name=bf16", "model.frozen_dtype=bfloat16", "trainer.precision=bf16-mixed",
                "tscd.stages=[{k: 2, grid_steps: 8, iterations: 2, w_adv: 1.0}]"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert list((tmp_path / "bf16" / "tensorboard").rglob("events.out.tfevents.*"))


@pytest.mark.slow
def test_two_process_ddp_on_cpu(images, tmp_path):
    model = build_components("tiny-sd15").save_pretrained(tmp_path / "model")
    r = _train([str(ROOT / "experiments/tiny/sd15.yaml"), f"model.path={model}", f"data.folder={images}",
                f"out_dir={tmp_path}", "name=ddp", "trainer.devices=2", "trainer.strategy=ddp",
                "tscd.stages=[{k: 2, grid_steps: 8, iterations: 2, w_adv: 1.0}]"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "distributed_backend=gloo" in r.stderr and "All distributed processes registered" in r.stderr
    assert (tmp_path / "ddp" / "lora_stage0_k2.kohya.safetensors").exists()


@pytest.mark.slow
def test_fsdp_settings_on_two_cpu_processes():
    """Lightning refuses FSDP on CPU; torch's FSDP with hsd's settings checks the strategy's premises."""
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "fsdp_cpu_worker.py"), "29547"], capture_output=True,
                       text=True, cwd=ROOT)
    results = re.findall(r"(ok|FAIL) (\S+) rank(\d)", r.stdout)
    assert r.returncode == 0 and len(results) == 10, r.stdout + r.stderr[-2000:]
    assert all(status == "ok" for status, _, _ in results), r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_resume_is_exact(strategy, images, tmp_path):
    """2 gloo processes, discriminator on: 2 updates, stop, resume to 4 == 4 uninterrupted updates, bit for bit.
    FSDP goes through Lightning's FSDP strategy code (tests/fsdp_lightning_cpu.py lets it run on CPU)."""
    from safetensors.torch import load_file
    model = build_components("tiny-sd15").save_pretrained(tmp_path / "model")
    launcher = [sys.executable, str(ROOT / "tests" / "fsdp_lightning_cpu.py")] if strategy == "fsdp" else HSD

    def train(name: str, iterations: int):
        r = subprocess.run([*launcher, "train", str(ROOT / "experiments/tiny/sd15.yaml"), f"model.path={model}",
                            f"data.folder={images}", f"out_dir={tmp_path}", f"name={name}", "trainer.devices=2",
                            f"trainer.strategy={strategy}", "trainer.ckpt_every=2",
                            f"tscd.stages=[{{k: 2, grid_steps: 8, iterations: {iterations}, w_adv: 1.0}}]"],
                           capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        return tmp_path / name / "lora_stage0_k2.safetensors"

    full = load_file(train("full", 4))
    cut = train("cut", 2)
    assert (tmp_path / "cut" / "stage0_k2" / "checkpoints" / "last.ckpt").is_file()
    for f in cut.parent.glob("lora_stage0_k2*.safetensors"):  # as if the run had died before its stage ended
        f.unlink()
    resumed = load_file(train("cut", 4))
    assert set(full) == set(resumed) and all(torch.equal(full[k], resumed[k]) for k in full)


def test_8bit_adam_without_bitsandbytes_says_how_to_install():
    from hsd.lit import base
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed")
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install 'hsd\[bnb\]'"):
            base.adamw("adamw8bit")


def test_cli_names_sdxl_settings_on_sd15_weights(images, tmp_path):
    model = build_components("tiny-sd15").save_pretrained(tmp_path / "model")
    r = _train([str(ROOT / "experiments/tiny/sdxl.yaml"), f"model.path={model}", f"data.folder={images}",
                f"out_dir={tmp_path}"], tmp_path)
    assert r.returncode != 0 and "holds SD15 weights" in r.stderr and "asks for SDXL" in r.stderr
    r = _train([str(ROOT / "experiments/tiny/sd15.yaml"), f"model.path={tmp_path}/none", f"data.folder={images}",
                f"out_dir={tmp_path}"], tmp_path)
    assert r.returncode != 0 and "model not found" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_uncaptioned_images_are_an_error_or_counted_in_every_stage(images, tmp_path):
    """data.missing_captions: the default names an uncaptioned image before any weights load; "empty" trains it on
    the empty prompt and every stage that reads the images logs the running count as data/uncaptioned."""
    import csv
    import shutil
    folder = tmp_path / "images"
    shutil.copytree(images, folder)
    (folder / "0.txt").unlink()
    model = build_components("tiny-sd15").save_pretrained(tmp_path / "model")
    args = [str(ROOT / "experiments/tiny/sd15.yaml"), f"model.path={model}", f"data.folder={folder}",
            f"out_dir={tmp_path}", "name=run", "trainer.logger=csv", "feedback.iterations=0", "dmd.iterations=3",
            "dmd.batch_size=2", "tscd.stages=[{k: 1, grid_steps: 16, iterations: 3}]"]
    refused = _train(args, tmp_path)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
        f"hsd: error: 1 of 6 images under {folder} have no .txt caption (e.g. {folder / '0.png'}); add same-stem "
        f".txt files, or set data.missing_captions=empty to train such samples on the empty prompt (counted and "
        f"reported); tscd.empty_prompts is the deliberate CFG dropout")
    r = _train([*args, "data.missing_captions=empty"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "0.png has no caption: it trains on the empty prompt" in r.stderr
    logged = {}
    for f in (tmp_path / "run" / "csv").rglob("metrics.csv"):
        rows = [row for row in csv.DictReader(f.open()) if row.get("data/uncaptioned")]
        logged[f.parent.name] = [float(row["data/uncaptioned"]) for row in rows]
    assert set(logged) == {"stage0_k1", "dmd"}, logged
    # one uncaptioned image in 6, batches of 2: the running total reaches 1 within 3 batches and never falls
    assert all(v == sorted(v) and v[-1] == 1.0 for v in logged.values()), logged
