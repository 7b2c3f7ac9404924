"""Every user error reaches the terminal as one line, `hsd: error: <message>`, exit status 2, no traceback.

Each bad input goes through the real CLI entry (`hsd.cli.main`) in-process; one goes through a subprocess to show
that nothing else reaches the terminal, and `--debug` / HSD_DEBUG=1 bring the traceback back. Commands that would
train fail while their config, model or data is being opened, before any step.
"""
import os
import subprocess
import sys
from pathlib import Path

import lightning  # noqa: F401  imported here, not inside a test: its log handler binds the stderr of that moment
import pytest
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import save_file

from hsd.cli import main
from hsd.config import ConfigError
from hsd.models.components import build_components

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("quiet_and_single_threaded")  # conftest.py: stderr holds only hsd's lines


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny random SD1.5 and SDXL folders, an SD1.5 LoRA, a captioned image folder."""
    root = tmp_path_factory.mktemp("errors")
    sd15 = build_components("tiny-sd15")
    sd15.save_pretrained(root / "sd15")
    build_components("tiny-sdxl").save_pretrained(root / "sdxl")
    sd15.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "to_v"], init_lora_weights=False))
    save_file({"unet." + k: v.contiguous() for k, v in get_peft_model_state_dict(sd15.unet).items()},
              root / "sd15_lora.safetensors")
    (root / "images").mkdir()
    Image.new("RGB", (16, 16), "red").save(root / "images" / "a.png")
    (root / "images" / "a.txt").write_text("a red square")
    (root / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    return root


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("HSD_DEBUG", raising=False)


def _fails(capsys, argv, *expected) -> str:
    """Run `hsd argv`: exit status 2 and stderr exactly one `hsd: error:` line holding every expected piece."""
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hsd: error: "), err
    assert "Traceback" not in err
    for piece in expected:
        assert piece in lines[0], (piece, lines[0])
    return lines[0]


def _yaml(tmp_path, text, name="exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- config files ----

def test_yaml_syntax_error_names_file_and_line(tmp_path, capsys):
    bad = _yaml(tmp_path, "name: x\ntscd:\n  lr: 1.0e-3\n   batch_size: 8\n")
    _fails(capsys, ["train", bad], f"hsd: error: {bad}:4: YAML syntax error: mapping values are not allowed here")


@pytest.mark.parametrize("text, line", [("tscd: {lr: fast}\n", 1), ("name: x\ntscd:\n  lr: fast\n", 3)])
def test_yaml_type_error_names_file_line_key_and_type(tmp_path, capsys, text, line):
    bad = _yaml(tmp_path, text)
    _fails(capsys, ["train", bad], f"hsd: error: {bad}:{line}: tscd.lr must be a number, got 'fast'")


def test_yaml_type_error_inside_a_stage_list(tmp_path, capsys):
    bad = _yaml(tmp_path, "tscd:\n  stages:\n    - {k: 2}\n    - {k: two}\n")
    _fails(capsys, ["train", bad], f"{bad}:4: tscd.stages.1.k must be an integer, got 'two'")


def test_yaml_range_error_names_the_line_that_set_it(tmp_path, capsys):
    bad = _yaml(tmp_path, "tscd:\n  batch_size: -4\n")
    _fails(capsys, ["train", bad], f"hsd: error: {bad}:2: tscd.batch_size must be >= 1, got -4")


def test_yaml_unknown_key_names_file_line_and_the_near_key(tmp_path, capsys):
    bad = _yaml(tmp_path, "tscd:\n  ema_decy: 0.9\n")
    _fails(capsys, ["train", bad], f"unknown config key 'tscd.ema_decy' in {bad}:2; did you mean 'tscd.ema_decay'?")


def test_yaml_that_is_a_list(tmp_path, capsys):
    bad = _yaml(tmp_path, "- tscd\n- lr\n")
    _fails(capsys, ["train", bad], f"hsd: error: {bad}: a config must be a mapping of keys, got list")


def test_missing_config_file_and_missing_base(tmp_path, capsys):
    _fails(capsys, ["train", tmp_path / "nope.yaml"], f"hsd: error: config file not found: {tmp_path / 'nope.yaml'} "
           "(expected a YAML file of config keys")
    child = _yaml(tmp_path, "base: parent.yaml\nname: child\n", "child.yaml")
    _fails(capsys, ["train", child], f"config file not found: {tmp_path / 'parent.yaml'} (named by base: in {child}:1)")


# ---- values out of range (key=value overrides) ----

@pytest.mark.parametrize("overrides, message", [
    (["tscd.batch_size=-4"], "tscd.batch_size must be >= 1, got -4"),
    (["tscd.lr=-1"], "tscd.lr must be > 0, got -1.0"),
    (["tscd.stages.0.iterations=-5"], "tscd.stages.0.iterations must be >= 1, got -5"),
    (["tscd.ema_decay=1"], "tscd.ema_decay must be in [0, 1), got 1.0"),
    (["tscd.guidance_min=4", "tscd.guidance_max=3"], "tscd.guidance_min must not exceed tscd.guidance_max, got 4 > 3"),
    (["feedback.t_range=[0, 1000]"], "feedback.t_range.1 must be in [0, 1000), got 1000"),
    (["feedback.t_range=[500, 100]"], "feedback.t_range must be [t_left, t_right] with 0 <= t_left <= t_right < 1000"),
    (["tscd.stages.0.grid_steps=4"], "tscd.stages.0.grid_steps must be >= tscd.stages.0.k = 8"),
    (["trainer.logger=foo"], "trainer.logger must be one of 'tensorboard', 'csv', 'wandb', got 'foo'"),
    (["tscd.ema_decy=0.9"], "unknown config key 'tscd.ema_decy' in override 'tscd.ema_decy=0.9'; did you mean "
                            "'tscd.ema_decay'?"),
    (["tscd.lr=fast"], "override 'tscd.lr=fast': tscd.lr must be a number, got 'fast'"),
])
def test_bad_override_is_one_line_naming_key_value_and_range(capsys, overrides, message):
    _fails(capsys, ["train", *overrides], f"hsd: error: {message}")


def test_the_edges_of_each_range_are_accepted():
    from hsd.config import load_config
    cfg = load_config([], ["trainer.logger=wandb", "tscd.ema_decay=0", "tscd.guidance_min=0", "tscd.guidance_max=0",
                           "dmd.guidance=1.0", "dmd.timestep=0", "feedback.t_range=[999, 999]", "lab.tcd_eta=1",
                           "tscd.adv.renoise_max=0", "tscd.stages=[{k: 4, grid_steps: 4, iterations: 1}]"])
    assert (cfg.trainer.logger, cfg.feedback.t_range, cfg.tscd.stages[0].grid_steps) == ("wandb", [999, 999], 4)


# ---- missing or foreign files ----

def test_missing_lab_teacher(tmp_path, capsys):
    _fails(capsys, ["lab", "lab.teacher=/nope", f"out_dir={tmp_path}"],
           "hsd: error: lab teacher not found at /nope (it needs unet/ and world.safetensors); make it with "
           "`hsd lab-teacher --world NAME --out /nope`")


def test_junk_lora_for_lora_info(files, capsys):
    _fails(capsys, ["lora", "info", files / "junk.safetensors"],
           f"hsd: error: {files / 'junk.safetensors'} is not a readable safetensors file")


def test_missing_lora_for_lora_merge(files, tmp_path, capsys):
    _fails(capsys, ["lora", "merge", tmp_path / "missing.safetensors", files / "sd15_lora.safetensors",
                    "--out", tmp_path / "merged.safetensors"],
           f"hsd: error: LoRA file not found: {tmp_path / 'missing.safetensors'} (expected a .safetensors LoRA file")
    assert not (tmp_path / "merged.safetensors").exists()


def test_generate_sd15_lora_on_sdxl_model_names_the_architecture(files, tmp_path, capsys):
    _fails(capsys, ["generate", "--model", files / "sdxl", "--lora", files / "sd15_lora.safetensors",
                    "--prompt", "a", "--steps", "1", "--out", tmp_path / "out"],
           f"hsd: error: {files / 'sd15_lora.safetensors'}: module ",
           "has shape (64, 32) but this SDXL model's UNet needs (64, 64): the LoRA was trained for another "
           "architecture (e.g. an SD1.5 LoRA on an SDXL model)")
    assert not (tmp_path / "out").exists()


def test_generate_missing_model(tmp_path, capsys):
    _fails(capsys, ["generate", "--model", tmp_path / "nope", "--prompt", "a", "--steps", "1", "--out", tmp_path],
           f"hsd: error: model not found: {tmp_path / 'nope'} (expected a diffusers folder")


def _train(files, tmp_path, *extra):
    return ["train", "world=sd15", f"out_dir={tmp_path}", "name=run", "model.resolution=16",
            "tscd.stages=[{k: 1, grid_steps: 4, iterations: 1}]", "tscd.batch_size=1",
            "trainer.progress_bar=false", *extra]


def _nothing_started(tmp_path):
    """The run folder holds at most its config: no trainer was set up, no stage wrote anything."""
    return {p.name for p in (tmp_path / "run").glob("*")} <= {"config.yaml"}


def test_train_missing_model_folder(files, tmp_path, capsys):
    _fails(capsys, _train(files, tmp_path, "model.path=/nope", f"data.folder={files / 'images'}"),
           "hsd: error: model not found: /nope (expected a diffusers folder with model_index.json")
    assert _nothing_started(tmp_path)


def test_train_missing_lora_init(files, tmp_path, capsys):
    _fails(capsys, _train(files, tmp_path, f"model.path={files / 'sd15'}", f"data.folder={files / 'images'}",
                          f"model.lora_init={tmp_path / 'init.safetensors'}"),
           f"hsd: error: LoRA file not found: {tmp_path / 'init.safetensors'}")
    assert _nothing_started(tmp_path)



def test_missing_data_is_one_line_naming_the_path(tmp_path):
    from hsd.data.sources import FolderSource, ShardSource
    from hsd.errors import HsdError, MissingFileError
    with pytest.raises(MissingFileError, match=f"image folder not found: {tmp_path / 'nope'} \\(expected a folder"):
        FolderSource(str(tmp_path / "nope"))
    with pytest.raises(HsdError, match=f"no images \\(jpg, jpeg, png, webp\\) under {tmp_path}"):
        FolderSource(str(tmp_path))
    with pytest.raises(HsdError, match=f"no samples could be read from {tmp_path}/s-{{0..1}}.tar: shard "
                                       f"{tmp_path}/s-0.tar not found \\(nor are the other 1\\); expected webdataset"):
        ShardSource(f"{tmp_path}/s-{{0..1}}.tar")


def test_train_missing_data_folder(files, tmp_path, capsys):
    _fails(capsys, _train(files, tmp_path, f"model.path={files / 'sd15'}", f"data.folder={tmp_path / 'nope'}"),
           f"hsd: error: image folder not found: {tmp_path / 'nope'} (expected a folder of images")
    assert _nothing_started(tmp_path)


def test_train_missing_shards(files, tmp_path, capsys):
    shards = f"{tmp_path}/shard-{{000..003}}.tar"
    _fails(capsys, _train(files, tmp_path, f"model.path={files / 'sd15'}", f"data.shards={shards}"),
           f"hsd: error: no samples could be read from {shards}: shard {tmp_path}/shard-000.tar not found "
           "(nor are the other 3)")
    assert _nothing_started(tmp_path)


# ---- the terminal, and --debug ----

def test_a_subprocess_prints_one_line_and_no_traceback(tmp_path):
    bad = _yaml(tmp_path, "tscd:\n  lr: fast\n")
    env = {k: v for k, v in os.environ.items() if k != "HSD_DEBUG"}
    r = subprocess.run([sys.executable, "-m", "hsd.cli", "train", str(bad)], capture_output=True, text=True, cwd=ROOT,
                       env=env)
    assert (r.returncode, r.stdout, r.stderr) == (2, "", f"hsd: error: {bad}:2: tscd.lr must be a number, got 'fast'\n")


def test_debug_flag_and_env_reraise(tmp_path, capsys, monkeypatch):
    with pytest.raises(ConfigError, match="tscd.lr must be > 0"):
        main(["--debug", "train", "tscd.lr=-1"])
    monkeypatch.setenv("HSD_DEBUG", "1")
    with pytest.raises(ConfigError, match="tscd.batch_size must be >= 1"):
        main(["train", "tscd.batch_size=-4"])
    assert "hsd: error" not in capsys.readouterr().err
