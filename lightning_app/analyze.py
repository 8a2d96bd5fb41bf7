"""``python -m lightning_app analyze --config CONFIG --ckpt_path CKPT``: what grounding sees, on the validation split.

Captions the validation images with the configured ``generation`` (greedy by default), reads every object mention
of both CHAIR modes with its signals (:mod:`models.diagnostics`), and writes into a new version directory of the
run (``ROOT/NAME/version_N``, :mod:`lightning_app.run_layout`):

* ``analysis.json``: AUROC (present vs hallucinated) per signal and grounded layer, per category, counts; the
  detection view (candidate-word z of every image x object word, present vs absent); the per-category linear
  probes (:mod:`models.probes`); seconds per 100 images;
* ``mentions.jsonl`` (one row per mention) and ``captions.jsonl``;
* ``report.md`` with the figures under ``figures/`` (:mod:`models.figures`).

``--model.init_args.adapter RUN_DIR/adapter`` analyses a LoRA run without ``--ckpt_path``; ``--ckpt_path none``
analyses the backbone as loaded. ``--captions FILE`` scores another run's captions (e.g. the baseline's
``captions.jsonl``) with this model's signals instead of captioning. Every other argument is LightningCLI's
(``--config``, ``--data.init_args...``).
What each number means: docs/analysis.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lightning_app.analysis import MODES, Collected, analysis_payload, draw_figures, report_markdown, write_rows

__all__ = ["AnalyzeError", "caption_tokens", "load_checkpoint", "main", "read_captions", "run", "validation_presence"]

RECIPE_KEYS = ("grounding", "lora", "freeze_vision")


class AnalyzeError(ValueError):
    """Bad input to ``analyze`` (checkpoint, annotations, extras): reported as one message, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_app analyze", description=__doc__.split("\n\n")[0],
        epilog="Other arguments go to LightningCLI: --config CONFIG (required), --model.init_args.adapter DIR, ...")
    parser.add_argument("--ckpt_path", help="Lightning checkpoint of the run to analyse ('none': the backbone as "
                        "loaded; may be left out with --model.init_args.adapter)")
    parser.add_argument("--examples", type=int, default=6, help="mentions / captions shown in the figures")
    parser.add_argument("--probe_folds", type=int, default=5, help="cross-validation folds of the linear probes")
    parser.add_argument("--probe_categories", type=int, default=20, help="categories probed: the most hallucinated, "
                        "then the most frequent (each costs folds x (grounded layers + 1) fits)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the probes' folds")
    parser.add_argument("--captions", help="score these captions (JSON lines of image_id and caption, e.g. another "
                        "run's captions.jsonl) instead of the model's own: how this model's signals judge another "
                        "model's hallucinations")
    return parser


def read_captions(path: str | Path) -> dict[int, str]:
    """Image id -> caption from a JSON-lines file (``captions.jsonl`` of ``analyze``, ``predict``'s output)."""
    path = Path(path)
    if not path.is_file():
        raise AnalyzeError(f"--captions {path}: no such file")
    out: dict[int, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out[int(row["image_id"])] = str(row["caption"])
        except (ValueError, KeyError, TypeError) as err:
            raise AnalyzeError(f"--captions {path}:{number}: expected a JSON object with image_id and caption "
                               f"({type(err).__name__}: {err})") from None
    if not out:
        raise AnalyzeError(f"--captions {path}: no captions in the file")
    return out


def caption_tokens(tokenizer: Any, captions: dict[int, str], image_ids: list, source: str) -> list[list[int]]:
    """The given captions of ``image_ids`` as token lists (no special tokens), in place of generated ones."""
    missing = [i for i in image_ids if int(i) not in captions]
    if missing:
        raise AnalyzeError(f"--captions {source} has no caption for validation images {missing[:5]} "
                           f"({len(missing)} in this batch): use the captions of a run on the same validation split")
    return [tokenizer(captions[int(i)], add_special_tokens=False)["input_ids"] for i in image_ids]


def _require_extras() -> None:
    missing = [name for name, module in (("matplotlib", "matplotlib"), ("scikit-learn", "sklearn"))
               if not _importable(module)]
    if missing:
        raise AnalyzeError(f"analyze needs {' and '.join(missing)}: pip install 'grounded-attention[analysis]'")


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}.{key}").items()}
    return {prefix: value}


