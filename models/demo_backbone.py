"""The offline demo backbone: a tiny LLaVA (CLIP vision tower + Llama) with its own tokenizer and processor.

Everything is built from config on the synthetic world's text and saved with ``save_pretrained``, so the
suite then loads it through the same ``from_pretrained`` path as ``llava-hf/llava-1.5-13b-hf``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from models.tiny import clip_vision_config, llama_config, llava_config

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
BUILD_INFO = "demo_backbone.json"


@dataclass
class TinyLlavaConfig:
    """Sizes of the demo backbone (DESIGN.md section 7: 0.47M parameters learn the world in minutes)."""

    image_size: int = 32
    patch_size: int = 4
    vision_hidden: int = 64
    vision_layers: int = 2
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    vocab_size: int = 384
    seed: int = 0

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"TinyLlavaConfig.image_size ({self.image_size}) must be a multiple of patch_size")
        for name in ("vision_hidden", "text_hidden"):
            if getattr(self, name) % 4:
                raise ValueError(f"TinyLlavaConfig.{name} must be a multiple of 4 (4 heads)")
        if self.text_hidden % self.text_heads:
            raise ValueError("TinyLlavaConfig.text_hidden must be a multiple of text_heads")

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Lower-casing SentencePiece-style BPE (``▁`` marks spaces, so decoding restores the text); adds BOS."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"), pre_tokenizers.Punctuation("isolated")]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS)
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def build_processor(tokenizer: PreTrainedTokenizerFast, config: TinyLlavaConfig) -> LlavaProcessor:
    size = config.image_size
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.patch_size,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
    )


def build_model(tokenizer: PreTrainedTokenizerFast, config: TinyLlavaConfig) -> LlavaForConditionalGeneration:
    import torch

    vision = clip_vision_config(config.vision_hidden, config.vision_layers, config.image_size, config.patch_size,
                                intermediate=4 * config.vision_hidden)
    special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id}
    text = llama_config(config.text_hidden, config.text_layers, config.text_heads, kv_heads=config.text_heads,
                        vocab=len(tokenizer), intermediate=4 * config.text_hidden, tie_word_embeddings=False, **special)
    llava = llava_config(vision, text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):  # the caller's RNG (seed_everything) is left as it was
        torch.manual_seed(config.seed)
        model = LlavaForConditionalGeneration(llava)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def build_demo_backbone(texts: Iterable[str], out_dir: str | Path, config: TinyLlavaConfig | None = None) -> Path:
    """Train the tokenizer on ``texts``, build processor + random model, save all three into ``out_dir``.

    Idempotent: an ``out_dir`` built with the same config is reused; a different config is an error.
    """
    config = config or TinyLlavaConfig()
    out_dir = Path(out_dir)
    info_path = out_dir / BUILD_INFO
    if not info_path.is_file():
        _build_into(texts, out_dir, config)
    saved = json.loads(info_path.read_text())
    if saved != asdict(config):
        raise ValueError(
            f"{out_dir} holds a demo backbone built with {saved}, not {asdict(config)}: "
            "delete it or choose another directory"
        )
    return out_dir


def _build_into(texts: Iterable[str], out_dir: Path, config: TinyLlavaConfig) -> None:
    """Build in a temporary sibling, then move it into place: a crashed or concurrent build leaves no half backbone."""
    tokenizer = train_tokenizer(texts, config.vocab_size)
    processor = build_processor(tokenizer, config)
    model = build_model(tokenizer, config)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    processor.save_pretrained(tmp)
    model.save_pretrained(tmp)
    (tmp / BUILD_INFO).write_text(json.dumps(asdict(config), indent=2))
    try:
        tmp.rename(out_dir)  # fails if another process got there first (or out_dir holds other files)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out_dir / BUILD_INFO).is_file():
            raise FileExistsError(f"{out_dir} exists but holds no complete demo backbone: delete it") from None
