"""The lab's verdicts: the paired t-test and the FDR step agree with scipy on fixed numbers, a null shows no
significant cell (simulated, and two identical lab arms end to end), a planted effect is found, and the
evaluation set is drawn per seed."""
import csv
import math
import random
import shutil
import statistics
from pathlib import Path

import pytest
import torch
from scipy import stats

from hsd.ablate import ablate, comparisons, paired_tests, summary, table_rows
from hsd.lab.evaluate import LabEvaluator, eval_seeds
from hsd.lab.teacher import load_teacher, teacher_path
from hsd.stats import paired, q_values, with_q

BASE = [0.140, 0.131, 0.152, 0.128, 0.149]
OTHER = [0.101, 0.119, 0.117, 0.108, 0.125]


def test_paired_test_is_scipys():
    t = paired(BASE, OTHER)
    ref = stats.ttest_rel(OTHER, BASE)
    low, high = ref.confidence_interval(0.95)
    assert t.n == 5 and t.mean == pytest.approx(statistics.fmean(OTHER) - statistics.fmean(BASE), abs=1e-15)
    assert t.p == pytest.approx(ref.pvalue, rel=1e-12)
    assert (t.low, t.high) == (pytest.approx(low, rel=1e-12), pytest.approx(high, rel=1e-12))
    assert t.p == pytest.approx(0.00619, abs=5e-5)  # by hand: mean -0.0260, sd 0.01102, t = -5.27 at 4 df


def test_degenerate_pairs():
    assert paired(BASE, BASE).p == 1.0  # identical arms: no evidence at all
    assert paired(BASE, [b + 0.01 for b in BASE]).p == 0.0  # a constant shift: certain
    with pytest.raises(ValueError, match="two equal lists"):
        paired(BASE, OTHER[:3])


def test_q_values_are_benjamini_hochberg():
    p = [0.01, 0.04, 0.03, 0.5]
    # by hand: sorted p_(i) * m / i = 0.04, 0.06, 0.0533, 0.5; then the running minimum from the top
    assert q_values(p) == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.5])
    assert q_values(p) == pytest.approx(list(stats.false_discovery_control(p, method="bh")))
    tests = with_q([paired(BASE, OTHER), paired(BASE, BASE)])  # two cells: q = 2 p for the smaller, 1 for p = 1
    assert [t.q for t in tests] == pytest.approx([2 * tests[0].p, 1.0])


def test_the_paired_t_test_holds_its_level_where_two_standard_errors_did_not():
    """2,000 null cells at 5 seeds: the paired t-test rejects at its 5 %; the old cut (|difference| > 2 Welch
    standard errors) at about 8 %, and more at fewer seeds."""
    rng = random.Random(0)
    t_hits = se_hits = 0
    for _ in range(2000):
        seed_effect = [rng.gauss(0, 1) for _ in range(5)]  # shared by the arms of one seed
        a = [s + rng.gauss(0, 0.3) for s in seed_effect]
        b = [s + rng.gauss(0, 0.3) for s in seed_effect]
        t_hits += paired(a, b).p < 0.05
        a, b = [rng.gauss(0, 1) for _ in range(5)], [rng.gauss(0, 1) for _ in range(5)]  # nothing shared
        se = math.sqrt(statistics.variance(a) / 5 + statistics.variance(b) / 5)
        se_hits += abs(statistics.fmean(b) - statistics.fmean(a)) > 2 * se
    assert 0.035 < t_hits / 2000 < 0.065
    assert se_hits / 2000 > 0.065  # the old cut-off, even at its best (nothing shared), is no 5 % test
    assert 2 * stats.t.sf(2, 4) == pytest.approx(0.116, abs=1e-3)  # 2 SE at 4 df: an 11.6 % test


def _tables(tmp_path, arm: str, effect: dict[tuple[int, str], float], seeds=5, noise=0.004):
    """Simulated lab tables: a per-seed effect shared by both arms (init, batches, evaluation set), each arm's own
    noise, and `effect` {(steps, metric): shift} added to this arm's LoRA rows."""
    out = []
    for seed in range(seeds):
        rng, shared = random.Random(f"{arm}{seed}"), random.Random(seed)
        rows = [["Data (exact samples)", 0, "exact", 0.068 + shared.gauss(0, 0.003), 0.98]]
        for steps in (1, 2, 4, 8):
            row = {"swd": 0.1 / steps, "precision": 0.3}
            for m in row:
                row[m] += shared.gauss(0, 0.02) + rng.gauss(0, noise) + effect.get((steps, m), 0.0)
            rows.append([f"TSCD stage k={steps}", steps, "DDIM trailing", row["swd"], row["precision"]])
        path = tmp_path / f"{arm}{seed}.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["model", "steps", "scheduler", "swd", "precision"])
            w.writerows(rows)
        out.append(table_rows(path))
    return out


