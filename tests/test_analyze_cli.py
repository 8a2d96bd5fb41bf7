"""``python -m lightning_app analyze`` end to end: on tiny substitutes under the real-model configs (every backbone
family), on the demo config with a model taught one caption (its mentions, figures and files), its bad-input errors,
and the report's grounding diagnostics after ``validate``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning
import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule
from PIL import Image

from datamodules.world import WorldConfig, generate_world
from lightning_app.analyze import _parser, main, run
from lightning_app.suite_cli import SuiteCLI
from metrics.chair_gt import build_coco_ground_truth
from models import gate_modules
from models.tiny import write_tiny_backbone
from models.training import model_inputs

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {  # real-model config -> tiny substitute family (8 text layers: the configs ground the last 8)
    "llava7b.yaml": "llava",
    "blip2_opt2.7b.yaml": "blip2_opt",
    "blip2_flant5xl.yaml": "blip2_t5",
    "instructblip_vicuna7b.yaml": "instructblip_llama",
    "instructblip_flant5xl.yaml": "instructblip_t5",
}
CAPTION = "a picture of forks and one knife."
WORLD = {"num_train": 16, "num_val": 6}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("analyze") / "world"
    generate_world(WorldConfig(root=str(root), **WORLD))
    return root


def _version(root: Path) -> Path:
    return sorted(root.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))[-1]


def _family_args(config: str, world: Path, tiny: Path, root: Path) -> list[str]:
    """A real-model config on a tiny substitute, the world's data, CPU."""
    return [
        "--config", str(REPO / "configs" / config),
        "--model.init_args.backbone", str(tiny), "--model.init_args.dtype", "float32",
        "--model.init_args.grounding.word_score", "true",
        "--model.init_args.generation.caption_max_new_tokens", "6",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
        "--trainer.default_root_dir", str(root),
        "--data.init_args.coco_dir", str(world), "--data.init_args.image_dir", str(world / "images"),
        "--data.init_args.train_split", "train", "--data.init_args.val_split", "val",
        "--data.init_args.val_image_ids", "null", "--data.init_args.val_question_files", "null",
        "--data.init_args.num_workers", "0", "--data.init_args.val_batch_size", "4",
    ]


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_analyze_writes_its_files_on_every_backbone_family(config: str, world: Path, tmp_path: Path) -> None:
    captions = json.loads((world / "annotations" / "captions_train.json").read_text())["annotations"]
    tiny = write_tiny_backbone(CONFIGS[config], tmp_path / "tiny", [c["caption"] for c in captions], text_layers=8)
    main([*_family_args(config, world, tiny, tmp_path / "runs"), "--ckpt_path", "none", "--examples", "2",
          "--probe_folds", "2"])
    run_dir = _version(tmp_path / "runs" / "grounded")
    payload = json.loads((run_dir / "analysis.json").read_text())
    assert payload["images"] == 6 and payload["grounding"]["layers"] == list(range(8))
    assert payload["seconds"]["per_100_images"] > 0
    expected = {"lm_logprob", "word_z", "G_own/L7", "G_pred/L0", "gate_pred/L7", "image_attention/L7"}
    assert expected <= set(payload["signals"])
    assert payload["probe"]["sites"] == ["lm_input", *(f"L{i}" for i in range(8))]
    assert payload["detection"]["n_present"] > 0 and payload["detection"]["n_absent"] > 0
    rows = [json.loads(line) for line in (run_dir / "mentions.jsonl").read_text().splitlines()]
    assert len((run_dir / "captions.jsonl").read_text().splitlines()) == 6
    for mode in ("reference", "lemma"):
        block = payload["mentions"][mode]
        assert block["n_present"] + block["n_hallucinated"] == sum(r["mode"] == mode for r in rows)
    report = (run_dir / "report.md").read_text()
    assert "captions" in payload["figures"]
    for path in payload["figures"].values():
        assert (run_dir / path).stat().st_size > 1000 and f"]({path})" in report


def test_analyze_reads_a_lora_adapter_without_a_checkpoint(world: Path, tmp_path: Path) -> None:
    """``--model.init_args.adapter RUN_DIR/adapter`` (what a LoRA run exports) instead of ``--ckpt_path``."""
    tiny = write_tiny_backbone("llava", tmp_path / "tiny", ["a fork and a knife"], text_layers=8)
    args = _family_args("llava7b.yaml", world, tiny, tmp_path / "runs")
    module = _cli(args).model
    module.configure_model()
    with torch.no_grad():  # trained-looking gates, so that loading them is visible
        for name, param in module.model.named_parameters():
            if "grounding_gate" in name and name.endswith("bias"):
                param.fill_(-1.5)
    module.model.save_pretrained(tmp_path / "adapter")
    cli = _cli([*args, "--model.init_args.adapter", str(tmp_path / "adapter")])
    options = _parser().parse_args(["--examples", "1", "--probe_folds", "2"])
    run_dir = tmp_path / "analysis"
    payload = run(cli.model, cli.datamodule, run_dir, torch.device("cpu"), options, checkpoint=None)
    assert payload["adapter"] == str(tmp_path / "adapter") and payload["checkpoint"] is None
    biases = [float(gate.bias.detach()) for gate in gate_modules(cli.model.model).values()]
    assert biases == [-1.5] * 8  # the adapter's gates, not fresh ones
    assert json.loads((run_dir / "analysis.json").read_text())["images"] == 6