def _recipe_differences(saved: dict, module: Any) -> list[str]:
    """Settings that decide which parameters a model has, where the checkpoint and the config disagree."""
    ours = dict(module.hparams)
    out = []
    for key in RECIPE_KEYS:
        theirs, mine = _flat(saved.get(key), key), _flat(ours.get(key), key)
        for name in sorted(set(theirs) | set(mine)):
            if name.startswith("grounding.init_") or theirs.get(name) == mine.get(name):
                continue
            out.append(f"{name}: checkpoint {theirs.get(name, 'absent')!r}, config {mine.get(name, 'absent')!r}")
    return out


def load_checkpoint(module: Any, path: str | Path) -> None:
    """Load a Lightning checkpoint's weights into ``module`` (loaded already); errors name what does not fit."""
    from models.loading import trainable_names

    path = Path(path)
    if path.is_dir():
        raise AnalyzeError(f"--ckpt_path {path} is a directory (a DeepSpeed checkpoint): convert it with "
                         f"`python -m lightning.pytorch.utilities.deepspeed {path} model.ckpt`, or pass the run's "
                         "--model.init_args.adapter RUN_DIR/adapter")
    if not path.is_file():
        raise AnalyzeError(f"--ckpt_path {path}: no such checkpoint file")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise AnalyzeError(f"--ckpt_path {path} holds no state_dict: not a Lightning checkpoint of this suite")
    own, trainable = module.state_dict(), trainable_names(module)
    missing = sorted(k for k in own if k not in state and (module.strict_loading or k in trainable))
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(k for k in state if k in own and state[k].shape != own[k].shape)
    differences = _recipe_differences(checkpoint.get("hyper_parameters") or {}, module)
    if missing or unexpected or shapes or differences:
        lines = [f"--ckpt_path {path} was written by another recipe than the config's model:"]
        lines += [f"  {d}" for d in differences]
        for label, keys in (("missing from the checkpoint", missing), ("in the checkpoint but not in the model",
                            unexpected), ("with another shape", shapes)):
            if keys:
                lines.append(f"  {len(keys)} parameters {label}, e.g. {keys[:4]}")
        raise AnalyzeError("\n".join(lines) + "\nanalyze the checkpoint with the config it was trained with")
    module.load_state_dict(state, strict=False)


def validation_presence(datamodule: Any) -> dict[Any, frozenset[str]]:
    """Image id -> object categories of the validation split, from its instance annotations (required)."""
    from datamodules.readers import coco_file, coco_split

    coco_dir = getattr(datamodule, "coco_dir", None)
    split = getattr(datamodule, "val_split", "val")
    if coco_dir is None:
        raise AnalyzeError("analyze needs COCO-format instance annotations of the validation split: set data.coco_dir "
                         "(or data.world); data.pairs_file alone has none")
    try:
        coco_file(Path(coco_dir), "instances", split)
    except FileNotFoundError as err:
        raise AnalyzeError(f"analyze needs the instance annotations of the validation split "
                                f"(data.val_split={split}) to tell present from hallucinated objects: {err}") from None
    _, present, _ = coco_split(Path(coco_dir), split)
    return {image_id: frozenset(names) for image_id, names in present.items()}


