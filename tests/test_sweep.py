"""The experiment configs and ``python -m lightning_app sweep``: each row's config parses with its own knobs, the
table's numbers are the reports' numbers (mean and sample std), seeds reach the runs, a finished run is not redone."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml

from lightning_app.sweep import row_metrics, summarise
from tests.test_cli_runs import REPO, _run, _small

EXPERIMENTS = sorted((REPO / "configs" / "experiments").glob("*.yaml"))


def _config(path: Path) -> dict:
    return yaml.safe_load(_run(["fit", "--config", str(path), "--print_config"]).stdout)


@pytest.mark.slow  # one --print_config per experiment: ~1.5 min
def test_experiment_rows_set_their_own_knobs() -> None:
    assert {p.stem for p in EXPERIMENTS} >= {"baseline", "gate", "word", "word_decoding", "combination"}
    demo = _config(REPO / "configs" / "demo.yaml")
    for path in EXPERIMENTS:
        config = _config(path)
        assert config["run_name"] == path.stem
        model, data = config["model"]["init_args"], config["data"]["init_args"]
        base = demo["model"]["init_args"]
        assert config["trainer"]["max_steps"] == demo["trainer"]["max_steps"]  # same budget for every row
        assert data["world"] == demo["data"]["init_args"]["world"]  # same world
        objective, grounding = model["objective"], model["grounding"]
        if path.stem == "baseline":
            assert not grounding["enabled"] and not any(v for k, v in objective.items() if k.startswith("lambda"))
        if path.stem.startswith("word") or path.stem == "combination":
            assert grounding["word_score"] and objective["lambda_word"] == base["objective"]["lambda_word"] > 0
            assert objective["word_embedding_grad"] is (path.stem != "word_fixed_embeddings")
        if path.stem.startswith("presence"):
            at_grounded = path.stem == "presence_grounded_max"
            assert objective["lambda_presence"] > 0 and not objective["lambda_word"] and not grounding["word_score"]
            assert grounding["enabled"] is at_grounded
            assert objective["presence_site"] == ("grounded" if at_grounded else "lm_input")
            assert objective["presence_pool"] == ("max" if path.stem.endswith("max") else "mean")
        if path.stem.startswith("gate"):
            assert not grounding["word_score"] and objective["lambda_grounding"] > 0
        assert (model["generation"]["method"] == "grounded") == (path.stem in ("word_decoding", "combination"))
        assert (data.get("cooccurrence") is not None) == ("cooccurrence" in path.stem or path.stem == "combination")


def test_table_is_mean_and_sample_std_of_the_reports() -> None:
    def report(chair_i: float, knife: float) -> dict:
        return {"chair": {"CHAIRs": 0.5, "CHAIRi": chair_i, "Recall": 0.9},
                "pope": {"pope": {"accuracy": 0.8, "f1": 0.75}},
                "probes": {"fork->knife": {"rate_absent_with_anchor": knife, "rate_absent_elsewhere": 0.0,
                                           "recall_when_present": 1.0}},
                "timing": {"s_per_100_captions": 10 * chair_i}}

    rows = {"a": [row_metrics(report(0.10, 0.8), None, 100.0), row_metrics(report(0.20, 0.6), None, 120.0)]}
    assert rows["a"][0]["CHAIRi"] == 0.10 and rows["a"][1]["absent_with_anchor"] == 0.6
    line = summarise(rows).splitlines()[2]
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[0] == "a" and cells[1] == "2"
    assert cells[3] == f"{15.0:.1f} ± {statistics.stdev([10.0, 20.0]):.1f}"  # CHAIRi in percent
    assert cells[7] == f"{70.0:.1f} ± {statistics.stdev([80.0, 60.0]):.1f}"  # companion named where absent
    assert cells[13] == f"{1.5:.1f} ± {statistics.stdev([1.0, 2.0]):.1f}"  # decoding seconds per 100 captions
    assert cells[14] == f"{110.0:.1f} ± {statistics.stdev([100.0, 120.0]):.1f}"  # wall seconds
    assert cells[10:13] == ["n/a"] * 3  # no analysis.json: no AUROC


def test_table_reads_the_aurocs_of_analysis_json() -> None:
    report = {"chair": {"CHAIRs": 0.5, "CHAIRi": 0.1, "Recall": 0.9}}
    analysis = {"chair_mode": "lemma", "detection": {"auroc": 0.875},
                "mentions": {"reference": {"auroc": {"G_own/L3": 0.1, "lm_logprob": 0.2}},
                             "lemma": {"auroc": {"G_own/L3": 0.25, "G_own/L11": 0.625, "lm_logprob": None}}}}
    rows = {"r": [row_metrics(report, analysis, 1.0), row_metrics(report, {**analysis, "detection": {"auroc": 0.625}}, 1.0)]}
    assert rows["r"][0]["detection_auroc"] == 0.875 and rows["r"][0]["mention_auroc_G"] == 0.625  # deepest layer
    assert rows["r"][0]["mention_auroc_lm"] != rows["r"][0]["mention_auroc_lm"]  # null (no hallucination): NaN
    cells = [c.strip() for c in summarise(rows).splitlines()[2].split("|")[1:-1]]
    assert cells[10:13] == [f"0.75 ± {statistics.stdev([0.875, 0.625]):.2f}", "0.62 ± 0.00", "n/a"]


def test_sweep_runs_every_seed_once(tmp_path: Path) -> None:
    small = _small(tmp_path, "unused", steps=2, every=2)
    pairs = dict(zip(small[::2], small[1::2]))
    for flag in ("--run_name", "--trainer.default_root_dir"):  # the sweep sets these itself
        pairs.pop(flag)
    extra = [x for pair in pairs.items() for x in pair] + ["--data.init_args.max_val_images", "4"]
    root = tmp_path / "sweep"
    _run(["sweep", str(REPO / "configs" / "experiments" / "word.yaml"), "--seeds", "0", "1", "--root", str(root),
          "--", *extra])
    table = (root / "results.md").read_text().splitlines()
    assert len(table) == 3 and table[2].startswith("| word | 2 |")
    for seed in (0, 1):
        (version,) = (root / f"word_s{seed}").glob("version_*")
        config = yaml.safe_load((version / "config.yaml").read_text())
        assert config["seed_everything"] == seed and config["data"]["init_args"]["seed"] == seed
        assert config["data"]["init_args"]["demo_backbone"]["seed"] == seed
    (root / "word_s0" / "version_7").mkdir()  # as analyze leaves one: no report, must not hide the fit's
    (root / "word_s0" / "version_7" / "analysis.json").write_text(json.dumps({"detection": {"auroc": 0.75}}))
    stamp = (root / "word_s0" / "sweep.json").stat().st_mtime_ns
    results = json.loads((root / "results.json").read_text())
    _run(["sweep", str(REPO / "configs" / "experiments" / "word.yaml"), "--seeds", "0", "--root", str(root),
          "--methods", "greedy,vcd", "--", *extra])
    assert (root / "word_s0" / "sweep.json").stat().st_mtime_ns == stamp  # not fitted again
    again = json.loads((root / "results.json").read_text())
    assert again["word"][0] == pytest.approx({**results["word"][0], "detection_auroc": 0.75}, nan_ok=True)
    # --methods: the same last checkpoint validated per method; greedy repeats the fit's own validation
    fitted = root / "word_s0" / "version_0"
    for method in ("greedy", "vcd"):
        (version,) = (root / f"word_s0.{method}").glob("version_*")
        report = json.loads((version / "report.json").read_text())
        assert report["settings"]["generation"]["method"] == method
        assert report["timing"]["captions"] == 4 and report["timing"]["caption_s"] > 0
        assert again[f"word.{method}"][0]["s_per_100_captions"] == pytest.approx(100 * report["timing"]["caption_s"] / 4)
    greedy = json.loads((next((root / "word_s0.greedy").glob("version_*")) / "report.json").read_text())
    assert greedy["chair"] == json.loads((fitted / "report.json").read_text())["chair"]
    bad = _run(["sweep", str(REPO / "configs" / "experiments" / "word.yaml"), "--root", str(root), "--methods", "vcd,nope"],
               check=False)
    assert bad.returncode != 0 and "nope" in bad.stderr and "opera" in bad.stderr


def test_merged_config_follows_bases_like_the_cli() -> None:
    """Tools that read a config without the CLI (memory_plan.py, sweep) see the overlay merged onto its bases."""
    from lightning_app.suite_cli import merged_config

    big, base = merged_config(REPO / "configs" / "llava13b.yaml"), merged_config(REPO / "configs" / "llava7b.yaml")
    assert big["model"]["init_args"]["lora"] == base["model"]["init_args"]["lora"]  # only in the base
    assert big["model"]["init_args"]["backbone"] != base["model"]["init_args"]["backbone"]  # the overlay's own
    combo = merged_config(REPO / "configs" / "experiments" / "combination.yaml")
    assert combo["run_name"] == "combination" and combo["model"]["init_args"]["objective"]["lambda_word"] == 1.0
    assert combo["data"]["init_args"]["world"]["root"] == "data/world"  # from demo.yaml, three bases down
