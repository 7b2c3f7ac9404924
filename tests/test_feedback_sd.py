"""The feedback and DMD stages on tiny SD1.5 / SDXL on CPU, with random-weight aesthetic, ImageReward and SOLO
models in their official layouts: finite losses, gradients reaching the feedback LoRA from each reward and from
the instance loss, and `hsd train` through TSCD, feedback and DMD."""
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from hsd.config import load_config
from hsd.lit.feedback import FeedbackModule
from hsd.models import lora as lio
from hsd.models.components import build_components

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("mmdet", reason="the instance loss needs mmdet: bash scripts/install_mmdet.sh")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Random scorers, a random SOLO checkpoint, a two-image COCO instances file, an image-text folder."""
    from hsd.rewards.instance import build_solo
    from hsd.scorers.random_weights import write_random_scorers
    root = tmp_path_factory.mktemp("feedback")
    write_random_scorers(root / "scorers", "tiny")
    torch.manual_seed(0)
    save_file(build_solo(80).state_dict(), root / "solo.safetensors")
    rng = np.random.default_rng(0)
    (root / "coco").mkdir()
    (root / "images").mkdir()
    images, anns = [], []
    for i in (1, 2):
        Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(root / "coco" / f"{i}.jpg")
        images.append({"id": i, "file_name": f"{i}.jpg", "height": 80, "width": 96})
        anns.append({"id": i, "image_id": i, "category_id": 18, "iscrowd": 0, "bbox": [10, 10, 40, 30],
                     "segmentation": [[10, 10, 50, 10, 50, 40, 10, 40]]})
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                     "categories": [{"id": 1}, {"id": 18}]}))
    (root / "captions.json").write_text(json.dumps({"annotations": [{"id": 10 + i, "image_id": i,
                                                                     "caption": f"a dog on field {i}"}
                                                                    for i in (1, 2)]}))
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        (root / "images" / f"{i}.txt").write_text(f"a photo of thing {i}")
    return {"root": root, "scorers": root / "scorers", "solo": root / "solo.safetensors",
            "annotations": root / "instances.json", "coco": root / "coco", "images": root / "images",
            "captions": root / "captions.json"}


def _overrides(files, model: Path, world: str) -> list[str]:
    return [f"world={world}", f"model.path={model}", f"data.folder={files['images']}", "model.resolution=64",
            f"feedback.scorers={files['scorers']}", f"feedback.solo={files['solo']}",
            f"feedback.coco_annotations={files['annotations']}", f"feedback.coco_images={files['coco']}",
            f"feedback.coco_captions={files['captions']}",
            "feedback.rewards={Aes: {margin: 100.0, weight: 1.0}, ImageReward: {margin: 100.0, weight: 1.0}}",
            "feedback.instance_weight=1.0", "feedback.steps=2", "feedback.batch_size=2", "tscd.batch_size=2"]


@pytest.mark.parametrize("arch", ["tiny-sd15", "tiny-sdxl"])
def test_gradient_reaches_the_feedback_lora_from_each_reward_and_the_instance_loss(files, arch, tmp_path):
    from hsd.worlds import SD
    model = build_components(arch).save_pretrained(tmp_path / "model")
    cfg = load_config([], [*_overrides(files, model, arch.split("-")[1]), "feedback.iterations=1"])
    world = SD(cfg)
    L.seed_everything(0, verbose=False)
    lio.attach_lora(world.unet, 4, 4)
    lio.add_adapter(world.unet, "feedback", 4, 4)
    with torch.no_grad():  # B = 0 would stop the gradient at A: start the feedback LoRA away from zero
        for n, p in lio.lora_params(world.unet, "feedback").items():
            p.normal_(0, 0.02) if "lora_B" in n else None
    module = FeedbackModule(world.unet, world.schedule, cfg.feedback, world.feedback_loss(), encoder=world.encoder)
    g = torch.Generator().manual_seed(0)
    batch = module.encode({"pixels": torch.rand(2, 3, 64, 64) * 2 - 1, "captions": ["a cat", "a dog"],
                           "index": 0}, g)
    feedback = lio.lora_params(world.unet, "feedback")

    def grad_norm(loss: torch.Tensor) -> float:
        for p in feedback.values():
            p.grad = None
        loss.backward()
        assert all(p.grad is None for p in lio.lora_params(world.unet, "default").values())
        return sum(float(p.grad.abs().sum()) for p in feedback.values() if p.grad is not None)

    rewards = module.loss.rewards(module.x0_from_noise(batch, g), batch)
    assert set(rewards) == {"Aes", "ImageReward"}
    for name in rewards:  # a fresh graph per reward, so each gradient is that reward's alone
        r = module.loss.rewards(module.x0_from_noise(batch, torch.Generator().manual_seed(1)), batch)[name]
        assert r.shape == (2,) and torch.isfinite(r).all()
        assert grad_norm(-r.mean()) > 0, name
    inst = module.loss.instance(module, module.refl, 2, g, "cpu")
    assert torch.isfinite(inst) and inst > 0
    assert grad_norm(inst) > 0
    losses, _ = module.loss(module.x0_from_noise(batch, g), batch, module, g)
    assert set(losses) == {"reward", "instance"} and all(torch.isfinite(v) for v in losses.values())


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["tiny-sd15", "tiny-sdxl"])
def test_hsd_train_runs_tscd_feedback_and_dmd(files, arch, tmp_path):
    world = arch.split("-")[1]
    model = build_components(arch).save_pretrained(tmp_path / "model")
    args = [str(ROOT / f"experiments/tiny/{world}.yaml"), *_overrides(files, model, world),
            "tscd.stages=[{k: 1, grid_steps: 8, iterations: 1}]", "feedback.iterations=2", "dmd.iterations=2",
            "dmd.batch_size=2", "dmd.fake_updates=2", "dmd.w_mse=0.5", "dmd.mse_steps=2", "dmd.w_feedback=1.0",
            f"out_dir={tmp_path}", "name=run"]
    r = subprocess.run([sys.executable, "-m", "hsd.cli", "train", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "run"
    for name in ("lora_feedback", "lora_unified"):
        assert (out / f"{name}.safetensors").exists() and (out / f"{name}.kohya.safetensors").exists()
    assert "DMD (t=999)" in r.stdout and "hsd lora merge" in r.stdout
    state = torch.load(out / "dmd" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 2 * 3  # two batches of one generator + two fake-score steps
    assert all(k.startswith(("gen.", "fake.")) for k in state["state_dict"])
    from hsd.pipelines import load_generator
    gen = load_generator(str(model), lora=[(str(out / "lora_unified.kohya.safetensors"), 1.0)], scheduler="tcd")
    assert np.asarray(gen.generate(["a cat"], 1, [0])[0]).std() > 0


def test_hsd_train_names_a_bad_solo_checkpoint_in_one_line(files, tmp_path, capsys):
    """A SOLO checkpoint for another dataset stops `hsd train` before any trainer starts: one line, exit status 2."""
    from hsd.cli import main
    torch.manual_seed(0)
    from hsd.rewards.instance import build_solo
    save_file(build_solo(20).state_dict(), tmp_path / "solo_voc.safetensors")
    model = build_components("tiny-sd15").save_pretrained(tmp_path / "model")
    args = [str(ROOT / "experiments/tiny/sd15.yaml"), *_overrides(files, model, "sd15"), "tscd.stages=[]",
            "feedback.iterations=1", f"feedback.solo={tmp_path / 'solo_voc.safetensors'}", f"out_dir={tmp_path}"]
    with pytest.raises(SystemExit) as exit_:
        main(["train", *args])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("hsd: error: ") and "predicts 20 classes but the instance loss is set up for 80" in err
    assert not list(tmp_path.glob("*/feedback/checkpoints"))
