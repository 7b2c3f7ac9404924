"""Fault injection over every subcommand: bad paths, corrupt or foreign files, data that would silently mean something
else. Each case runs the real entry point (`hsd.cli.main`) in-process and asserts exit status 2, exactly one
`hsd: error:` line naming the path or key (the last line on stderr, no traceback), and that every file that existed
before is byte-identical after (nothing deleted, nothing overwritten, nothing half-written left beside it).

A case is (id, setup): setup(world, tmp) makes what the case needs in its own folder `tmp` (the shared `world` of
tiny models and files is read-only to it) and returns (argv, pieces the error line must hold).
"""
import hashlib
import io
import shutil
import tarfile
from pathlib import Path
from types import SimpleNamespace

import lightning  # noqa: F401  imported here, not inside a test: its log handler binds the stderr of that moment
import pytest
import torch
from PIL import Image

import fault_cases
from fault_cases import _model_copy
from hsd.cli import main
from hsd.models.components import build_components

LAB = ["lab.world=blocks", "tscd.stages=[{k: 2, grid_steps: 8, iterations: 2}]", "tscd.batch_size=8",
       "feedback.iterations=0", "dmd.iterations=0", "trainer.progress_bar=false", "lab.eval_per_class=2",
       "lab.student_steps=[1]", "trainer.ckpt_every=1"]


pytestmark = pytest.mark.usefixtures("quiet_and_single_threaded")  # conftest.py: stderr holds only hsd's lines


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("HSD_DEBUG", raising=False)