def _device(trainer: Any) -> torch.device:
    device = trainer.strategy.root_device
    if trainer.num_devices > 1:
        print(f"analyze runs in one process on {device}; the other {trainer.num_devices - 1} devices of "
              "trainer.devices are not used", file=sys.stderr)
    return device


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def run(module: Any, datamodule: Any, run_dir: Path, device: torch.device, args: argparse.Namespace,
        checkpoint: str | None) -> dict:
    """The whole analysis of a configured module and datamodule, written into ``run_dir``; returns the payload."""
    from tqdm import tqdm

    from models.diagnostics import forced_pass, generated_tokens, grounded_layers, mention_rows
    from models.training import model_inputs

    given = read_captions(args.captions) if args.captions else None
    try:
        datamodule.prepare_data()
    except FileNotFoundError:
        validation_presence(datamodule)  # the usual cause, named as such
        raise
    presence = validation_presence(datamodule)
    datamodule.setup("validate")
    specs = {mode: datamodule.evaluation("validate", mode) for mode in MODES}
    truth = {mode: spec.ground_truth for mode, spec in specs.items()}
    module.categories = tuple(specs[module.chair_mode].categories)
    module.configure_model()
    if checkpoint is not None:
        load_checkpoint(module, checkpoint)
    if module.quantization == "none":  # bitsandbytes weights are placed on the GPU as they load
        module.to(device)
    module.model.eval()
    base = module._base()
    words = module.object_words() if module.grounding.word_score and module.grounding.enabled else None
    word_index = {t: j for j, t in enumerate(words.tokens)} if words is not None else {}
    layers = grounded_layers(base)
    collected = Collected(layers=layers, words=words, presence=presence, pairs=tuple(specs[module.chair_mode].probes),
                          images={r["image_id"]: r["image"] for r in datamodule.val_captions})
    start = time.perf_counter()
    for batch in tqdm(datamodule.val_dataloader()[0], desc="analyze", unit="batch", file=sys.stderr):
        batch = _to(batch, device)  # loader 0: the captioning prompts (datamodules.evaluation)
        if given is None:
            new = module.generate_tokens(batch, module.generation.caption_max_new_tokens)
            tokens = generated_tokens(new.cpu(), module.eos_token_id(), base.config.image_token_id)
        else:
            tokens = caption_tokens(module.tokenizer, given, list(batch["image_ids"]), args.captions)
        forced = forced_pass(module.model, model_inputs(batch), tokens, module.tokenizer.pad_token_id)
        captions, rows = mention_rows(module.tokenizer, tokens, batch["image_ids"], forced, truth, word_index,
                                      attention_layer=max(layers) if layers else None)
        collected.add(batch["image_ids"], captions, rows, forced)
    collected.seconds["captions_and_signals"] = time.perf_counter() - start
    payload = {"checkpoint": checkpoint, "adapter": module.adapter, "captions_from": args.captions,
               **analysis_payload(collected, module, args.probe_folds, args.seed, args.probe_categories)}
    started = time.perf_counter()
    payload["figures"] = draw_figures(collected, payload, run_dir, datamodule.processor.image_processor,
                                      module.chair_mode, args.examples)
    collected.seconds["figures"] = time.perf_counter() - started
    payload["seconds"] = collected.timing()
    write_rows(run_dir, collected)
    (run_dir / "analysis.json").write_text(json.dumps(payload, indent=2) + "\n")
    (run_dir / "report.md").write_text(report_markdown(payload))
    return payload


def main(argv: list[str] | None = None) -> None:
    args, rest = _parser().parse_known_args(list(sys.argv[1:] if argv is None else argv))
    adapter = any(a == "--model.init_args.adapter" or a.startswith("--model.init_args.adapter=") for a in rest)
    try:
        if args.ckpt_path is None and not adapter:
            raise AnalyzeError("analyze needs the trained model: --ckpt_path CKPT (a run's checkpoints/last.ckpt), "
                               "--model.init_args.adapter RUN_DIR/adapter, or --ckpt_path none for the backbone "
                               "as loaded")
        checkpoint = None if args.ckpt_path in (None, "none") else args.ckpt_path
        if checkpoint is not None and not Path(checkpoint).exists():
            raise AnalyzeError(f"--ckpt_path {checkpoint}: no such checkpoint file")
        _require_extras()
        if args.captions:
            read_captions(args.captions)
    except AnalyzeError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    from lightning.pytorch import LightningDataModule, LightningModule

    from lightning_app.suite_cli import SuiteCLI

    cli = SuiteCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                   args=rest, run=False, save_config_callback=None)
    run_dir = Path(cli.trainer.log_dir or cli.trainer.default_root_dir)
    try:
        run(cli.model, cli.datamodule, run_dir, _device(cli.trainer), args, checkpoint)
    except AnalyzeError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"\n{(run_dir / 'report.md').read_text()}\nanalysis: {run_dir / 'analysis.json'}\nrun directory: {run_dir}")
