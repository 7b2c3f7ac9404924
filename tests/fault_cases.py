"""Fault cases for the tools around training: generate, eval, lora info|merge|convert, memory, ablate, random-model,
lab-teacher and lab-worlds. Each is setup(world, tmp) -> (argv, pieces the error line must hold), run by
tests/test_faults.py with the same assertions as its own cases."""
import json
import shutil
from pathlib import Path


def _model_copy(w, tmp: Path) -> Path:
    model = tmp / "model"
    shutil.copytree(w.model, model)
    return model



def _generate(w, tmp, *extra):
    return ["generate", "--prompt", "a", "--steps", "1", "--out", str(tmp / "out"), *extra]


def c_generate_no_steps_and_no_preset(w, tmp):
    return (["generate", "--prompt", "a", "--out", str(tmp / "out"), "--model", str(w.model)],
            ["give --steps N [N ...] or a --preset (hyper-sd3-4"])


def c_generate_model_missing(w, tmp):
    return _generate(w, tmp, "--model", f"{tmp}/nope"), [f"model not found: {tmp}/nope"]


def c_generate_model_config_garbage(w, tmp):
    model = _model_copy(w, tmp)
    (model / "vae" / "config.json").write_bytes(b"\x00\x01")
    return _generate(w, tmp, "--model", str(model)), [f"{model}/vae", "cannot load AutoencoderKL"]


def c_generate_lora_garbage(w, tmp):
    return _generate(w, tmp, "--model", str(w.model), "--lora", str(w.junk)), [str(w.junk)]


def c_generate_lora_is_a_folder(w, tmp):
    return _generate(w, tmp, "--model", str(w.model), "--lora", str(tmp)), [str(tmp)]


def c_generate_unet_missing(w, tmp):
    return _generate(w, tmp, "--model", str(w.model), "--unet", f"{tmp}/unet"), [f"UNet not found: {tmp}/unet"]


def c_generate_controlnet_missing(w, tmp):
    return (_generate(w, tmp, "--model", str(w.model), "--controlnet", f"{tmp}/cn", "--control-image", str(w.png)),
            [f"ControlNet {tmp}/cn not found"])


def c_generate_control_image_garbage(w, tmp):
    (tmp / "bad.png").write_bytes(b"not an image")
    return (_generate(w, tmp, "--model", str(w.model), "--controlnet", f"{tmp}/cn", "--control-image",
                      str(tmp / "bad.png")), [f"cannot read the control image {tmp / 'bad.png'}"])


def c_generate_prompts_binary(w, tmp):
    return (["generate", "--model", str(w.model), "--prompts", str(w.binary), "--steps", "1", "--out", str(tmp)],
            [f"prompt file {w.binary} is not UTF-8 text"])


def c_generate_prompts_is_a_folder(w, tmp):
    return (["generate", "--model", str(w.model), "--prompts", str(tmp), "--steps", "1", "--out", str(tmp)],
            [f"prompt file is a folder, not a file: {tmp}"])


def c_generate_out_is_a_file(w, tmp):
    return ["generate", "--model", str(w.model), "--prompt", "a", "--steps", "1", "--out", str(w.file)], \
        [f"--out (the image folder) {w.file} is a file, not a folder"]


def _eval(w, tmp, *extra):
    """An eval whose scorer weights folder exists (its contents are read only after the specs' files are checked)."""
    (tmp / "scorers").mkdir(exist_ok=True)
    return ["eval", "--weights", str(tmp / "scorers"), "--out", str(tmp / "out"), *extra]


def c_eval_weights_missing(w, tmp):
    return (["eval", "--weights", str(tmp / "scorers"), "--out", str(tmp / "out"), "--prompts", str(w.prompts),
             "--model", str(w.model)], [f"scorer weights folder not found: {tmp / 'scorers'}"])


def c_eval_coco_garbage(w, tmp):
    (tmp / "coco.json").write_text(json.dumps({"images": "none"}))
    return (_eval(w, tmp, "--coco", str(tmp / "coco.json"), "--model", str(w.model)),
            [f"{tmp / 'coco.json'} is not a COCO captions file"])


def c_eval_spec_garbage(w, tmp):
    return _eval(w, tmp, "--prompts", str(w.prompts), "--spec", str(w.binary)), [f"{w.binary}: not a YAML file"]


def c_eval_spec_model_missing(w, tmp):
    (tmp / "spec.yaml").write_text(f"specs:\n  - {{name: a, model: {w.model}, steps: 1}}\n"
                                   f"  - {{name: b, model: {tmp}/nope, steps: 1}}\n")
    return (_eval(w, tmp, "--prompts", str(w.prompts), "--spec", str(tmp / "spec.yaml")),
            [f"model of spec 'b' not found: {tmp}/nope"])