def _demo_args(world: Path, root: Path, *extra: str) -> list[str]:
    return ["--config", str(REPO / "configs" / "demo.yaml"), "--data.init_args.world.root", str(world),
            "--data.init_args.world.num_train", str(WORLD["num_train"]),
            "--data.init_args.world.num_val", str(WORLD["num_val"]),
            "--data.init_args.batch_size", "4", "--data.init_args.val_batch_size", "4",
            "--data.init_args.max_val_questions", "4", "--trainer.default_root_dir", str(root),
            "--trainer.enable_progress_bar", "false", *extra]


def _cli(args: list[str]) -> SuiteCLI:
    return SuiteCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                    args=args, run=False, save_config_callback=None)


@pytest.fixture(scope="module")
def taught(world: Path, tmp_path_factory) -> dict:
    """The demo model taught to caption every image with CAPTION (a few steps on four rows): its mentions name a
    fork and a knife, present in some images and absent from others. Saved as ModelCheckpoint saves it."""
    root = tmp_path_factory.mktemp("demo")
    cli = _cli(_demo_args(world, root))
    module, data = cli.model, cli.datamodule
    data.prepare_data()
    data.setup("fit")
    module.configure_model()
    rows = [{**r, "target": CAPTION, "pos_spans": [], "neg_text": "", "pixels": Image.open(r["image"]).convert("RGB")}
            for r in data.train_rows if r["kind"] == "caption"][:4]
    batch = data.train_dataloader().collate_fn(rows)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(40):
        loss = module.model(**model_inputs(batch), labels=batch["labels"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                  "pytorch-lightning_version": lightning.__version__}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, root / "taught.ckpt")
    return {"root": root, "ckpt": root / "taught.ckpt", "word_score": module.grounding.word_score}


def test_analyze_of_a_taught_model_finds_its_mentions(world: Path, taught: dict) -> None:
    main([*_demo_args(world, taught["root"]), "--ckpt_path", str(taught["ckpt"]), "--examples", "4"])
    run_dir = _version(taught["root"] / "grounded")
    payload = json.loads((run_dir / "analysis.json").read_text())
    captions = [json.loads(line) for line in (run_dir / "captions.jsonl").read_text().splitlines()]
    assert [c["caption"] for c in captions] == [CAPTION] * 6
    rows = [json.loads(line) for line in (run_dir / "mentions.jsonl").read_text().splitlines()]
    for mode in ("reference", "lemma"):
        truth = build_coco_ground_truth(world, mode=mode, use_cache=False)
        expected = [(c["image_id"], name, name in truth[c["image_id"]]) for c in captions for name in ("fork", "knife")]
        assert [(r["image_id"], r["category"], r["present"]) for r in rows if r["mode"] == mode] == expected
        block = payload["mentions"][mode]
        counts = (sum(e[2] for e in expected), sum(not e[2] for e in expected))
        assert (block["n_present"], block["n_hallucinated"]) == counts
    for r in rows:  # the mention's first token is where the caption has it, and the model wrote it
        assert CAPTION[r["start"]: r["end"]] == r["text"] and r["lm_logprob"] > -1.0
    assert set(payload["figures"]) == {"histograms", "attention_maps", "captions"}
    assert payload["probe"]["companions"]["fork->knife"]["n_present"] >= 0
    assert (payload["detection"] is not None) == taught["word_score"]


def test_analyze_decodes_with_the_method_the_command_line_names(world: Path, taught: dict) -> None:
    """``--model.init_args.generation.method beam`` reaches analyze of a checkpoint trained with greedy settings: the
    module decodes with it (``generate_tokens``, as validate does) and analysis.json names it and its settings."""
    main([*_demo_args(world, taught["root"]), "--ckpt_path", str(taught["ckpt"]), "--examples", "2",
          "--model.init_args.generation.method", "beam", "--model.init_args.generation.beam.num_beams", "2"])
    run_dir = _version(taught["root"] / "grounded")
    analysis = json.loads((run_dir / "analysis.json").read_text())
    assert analysis["generation"] == {"method": "beam", "beam": {"num_beams": 2, "length_penalty": 1.0}}
    captions = [json.loads(line)["caption"] for line in (run_dir / "captions.jsonl").read_text().splitlines()]
    assert captions == [CAPTION] * 6  # the taught caption is the best beam too


