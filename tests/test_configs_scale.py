"""The cluster configs (configs/*.yaml other than the demo) and the DeepSpeed strategy files.

Every model config parses and instantiates with a tiny substitute backbone of the same family, written by
the test (the documented override: ``--model.init_args.backbone DIR``), with its LoRA, grounding and
freezing settings applied for real, and trains and validates end to end on a small synthetic world (the
Flan-T5 configs through the encoder-decoder layout); every strategy file builds a ``DeepSpeedStrategy``.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from datamodules.readers import question_set_name
from lightning_app.suite_cli import SuiteCLI
from models import GroundedVLM
from models.tiny import write_tiny_backbone
from tests.reference_data import read_log

REPO = Path(__file__).resolve().parents[1]
T5_LORA = 8 * 7 + 8 * 11  # encoder block: q k v o wi_0 wi_1 wo; decoder block: + cross-attention q k v o
FAMILIES = {  # config -> tiny substitute family (8 text layers: the configs ground the last 8), LoRA'd linear layers
    "llava7b.yaml": ("llava", 8 * 7),
    "llava13b.yaml": ("llava", 8 * 7),
    "llava7b_word.yaml": ("llava", 8 * 7),  # overlay: the demo's word objective on the 7B recipe
    "blip2_opt2.7b.yaml": ("blip2_opt", 8 * 6),
    "blip2_flant5xl.yaml": ("blip2_t5", T5_LORA),
    "instructblip_vicuna7b.yaml": ("instructblip_llama", 8 * 7),
    "instructblip_flant5xl.yaml": ("instructblip_t5", T5_LORA),
}
STRATEGIES = sorted((REPO / "configs" / "strategies").glob("*.yaml"))


def test_every_cluster_config_is_covered() -> None:
    configs = {p.name for p in (REPO / "configs").glob("*.yaml")} - {"demo.yaml", "demo_baseline.yaml"}
    assert configs == set(FAMILIES)


def _write_tiny(family: str, path: Path, texts: list[str] | None = None) -> None:
    """A tiny substitute: random weights of the family's architecture, a small tokenizer and the processor."""
    write_tiny_backbone(family, path, texts or ["a cat on a mat", "is there a dog in the image? yes"], text_layers=8)


def _pope_files(tmp: Path) -> list[str]:
    files = []
    for name in ("random", "popular", "adversarial"):
        path = tmp / f"coco_pope_{name}.json"
        path.write_text(json.dumps({"question_id": 1, "image": "x.jpg", "text": "Is there a cat in the image?", "label": "yes"}))
        files.append(str(path))
    return files


def _cli(config: str, tmp: Path, *extra: str) -> SuiteCLI:
    args = [
        "--config", str(REPO / "configs" / config), *extra,
        "--model.init_args.backbone", str(tmp / "tiny"),  # the documented override: a local tiny substitute
        "--model.init_args.dtype", "float32",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
        "--trainer.default_root_dir", str(tmp / "runs"),
        "--data.init_args.val_question_files", json.dumps(_pope_files(tmp)),
    ]
    return SuiteCLI(args=args, run=False, save_config_callback=None)


@pytest.mark.parametrize("config", sorted(FAMILIES))
def test_cluster_config_instantiates_with_a_tiny_substitute(config: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)  # configs name configs/chair_val2014_500.txt relative to the repository
    family, lora_layers = FAMILIES[config]
    _write_tiny(family, tmp_path / "tiny")
    cli = _cli(config, tmp_path)
    module = cli.model
    assert isinstance(module, GroundedVLM) and module.lora is not None and module.gradient_checkpointing
    assert module.grounding.enabled and module.grounding.layers == [-8, -7, -6, -5, -4, -3, -2, -1]
    assert cli.trainer.accumulate_grad_batches == (2 if config == "llava13b.yaml" else 1)
    assert [question_set_name(f) for f in cli.datamodule.val_question_files] == ["random", "popular", "adversarial"]
    assert cli.datamodule.val_image_ids is not None and cli.datamodule.val_image_ids.is_file()
    module.configure_model()
    names = [n for n, _ in module.model.named_modules()]
    lora = {n.rsplit(".lora_A", 1)[0] for n in names if n.endswith(".lora_A")}
    assert len(lora) == lora_layers  # every linear layer of every language-model layer, nothing else
    assert all("language_model" in n for n in lora), "LoRA must stay out of the vision tower and Q-Former"
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert any("grounding_gate" in n for n in trainable)
    assert any("multi_modal_projector" in n or "language_projection" in n for n in trainable)
    assert not any(("vision_tower" in n or "vision_model" in n or "qformer" in n) for n in trainable)


def test_chair_id_list_matches_the_published_llava_logs() -> None:
    from datamodules.readers import read_image_ids

    ids = read_image_ids(REPO / "configs" / "chair_val2014_500.txt")
    assert ids == [r["image_id"] for r in read_log("llava-1.5_greedy")]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=[p.name for p in STRATEGIES])