def c_eval_out_under_a_file(w, tmp):
    return (["eval", "--weights", str(tmp), "--out", f"{w.file}/out", "--prompts", str(w.prompts), "--model",
             str(w.model)], [f"{w.file}/out", "is a file, not a folder"])


def c_lora_info_missing(w, tmp):
    return ["lora", "info", f"{tmp}/x.safetensors"], [f"LoRA file not found: {tmp}/x.safetensors"]


def c_lora_info_torn(w, tmp):
    return ["lora", "info", str(w.torn)], [f"{w.torn} is not a readable safetensors file"]


def c_lora_info_folder(w, tmp):
    return ["lora", "info", str(tmp)], [f"LoRA file {tmp} is a folder"]


def c_lora_merge_out_under_a_file(w, tmp):
    return (["lora", "merge", str(w.lora), "--out", f"{w.file}/m.safetensors"],
            [f"{w.file}/m.safetensors cannot be created", "is a file, not a folder"])


def c_lora_merge_input_garbage(w, tmp):
    return ["lora", "merge", str(w.lora), str(w.junk), "--out", str(tmp / "m.safetensors")], [str(w.junk)]


def c_lora_merge_unet_into_a_foreign_folder(w, tmp):
    (tmp / "mine.txt").write_text("keep me")
    return (["lora", "merge", str(w.lora), "--unet", str(w.model), "--out", str(tmp)],
            [f"{tmp} holds other files", "replaced whole"])


def c_lora_convert_missing(w, tmp):
    return (["lora", "convert", f"{tmp}/x.safetensors", "--out", str(tmp / "y"), "--format", "kohya"],
            [f"LoRA file not found: {tmp}/x.safetensors"])


def c_lora_convert_out_is_a_folder(w, tmp):
    return (["lora", "convert", str(w.lora), "--out", str(tmp), "--format", "kohya"],
            [f"--out (the converted LoRA file) {tmp} is a folder, not a file"])


def c_memory_missing_config(w, tmp):
    return ["memory", f"{tmp}/x.yaml"], [f"config file not found: {tmp}/x.yaml"]


def c_memory_garbage_config(w, tmp):
    return ["memory", str(w.binary)], [f"{w.binary}: not a text file"]


def c_memory_zero_gpus(w, tmp):
    root = Path(__file__).resolve().parent.parent
    return ["memory", str(root / "experiments/sd15/tscd.yaml"), "--gpus", "0"], ["--gpus must be at least 1"]


def c_ablate_out_under_a_file(w, tmp):
    root = Path(__file__).resolve().parent.parent
    return (["ablate", str(root / "experiments/lab/tscd.yaml"), "--out", f"{w.file}/abl"],
            [f"{w.file}/abl cannot be created"])


def c_ablate_missing_config(w, tmp):
    return ["ablate", f"{tmp}/x.yaml", "--out", str(tmp)], [f"config file not found: {tmp}/x.yaml"]


def c_ablate_summary_without_runs(w, tmp):
    root = Path(__file__).resolve().parent.parent
    return (["ablate", str(root / "experiments/lab/tscd.yaml"), "--seeds", "0", "--out", str(tmp), "--summary-only"],
            [f"{tmp}/tscd_seed0/table.csv not found"])


def c_random_model_unknown_arch(w, tmp):
    return ["random-model", "tiny-sd9", str(tmp / "m")], ["unknown architecture 'tiny-sd9'"]


def c_random_model_out_under_a_file(w, tmp):
    return ["random-model", "tiny-sd15", f"{w.file}/m"], [f"{w.file}/m cannot be created"]


def c_random_model_into_a_foreign_folder(w, tmp):
    (tmp / "mine.txt").write_text("keep me")
    return ["random-model", "tiny-sd15", str(tmp)], [f"{tmp} holds other files (no model_index.json)"]


def c_lab_teacher_out_under_a_file(w, tmp):
    return (["lab-teacher", "--world", "blocks", "--out", f"{w.file}/t", "--steps", "1"],
            [f"{w.file}/t cannot be created"])


def c_lab_teacher_zero_steps(w, tmp):
    return ["lab-teacher", "--out", str(tmp / "t"), "--steps", "0"], ["--steps and --batch must be at least 1"]


def c_lab_teacher_into_a_foreign_folder(w, tmp):
    (tmp / "mine.txt").write_text("keep me")
    return ["lab-teacher", "--out", str(tmp), "--steps", "1"], [f"{tmp} holds other files (no world.safetensors)"]


def c_lab_worlds_negative_guidance(w, tmp):
    return ["lab-worlds", "--guidance", "-1"], ["--guidance must be >= 0"]