def test_a_null_marks_nothing_and_a_planted_effect_is_found(tmp_path):
    base = _tables(tmp_path, "a", {})
    null = {"b": _tables(tmp_path, "b", {}), "c": _tables(tmp_path, "c", {})}
    tests = paired_tests({"a": base, **null})
    assert len(tests) == 2 * 4 * 2  # arms x LoRA rows x metrics present; stage rows are not counted twice
    assert not any(t.significant(0.05) for t in tests.values())
    planted = _tables(tmp_path, "d", {(4, "swd"): 0.02, (1, "precision"): -0.03})  # 5 and 7.5 x the arm noise
    tests = paired_tests({"a": base, **null, "d": planted})
    found = {(arm, key[1], c) for (arm, key, c), t in tests.items() if t.significant(0.05)}
    assert found == {("d", 4, "swd"), ("d", 1, "precision")}
    md = comparisons({"a": base, "d": planted})
    line = next(ln for ln in md.splitlines() if ln.startswith("| d | LoRA for k steps | 4 |"))
    assert line.split("|")[5].strip().startswith("**+0.02")  # SWD data: bold, with its interval, p and q


def test_summary_reports_the_reference_rows_once_with_their_spread(tmp_path):
    a, b = _tables(tmp_path, "a", {}), _tables(tmp_path, "b", {})
    md = summary({"a": a, "b": b}, list(range(5)))
    refs = [ln for ln in md.splitlines() if "Data (exact samples)" in ln]
    assert len(refs) == 1 and refs[0].startswith("| reference | Data (exact samples) | — |")
    precision, swd = [c for c in refs[0].split("|") if "±" in c]  # the two columns the tables have
    sd = float(swd.split("±")[1])
    assert 0.0005 < sd < 0.01  # the evaluation draw's spread over seeds, not 0


def test_an_arm_that_changes_the_teacher_shows_its_own_teacher_rows(tmp_path):
    """A reference row that differs from the first arm's (the teacher of a model.quantize arm) is the arm's own."""
    a, b = _tables(tmp_path, "a", {}), _tables(tmp_path, "b", {})
    key = ("Data (exact samples)", 0, "exact")
    for r in b:
        r[key] = {k: v + 0.5 for k, v in r[key].items()}  # as a quantized teacher's rows differ
    rows = [ln for ln in summary({"a": a, "b": b}, list(range(5))).splitlines() if "Data (exact samples)" in ln]
    assert [ln.split("|")[1].strip() for ln in rows] == ["reference", "b"]


def test_each_lora_is_compared_as_the_paper_uses_it(tmp_path):
    """The stage-k LoRA at k steps against a one-stage arm's final LoRA at k steps."""
    def table(path, rows):
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["model", "steps", "scheduler", "swd", "precision"])
            w.writerows(rows)
        return table_rows(path)

    tscd = table(tmp_path / "t.csv", [["Teacher", 4, "DDIM trailing, CFG 3", 0.1, 0.5],
                                     ["TSCD stage k=4", 4, "DDIM trailing", 0.2, 0.5],
                                     ["TSCD stage k=1", 1, "DDIM trailing", 0.3, 0.5],
                                     ["TSCD final (k=1)", 4, "DDIM trailing", 0.9, 0.5]])
    one = table(tmp_path / "o.csv", [["TSCD stage k=1", 1, "DDIM trailing", 0.3, 0.5],
                                    ["TSCD final (k=1)", 4, "DDIM trailing", 0.4, 0.5]])
    assert tscd[("LoRA for k steps", 4, "DDIM trailing")]["swd"] == 0.2  # the stage-4 LoRA, not the final one
    assert one[("LoRA for k steps", 4, "DDIM trailing")]["swd"] == 0.4
    assert tscd[("Teacher", 4, "DDIM trailing, CFG 3")]["swd"] == 0.1  # kept: a reference row


def test_the_evaluation_set_is_drawn_per_seed():
    teacher = load_teacher(teacher_path("blocks"))
    from hsd.config import Lab
    cfg = Lab(world="blocks", eval_per_class=2)
    a, b, a2 = (LabEvaluator(teacher.world, teacher, cfg, seed) for seed in (0, 1, 0))
    assert torch.equal(a.x_T, a2.x_T) and torch.equal(a.truth.data, a2.truth.data)
    assert not torch.equal(a.x_T, b.x_T) and not torch.equal(a.truth.data, b.truth.data)
    assert not torch.equal(a.truth.directions, b.truth.directions)
    assert len(set(eval_seeds(0).values())) == 3 and eval_seeds(0) != eval_seeds(1)