def test_strategy_file_builds_a_deepspeed_strategy(strategy: Path, tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    monkeypatch.chdir(REPO)
    _write_tiny("llava", tmp_path / "tiny")
    cli = _cli("llava7b.yaml", tmp_path, "--config", str(strategy))
    assert isinstance(cli.trainer.strategy, DeepSpeedStrategy)
    zero = cli.trainer.strategy.config["zero_optimization"]
    name = strategy.stem
    assert zero["stage"] == (3 if name.startswith("zero3") else 2)
    assert ("offload_optimizer" in zero) == name.endswith("offload")
    assert ("offload_param" in zero) == (name == "zero3_offload")


def test_quantization_and_missing_backbone_fail_before_any_weights_load(tmp_path: Path) -> None:
    from models import GroundingConfig, LoraSettings
    from models.loading import check_backbone

    grounded = {"backbone": "llava-hf/llava-1.5-7b-hf", "grounding": GroundingConfig(layers=[-1])}
    with pytest.raises(ValueError, match="model.quantization 4bit needs model.lora"):
        GroundedVLM(**grounded, quantization="4bit")
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ValueError, match="model.quantization 8bit needs bitsandbytes"):
            GroundedVLM(**grounded, quantization="8bit", lora=LoraSettings())
    with pytest.raises(FileNotFoundError, match=r"model.backbone: no such directory .*nowhere/llava"):
        check_backbone(str(tmp_path / "nowhere" / "llava"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        check_backbone(str(tmp_path / "empty"))
    check_backbone("llava-hf/llava-1.5-7b-hf")  # a hub id is left to from_pretrained


@pytest.fixture(scope="module")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[str]]:
    """A small synthetic world (as ``data.world``) and the texts a tiny tokenizer is trained on."""
    from datamodules import CaptionPairsDataModule
    from datamodules.world import WorldConfig, generate_world

    world = {"root": str(tmp_path_factory.mktemp("world")), "seed": 0, "num_train": 40, "num_val": 8}
    generate_world(WorldConfig(**world), progress=False)
    return world, CaptionPairsDataModule(processor="unused", world=WorldConfig(**world))._world_texts()


def _data_settings(path: Path) -> dict:
    """``data.init_args`` of a config, an overlay's (``config: BASE``) on top of its base's."""
    import yaml

    content = yaml.safe_load(path.read_text())
    base = _data_settings(path.parent / content["config"]) if "config" in content else {}
    return {**base, **((content.get("data") or {}).get("init_args") or {})}


@pytest.mark.parametrize("config", sorted(FAMILIES))
def test_cluster_config_trains_and_validates_with_a_tiny_substitute(config: str, small_world, tmp_path: Path,
                                                                   monkeypatch) -> None:
    """Two optimizer steps of the config's own recipe (LoRA, grounding terms with negatives, gradient checkpointing,
    its prompts), then validation: a report, the small adapter directory and finite losses of every term."""
    world, texts = small_world
    settings = _data_settings(REPO / "configs" / config)
    prompts = [settings[k] for k in ("caption_prompt", "val_caption_prompt", "question_prompt", "question_suffix")]
    tiny = tmp_path / "tiny"
    _write_tiny(FAMILIES[config][0], tiny, texts + prompts)
    monkeypatch.chdir(tmp_path)  # the config's runs/ directories land here
    monkeypatch.setattr("sys.argv", ["lightning_app"])  # LightningCLI reads args=, not pytest's argv
    args = [
        "fit", "--config", str(REPO / "configs" / config),
        "--model.init_args.backbone", str(tiny),
        "--model.init_args.dtype", "float32", "--model.init_args.generation.caption_max_new_tokens", "6",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
        "--trainer.precision", "32-true", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
        "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
        "--data.init_args.world", json.dumps(world), "--data.init_args.coco_dir", world["root"],
        "--data.init_args.image_dir", "null", "--data.init_args.train_split", "train", "--data.init_args.val_split", "val",
        "--data.init_args.val_image_ids", "null", "--data.init_args.val_question_files", "null",
        "--data.init_args.cache_dir", str(tmp_path / "cache"), "--data.init_args.batch_size", "4",
        "--data.init_args.val_batch_size", "4", "--data.init_args.num_workers", "0",
        "--data.init_args.max_val_images", "4", "--data.init_args.max_val_questions", "4",
    ]
    cli = SuiteCLI(args=args, save_config_callback=None)
    module = cli.model
    assert cli.trainer.global_step == 2
    report = module.last_report
    assert report is not None and report["step"] == 2 and len(report["examples"]) == 4
    assert set(report["pope"]) == {"pope"}  # the world's val questions
    metrics = {k: float(v) for k, v in cli.trainer.logged_metrics.items()}
    word = config.endswith("_word.yaml")
    assert bool(module.objective.lambda_word) is word and module.grounding.word_score is word
    for key in ("train/lm", "train/word") if word else ("train/lm", "train/grounding", "train/contrastive"):
        assert key in metrics and math.isfinite(metrics[key]), (key, metrics)
    run_dir = module.run_dir()
    assert (run_dir / "report.json").is_file()
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "grounding" / "grounding.safetensors").is_file()
