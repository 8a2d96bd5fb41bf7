"""The cluster configs (configs/*.yaml other than the demo) and the DeepSpeed strategy files.

Every model config parses and instantiates with a tiny substitute backbone of the same family, written by
the test (the documented override: ``--model.init_args.backbone DIR``), with its LoRA, grounding and
freezing settings applied for real; every strategy file builds a ``DeepSpeedStrategy``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lightning_app.suite_cli import SuiteCLI
from models import GroundedVLM
from models.tiny import tiny_blip2_opt, tiny_instructblip_llama, tiny_llava

REPO = Path(__file__).resolve().parents[1]
FAMILIES = {  # config -> tiny substitute with 8 text layers (the configs ground the last 8), LoRA'd names per layer
    "llava7b.yaml": (lambda: tiny_llava(layers=8), 7),
    "llava13b.yaml": (lambda: tiny_llava(layers=8), 7),
    "blip2_opt2.7b.yaml": (lambda: tiny_blip2_opt(layers=8), 6),
    "instructblip_vicuna7b.yaml": (lambda: tiny_instructblip_llama(layers=8), 7),
}
STRATEGIES = sorted((REPO / "configs" / "strategies").glob("*.yaml"))


def test_every_cluster_config_is_covered() -> None:
    configs = {p.name for p in (REPO / "configs").glob("*.yaml")} - {"demo.yaml", "demo_baseline.yaml"}
    assert configs == set(FAMILIES)


def _write_tiny(factory, path: Path) -> None:
    """A tiny substitute: random weights of the family's architecture and a small tokenizer."""
    from models.demo_backbone import train_tokenizer

    torch.manual_seed(0)
    factory().save_pretrained(path)
    train_tokenizer(["a cat on a mat", "is there a dog in the image? yes"], 64).save_pretrained(path)


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
        "--trainer.default_root_dir", str(tmp / "runs"), "--trainer.logger.init_args.save_dir", str(tmp / "runs"),
        "--data.init_args.val_question_files", json.dumps(_pope_files(tmp)),
    ]
    return SuiteCLI(args=args, run=False, save_config_callback=None)


@pytest.mark.parametrize("config", sorted(FAMILIES))
def test_cluster_config_instantiates_with_a_tiny_substitute(config: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)  # configs name configs/chair_val2014_500.txt relative to the repository
    factory, per_layer = FAMILIES[config]
    _write_tiny(factory, tmp_path / "tiny")
    cli = _cli(config, tmp_path)
    module = cli.model
    assert isinstance(module, GroundedVLM) and module.lora is not None and module.gradient_checkpointing
    assert module.grounding.enabled and module.grounding.layers == [-8, -7, -6, -5, -4, -3, -2, -1]
    assert cli.trainer.accumulate_grad_batches == (2 if config == "llava13b.yaml" else 1)
    assert cli.datamodule.question_sets() == ["random", "popular", "adversarial"]
    assert cli.datamodule.val_image_ids is not None and cli.datamodule.val_image_ids.is_file()
    module.configure_model()
    names = [n for n, _ in module.model.named_modules()]
    lora = {n.rsplit(".lora_A", 1)[0] for n in names if n.endswith(".lora_A")}
    assert len(lora) == 8 * per_layer  # every linear layer of every language-model layer, nothing else
    assert all("language_model" in n for n in lora), "LoRA must stay out of the vision tower and Q-Former"
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert any("grounding_gate" in n for n in trainable)
    assert any("multi_modal_projector" in n or "language_projection" in n for n in trainable)
    assert not any(("vision_tower" in n or "vision_model" in n or "qformer" in n) for n in trainable)


def test_chair_id_list_matches_the_published_llava_logs() -> None:
    from datamodules.caption_pairs import read_image_ids

    ids = read_image_ids(REPO / "configs" / "chair_val2014_500.txt")
    log = REPO.parent / "shared" / "reference" / "opera_chair" / "llava-1.5_greedy.jsonl"
    if not log.is_file():
        pytest.skip(f"{log} not present")
    assert ids == [json.loads(line)["image_id"] for line in log.read_text().splitlines()]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=[p.name for p in STRATEGIES])
def test_strategy_file_builds_a_deepspeed_strategy(strategy: Path, tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    monkeypatch.chdir(REPO)
    _write_tiny(lambda: tiny_llava(layers=8), tmp_path / "tiny")
    cli = _cli("llava7b.yaml", tmp_path, "--config", str(strategy))
    assert isinstance(cli.trainer.strategy, DeepSpeedStrategy)
    zero = cli.trainer.strategy.config["zero_optimization"]
    name = strategy.stem
    assert zero["stage"] == (3 if name.startswith("zero3") else 2)
    assert ("offload_optimizer" in zero) == name.endswith("offload")
    assert ("offload_param" in zero) == (name == "zero3_offload")


def test_quantization_and_missing_backbone_fail_before_any_weights_load(tmp_path: Path) -> None:
    from models.module import check_backbone

    from models import GroundingConfig, LoraSettings

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