def test_two_identical_lab_arms_show_no_significant_cell(tmp_path):
    """End to end through `hsd ablate`, seeds 0-4: a second arm with identical settings is the same run at every
    seed (its folders are the first arm's, as `hsd ablate` would reuse them), so every difference is exactly 0,
    p = 1 and nothing is bold."""
    config = Path(__file__).resolve().parents[1] / "experiments/lab/tscd.yaml"
    for name in ("same_a", "same_b"):
        (tmp_path / f"{name}.yaml").write_text(f"base: {config}\n")
    tiny = ["lab.world=blocks", "tscd.stages=[{k: 2, grid_steps: 8, iterations: 2}]", "tscd.batch_size=8",
            "lab.eval_per_class=2", "lab.student_steps=[1]", "trainer.progress_bar=false", "lab.teacher_steps=4"]
    seeds, out = [0, 1, 2, 3, 4], tmp_path / "runs"
    ablate([str(tmp_path / "same_a.yaml")], seeds, tiny, out)
    for seed in seeds:
        shutil.copytree(out / f"same_a_seed{seed}", out / f"same_b_seed{seed}")
    md = ablate([str(tmp_path / f"{n}.yaml") for n in ("same_a", "same_b")], seeds, tiny, out, summary_only=True)
    rows = [ln for ln in md.split("Differences against")[1].splitlines() if ln.startswith("| same_b |")]
    assert rows and "**" not in "".join(rows)
    assert all("p=1.000" in cell for ln in rows for cell in ln.split("|")[5:-1])


def test_ablate_reuses_a_finished_seed_only_under_the_same_config(tmp_path, monkeypatch):
    """A run folder with its table.csv and a config.yaml equal to the config of this call is reused without training
    (a sweep spans sessions by keeping those two files); any other setting trains again."""
    import hsd.ablate as ab
    config = Path(__file__).resolve().parents[1] / "experiments/lab/tscd.yaml"
    tiny = ["lab.world=blocks", "tscd.stages=[{k: 2, grid_steps: 8, iterations: 2}]", "tscd.batch_size=8",
            "lab.eval_per_class=2", "lab.student_steps=[1]", "trainer.progress_bar=false", "lab.teacher_steps=4"]
    out = tmp_path / "runs"
    first = ab.ablate([str(config)], [0], tiny, out)
    for p in (out / "tscd_seed0").iterdir():  # keep only what a commit keeps
        if p.name not in ("table.csv", "config.yaml"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    calls = []
    monkeypatch.setattr(ab, "run", lambda cfg: calls.append(cfg.name))
    assert ab.ablate([str(config)], [0], tiny, out) == first and calls == []
    ab.ablate([str(config)], [0], [*tiny, "lora.rank=2"], out)
    assert calls == ["tscd_seed0"]


def test_a_saved_config_is_read_onto_todays_schema():
    """A run saved before a key existed (here model.t5) is the same run under that key's default, and so is one
    saved with another progress bar or logger, or in another folder (a committed run copied into another sweep); a
    changed value, or a key the schema no longer has, is not."""
    from hsd.ablate import same_settings
    from hsd.config import config_yaml, load_config
    config = Path(__file__).resolve().parents[1] / "experiments/lab/tscd.yaml"
    cfg = load_config([str(config)], ["trainer.progress_bar=false"])
    saved = config_yaml(cfg)
    assert "  t5: false\n" in saved and "  progress_bar: false\n" in saved
    assert same_settings(saved, cfg)
    assert same_settings(saved.replace("  t5: false\n", ""), cfg)
    assert same_settings(saved.replace("progress_bar: false", "progress_bar: true"), cfg)
    assert same_settings(config_yaml(load_config([str(config)], ["out_dir=elsewhere", "name=copied"])), cfg)
    assert same_settings(saved.replace("  quantize: none\n", ""), cfg)  # saved before model.quantize existed
    assert not same_settings(saved.replace("  quantize: none\n", "  quantize: int8\n"), cfg)
    assert not same_settings(saved.replace("  t5: false\n", "  t5: true\n"), cfg)
    assert not same_settings(saved.replace("  t5: false\n", "  t5: false\n  retired_key: 1\n"), cfg)
    assert not same_settings(config_yaml(load_config([str(config)], ["seed=3"])), cfg)