def test_validate_report_has_the_grounding_diagnostics_of_analyze(world: Path, taught: dict) -> None:
    cli = _cli(_demo_args(world, taught["root"]))
    cli.trainer.validate(cli.model, cli.datamodule, ckpt_path=str(taught["ckpt"]), verbose=False)
    run_dir = Path(cli.trainer.log_dir)
    report = json.loads((run_dir / "report.json").read_text())["grounding_diagnostics"]
    assert report["signal"] == ("word_z" if taught["word_score"] else "G_own")
    assert (run_dir / report["histogram"]).stat().st_size > 1000
    assert "Grounding diagnostics" in (run_dir / "report.md").read_text()
    main([*_demo_args(world, taught["root"]), "--ckpt_path", str(taught["ckpt"]), "--examples", "2"])
    analysis = json.loads((_version(taught["root"] / "grounded") / "analysis.json").read_text())
    signal = "word_z" if taught["word_score"] else f"G_own/L{analysis['grounding']['layers'][-1]}"
    mentions = analysis["mentions"][cli.model.chair_mode]
    assert (report["n_present"], report["n_hallucinated"]) == (mentions["n_present"], mentions["n_hallucinated"])
    assert report["auroc"] == pytest.approx(mentions["auroc"][signal], abs=1e-6)


def test_captions_of_another_run_are_scored_with_this_models_signals(world: Path, taught: dict, tmp_path: Path,
                                                                      capsys) -> None:
    """``--captions FILE``: the file's captions are read in place of the model's own, their mentions judged by the
    instance annotations, and a mention's image-level word score is the one the model gives that image anyway."""
    main([*_demo_args(world, taught["root"]), "--ckpt_path", str(taught["ckpt"]), "--examples", "2"])
    own = [json.loads(line) for line in (_version(taught["root"] / "grounded") / "mentions.jsonl").read_text().splitlines()]
    ids = [json.loads(line)["image_id"] for line in
           (_version(taught["root"] / "grounded") / "captions.jsonl").read_text().splitlines()]
    other = {i: ("a knife and two cups." if n % 2 else "a cup.") for n, i in enumerate(ids)}
    path = tmp_path / "captions.jsonl"
    path.write_text("".join(json.dumps({"image_id": i, "caption": c}) + "\n" for i, c in other.items()))
    main([*_demo_args(world, taught["root"]), "--ckpt_path", str(taught["ckpt"]), "--examples", "2",
          "--captions", str(path)])
    run_dir = _version(taught["root"] / "grounded")
    payload = json.loads((run_dir / "analysis.json").read_text())
    assert payload["captions_from"] == str(path) and "another run's" in (run_dir / "report.md").read_text()
    assert {json.loads(line)["image_id"]: json.loads(line)["caption"]
            for line in (run_dir / "captions.jsonl").read_text().splitlines()} == other
    rows = [json.loads(line) for line in (run_dir / "mentions.jsonl").read_text().splitlines()]
    truth = build_coco_ground_truth(world, mode="reference", use_cache=False)
    expected = [(i, name, name in truth[i]) for i, c in other.items() for name in ("knife", "cup") if name in c]
    assert [(r["image_id"], r["category"], r["present"]) for r in rows if r["mode"] == "reference"] == expected
    if taught["word_score"]:
        knife = {r["image_id"]: r["word_z"] for r in own if r["mode"] == "reference" and r["category"] == "knife"}
        for r in rows:
            if r["mode"] == "reference" and r["category"] == "knife":
                assert r["word_z"] == pytest.approx(knife[r["image_id"]], abs=1e-4)
    path.write_text(json.dumps({"image_id": ids[0], "caption": "a cup."}) + "\n")
    assert "has no caption for validation images" in _error(
        [*_demo_args(world, taught["root"]), "--ckpt_path", str(taught["ckpt"]), "--captions", str(path)], capsys)
    path.write_text('{"image_id": 1}\nnot json\n')
    assert f"--captions {path}:1: expected a JSON object with image_id and caption" in _error(
        [*_demo_args(world, taught["root"]), "--ckpt_path", str(taught["ckpt"]), "--captions", str(path)], capsys)


def _error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_bad_input_is_a_clear_error(world: Path, taught: dict, tmp_path: Path, capsys) -> None:
    args = _demo_args(world, tmp_path / "runs")
    assert "analyze needs the trained model: --ckpt_path" in _error(args, capsys)
    assert f"--ckpt_path {tmp_path / 'none.ckpt'}: no such checkpoint file" in _error(
        [*args, "--ckpt_path", str(tmp_path / "none.ckpt")], capsys)
    assert "is a directory (a DeepSpeed checkpoint)" in _error([*args, "--ckpt_path", str(tmp_path)], capsys)
    off = ["--model.init_args.grounding.enabled", "false", "--model.init_args.grounding.word_score", "false",
           "--model.init_args.objective.lambda_grounding", "0", "--model.init_args.objective.lambda_contrastive", "0",
           "--model.init_args.objective.lambda_word", "0"]
    message = _error([*args, *off, "--ckpt_path", str(taught["ckpt"])], capsys)
    assert "written by another recipe" in message and "grounding.enabled: checkpoint True, config False" in message
    if taught["word_score"]:  # the checkpoint's word projections have no place in a model without word scores
        assert "in the checkpoint but not in the model" in message and "word_proj" in message
    bare = tmp_path / "world"
    shutil.copytree(world, bare)
    (bare / "annotations" / "instances_val.json").unlink()
    message = _error([*_demo_args(bare, tmp_path / "runs"), "--ckpt_path", str(taught["ckpt"])], capsys)
    assert "instance annotations of the validation split" in message and "instances_val.json" in message