def _png(path: Path, color="red", size=16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path


def _tar(path: Path, samples: list[dict]) -> Path:
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for ext, data in s.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _png_bytes(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny SD1.5 model, LoRA files good and bad, data folders and shards good and bad, a lab run with a checkpoint."""
    root = tmp_path_factory.mktemp("faults")
    w = SimpleNamespace(root=root)
    w.model = build_components("tiny-sd15").save_pretrained(root / "model")
    w.images = root / "images"
    for i, color in enumerate(["red", "green", "blue", "white"]):
        _png(w.images / f"{i}.png", color)
        (w.images / f"{i}.txt").write_text(f"a {color} square")
    main(["train", "world=sd15", f"model.path={w.model}", f"data.folder={w.images}", f"out_dir={root}", "name=sd",
          "model.resolution=16", "tscd.stages=[{k: 1, grid_steps: 4, iterations: 1}]", "tscd.batch_size=1",
          "trainer.progress_bar=false", "data.sample_prompts=[]"])
    w.lora = root / "sd" / "lora_stage0_k1.safetensors"
    w.junk = root / "junk.safetensors"
    w.junk.write_bytes(b"not a safetensors file at all")
    w.torn = root / "torn.safetensors"
    w.torn.write_bytes(w.lora.read_bytes()[: w.lora.stat().st_size // 2])
    w.file = root / "a_file"
    w.file.write_text("a file, not a folder")
    w.prompts = root / "prompts.txt"
    w.prompts.write_text("a red square\n")
    w.binary = root / "binary.bin"
    w.binary.write_bytes(bytes(range(256)) * 4)
    w.png = _png(root / "control.png")
    main(["lab", *LAB, f"out_dir={root}", "name=lab"])
    w.lab = root / "lab"
    return w


def _copy_lab_mid_stage(w, tmp: Path) -> Path:
    """The lab run as a stage killed mid-way leaves it: its checkpoint, no artefact, no report."""
    run = tmp / "lab"
    shutil.copytree(w.lab, run)
    for p in run.glob("lora_*"):
        p.unlink()
    config = run / "config.yaml"  # as the rerun will write it, into its new out_dir
    config.write_text(config.read_text().replace(f"out_dir: {w.root}", f"out_dir: {tmp}"))
    return run / "stage0_k2" / "checkpoints" / "last.ckpt"


def _sd_train(w, tmp, *extra):
    return ["train", "world=sd15", f"model.path={w.model}", f"out_dir={tmp}", "name=run", "model.resolution=16",
            "tscd.stages=[{k: 1, grid_steps: 4, iterations: 1}]", "tscd.batch_size=1", "trainer.progress_bar=false",
            *extra]


def _data(w, tmp, *extra):
    return _sd_train(w, tmp, *extra)



# ---- the cases: (id, setup(world, tmp) -> (argv, pieces)) ----
def c_train_out_under_a_file(w, tmp):
    return _sd_train(w, tmp, f"data.folder={w.images}", f"out_dir={w.file}/runs"), [f"{w.file}/runs/run", "is a file"]


def c_train_config_is_a_folder(w, tmp):
    return ["train", str(tmp)], [f"config file {tmp} is a folder"]


def c_train_config_is_binary(w, tmp):
    return ["train", str(w.binary)], [f"{w.binary}: not a text file"]


def c_train_model_config_json_garbage(w, tmp):
    model = _model_copy(w, tmp)
    (model / "unet" / "config.json").write_text("{ not json")
    return _sd_train(w, tmp, f"model.path={model}", f"data.folder={w.images}"), [f"{model}/unet", "cannot load"]


def c_train_model_weights_torn(w, tmp):
    model = _model_copy(w, tmp)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return _sd_train(w, tmp, f"model.path={model}", f"data.folder={w.images}"), [f"{model}/unet", "cannot load"]


def c_train_model_path_is_a_file(w, tmp):
    return _sd_train(w, tmp, f"model.path={w.prompts}", f"data.folder={w.images}"), [str(w.prompts)]


def c_train_lora_init_garbage(w, tmp):
    return (_sd_train(w, tmp, f"data.folder={w.images}", f"model.lora_init={w.junk}"),
            [str(w.junk), "not a readable safetensors file"])


def c_train_lora_init_torn(w, tmp):
    return (_sd_train(w, tmp, f"data.folder={w.images}", f"model.lora_init={w.torn}"),
            [str(w.torn), "not a readable safetensors file"])


def c_train_lora_init_is_a_folder(w, tmp):
    return (_sd_train(w, tmp, f"data.folder={w.images}", f"model.lora_init={tmp}"),
            [f"LoRA file {tmp} is a folder", "model.lora_init"])


def c_train_vae_missing(w, tmp):
    return (_sd_train(w, tmp, f"data.folder={w.images}", f"model.vae={tmp}/vae"),
            [f"VAE folder not found: {tmp}/vae", "model.vae"])


def c_train_scorers_missing(w, tmp):
    return (_sd_train(w, tmp, f"data.folder={w.images}", "feedback.iterations=1", f"feedback.scorers={tmp}/none",
                      "feedback.rewards={Aes: {margin: 5, weight: 1}}"),
            [f"scorer weights folder not found: {tmp}/none", "feedback.scorers"])


def c_train_solo_is_a_folder(w, tmp):
    (tmp / "coco").mkdir()
    return (_sd_train(w, tmp, f"data.folder={w.images}", "feedback.iterations=1", "feedback.instance_weight=1",
                      f"feedback.solo={tmp}", f"feedback.coco_annotations={w.prompts}",
                      f"feedback.coco_images={tmp}/coco", f"feedback.coco_captions={w.prompts}"),
            [f"SOLO checkpoint {tmp} is a folder", "feedback.solo"])


def c_data_folder_is_a_file(w, tmp):
    return _data(w, tmp, f"data.folder={w.prompts}"), [f"image folder is a file, not a folder: {w.prompts}"]


def c_data_uncaptioned(w, tmp):
    for i in range(2):
        _png(tmp / "data" / f"{i}.png")
    return (_data(w, tmp, f"data.folder={tmp}/data"),
            ["2 of 2 images under", "have no .txt caption", "data.missing_captions=empty"])


def c_data_fewer_than_a_batch(w, tmp):
    return (_data(w, tmp, f"data.folder={w.images}", "tscd.batch_size=3", "trainer.devices=2"),
            [f"{w.images} holds 4 usable samples", "fewer than one batch of 6", "tscd.batch_size=3 x 2 rank(s)"])


def c_data_all_unreadable(w, tmp):
    for i in range(2):
        (tmp / "data").mkdir(exist_ok=True)
        (tmp / "data" / f"{i}.png").write_bytes(b"not a png")
        (tmp / "data" / f"{i}.txt").write_text("junk")
    return _data(w, tmp, f"data.folder={tmp}/data"), [f"no usable sample in {tmp}/data", "2 read, 2 unreadable"]


def c_shard_truncated(w, tmp):
    shard = _tar(tmp / "s.tar", [{"__key__": f"k{i}", "png": _png_bytes("red"), "txt": b"red"} for i in range(3)])
    shard.write_bytes(shard.read_bytes()[:1536 + 700])  # mid-way through the first sample's second member
    return _data(w, tmp, f"data.shards={shard}", "tscd.batch_size=2"), [str(shard), "fewer than one batch of 2"]


def c_shard_without_captions(w, tmp):
    shard = _tar(tmp / "s.tar", [{"__key__": f"k{i}", "png": _png_bytes("red")} for i in range(2)])
    return _data(w, tmp, f"data.shards={shard}"), [f"sample {shard}:k0 has no caption", "data.missing_captions=empty"]


def c_shard_missing(w, tmp):
    return _data(w, tmp, f"data.shards={tmp}/s-{{0..1}}.tar"), [f"shard {tmp}/s-0.tar not found"]


def c_resume_ckpt_garbage(w, tmp):
    ckpt = _copy_lab_mid_stage(w, tmp)
    ckpt.write_bytes(b"garbage")
    return ["lab", *LAB, f"out_dir={tmp}", "name=lab"], [f"resume checkpoint {ckpt} cannot be read", f"mv {ckpt}"]


def c_resume_ckpt_torn(w, tmp):
    ckpt = _copy_lab_mid_stage(w, tmp)
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    return ["lab", *LAB, f"out_dir={tmp}", "name=lab"], [f"resume checkpoint {ckpt} cannot be read", "torn"]


def c_resume_ckpt_foreign(w, tmp):
    ckpt = _copy_lab_mid_stage(w, tmp)
    torch.save({"weights": torch.ones(2)}, ckpt)
    return (["lab", *LAB, f"out_dir={tmp}", "name=lab"],
            [f"resume checkpoint {ckpt} cannot be read", "not a Lightning checkpoint"])


def c_resume_ckpt_of_another_model(w, tmp):
    """Another LoRA rank's checkpoint in this stage's folder (its settings.yaml gone, so nothing else refuses it)."""
    ckpt = _copy_lab_mid_stage(w, tmp)
    (ckpt.parent.parent / "settings.yaml").unlink()
    state = torch.load(ckpt, weights_only=True)
    state["state_dict"] = {k: torch.cat([v, v]) if v.ndim else v for k, v in state["state_dict"].items()}
    torch.save(state, ckpt)
    return (["lab", *LAB, f"out_dir={tmp}", "name=lab"],
            [f"resume checkpoint {ckpt} cannot be read", "not this stage's", "has shape"])


def c_resume_folder_ckpt_without_meta(w, tmp):
    ckpt = _copy_lab_mid_stage(w, tmp)
    ckpt.unlink()
    ckpt.mkdir()
    (ckpt / "__0_0.distcp").write_bytes(b"shards")
    return (["lab", *LAB, f"out_dir={tmp}", "name=lab"],
            [f"resume checkpoint {ckpt} cannot be read", "without its meta.pt"])


def c_lab_missing_teacher(w, tmp):
    return ["lab", "lab.teacher=/nope", f"out_dir={tmp}"], ["lab teacher not found at /nope"]


def c_lab_out_under_a_file(w, tmp):
    return ["lab", *LAB, f"out_dir={w.file}"], [f"{w.file}/lab_hypersd", "is a file"]


def c_lab_unknown_world(w, tmp):
    return ["lab", "lab.world=nope"], ["lab.world must be one of"]


def c_train_flux_with_sd3s_t5(w, tmp):
    return (_sd_train(w, tmp, f"data.folder={w.images}", "world=flux", "model.t5=true"),
            ["model.t5: SD3's optional T5 encoder; world 'flux' has none to add (FLUX always reads its T5)"])


def c_train_sd3_on_an_sd15_folder(w, tmp):
    return (_sd_train(w, tmp, f"data.folder={w.images}", "world=sd3"),
            [f"{w.model} holds a StableDiffusionPipeline; world sd3 expects a StableDiffusion3Pipeline folder"])


CASES = {name[2:]: fn for module in (globals(), vars(fault_cases)) for name, fn in dict(module).items()
         if name.startswith("c_") and callable(fn)}


def _snapshot(*roots: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for root in roots for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_the_suite_covers_every_subcommand_and_at_least_40_cases():
    commands = {"train", "lab", "generate", "eval", "lora_info", "lora_merge", "lora_convert", "memory", "ablate",
                "random_model", "lab_teacher", "lab_worlds"}
    assert len(CASES) >= 40 and all(any(c.startswith(cmd) for c in CASES) for cmd in commands)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fault_is_one_line_and_loses_nothing(case, world, tmp_path, capsys):
    argv, pieces = CASES[case](world, tmp_path)
    before = _snapshot(world.root, tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("hsd: error: ")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0] and "Traceback" not in err, err
    for piece in pieces:
        assert piece in errors[0], (piece, errors[0])
    after = _snapshot(world.root, tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # every file that was there is unchanged
    assert not [k for k in after if ".hsd-tmp-" in k]  # and no half-written temp file stays behind
