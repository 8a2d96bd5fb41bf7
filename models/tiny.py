"""Tiny random vision-language backbones built from configs: one factory per architecture.

They have the real Hugging Face classes and code paths (LLaVA, LLaVA-NeXT, BLIP-2 with OPT or Flan-T5,
InstructBLIP with Llama or Flan-T5) at a size that runs on a laptop CPU in milliseconds. Tests, the offline
demo and benchmarks build them; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    CLIPVisionConfig,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    OPTConfig,
    PreTrainedModel,
    T5Config,
)

VOCAB = 128
IMAGE_TOKEN_ID = VOCAB - 1  # last id of the vocabulary is the image placeholder
PAD_TOKEN_ID = 0
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2
IMAGE_SIZE = 32
PATCH = 8
NUM_QUERY_TOKENS = 8


def llama_config(hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2, vocab: int = VOCAB,
                 intermediate: int | None = None, max_positions: int = 512, **extra) -> LlamaConfig:
    """A Llama text config; ``intermediate`` defaults to 2 x ``hidden``; ``extra`` overrides any other field."""
    ids = {"pad_token_id": PAD_TOKEN_ID, "bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID}
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        **{**ids, **extra},
    )


def clip_vision_config(hidden: int = 32, layers: int = 2, image_size: int = IMAGE_SIZE, patch: int = PATCH,
                       heads: int = 4, intermediate: int | None = None, projection_dim: int | None = None) -> CLIPVisionConfig:
    """A CLIP vision tower config; ``intermediate`` defaults to 2 x ``hidden``, ``projection_dim`` to ``hidden``."""
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch,
        projection_dim=projection_dim or hidden,
    )


def llava_config(vision: CLIPVisionConfig, text: LlamaConfig, image_token_id: int = IMAGE_TOKEN_ID,
                 vision_feature_layer: int = -1, **extra) -> LlavaConfig:
    """LLaVA-1.5's wiring of a CLIP tower and a Llama: the one LLaVA config builder of the suite (tiny models,
    the demo backbone, the benchmarks' 7B/13B shapes). One image takes (image_size / patch)^2 prompt tokens
    (the ``default`` feature strategy drops CLIP's class token)."""
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
        **extra,
    )


def _blip_vision_qformer(hidden: int = 32) -> tuple[dict, dict]:
    vision = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
    )
    qformer = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        cross_attention_frequency=1,
    )
    return vision, qformer


def opt_config(hidden: int = 64, layers: int = 4) -> OPTConfig:
    return OPTConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        ffn_dim=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        word_embed_proj_dim=hidden,
        max_position_embeddings=512,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
    )


def t5_config(hidden: int = 64, layers: int = 2) -> T5Config:
    return T5Config(
        vocab_size=VOCAB,
        d_model=hidden,
        d_kv=hidden // 4,
        d_ff=2 * hidden,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=PAD_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        decoder_start_token_id=PAD_TOKEN_ID,
        is_encoder_decoder=True,
        feed_forward_proj="gated-gelu",
    )


def tiny_llava(**text_kwargs) -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration(llava_config(clip_vision_config(), llama_config(**text_kwargs)))


def tiny_llava_next() -> LlavaNextForConditionalGeneration:
    config = LlavaNextConfig(
        vision_config=clip_vision_config(),
        text_config=llama_config(),
        image_token_index=IMAGE_TOKEN_ID,
        image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE]],
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
    )
    return LlavaNextForConditionalGeneration(config)


def _blip(config_class: type, model_class: type, text_config) -> PreTrainedModel:
    vision, qformer = _blip_vision_qformer()
    config = config_class(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text_config,
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=IMAGE_TOKEN_ID,
    )
    return model_class(config)


def tiny_blip2_opt(**text_kwargs) -> Blip2ForConditionalGeneration:
    return _blip(Blip2Config, Blip2ForConditionalGeneration, opt_config(**text_kwargs))


def tiny_blip2_t5(**text_kwargs) -> Blip2ForConditionalGeneration:
    return _blip(Blip2Config, Blip2ForConditionalGeneration, t5_config(**text_kwargs))


def tiny_instructblip_llama(**text_kwargs) -> InstructBlipForConditionalGeneration:
    return _blip(InstructBlipConfig, InstructBlipForConditionalGeneration, llama_config(**text_kwargs))


def tiny_instructblip_t5(**text_kwargs) -> InstructBlipForConditionalGeneration:
    return _blip(InstructBlipConfig, InstructBlipForConditionalGeneration, t5_config(**text_kwargs))


TINY_FACTORIES: dict[str, Callable[[], PreTrainedModel]] = {
    "llava": tiny_llava,
    "llava_next": tiny_llava_next,
    "blip2_opt": tiny_blip2_opt,
    "blip2_t5": tiny_blip2_t5,
    "instructblip_llama": tiny_instructblip_llama,
    "instructblip_t5": tiny_instructblip_t5,
}


LLAVA_NEXT_PATCHES = 2  # base image + one tile for the single 32x32 grid pinpoint
LLAVA_NEXT_IMAGE_TOKENS = 36  # 16 base + 16 tile + 4 row-newline features (from get_image_features)


def num_image_tokens(model: PreTrainedModel) -> int:
    """Image placeholder tokens one image takes in the prompt of a tiny model."""
    if hasattr(model.config, "num_query_tokens"):
        return model.config.num_query_tokens
    if isinstance(model, LlavaNextForConditionalGeneration):
        return LLAVA_NEXT_IMAGE_TOKENS
    return (IMAGE_SIZE // PATCH) ** 2


def tiny_inputs(
    model: PreTrainedModel,
    batch: int = 2,
    text_before: int = 3,
    text_after: int = 6,
    seed: int = 0,
    left_pad: list[int] | None = None,
) -> dict[str, torch.Tensor]:
    """A batch of prompts `text_before + <image>*n + text_after` with random pixels, optionally left-padded.

    ``left_pad[i]`` replaces the first ``left_pad[i]`` prompt tokens of row ``i`` by left padding, so that
    ``input_ids[i, left_pad[i]:]`` alone is the same row unpadded.
    """
    g = torch.Generator().manual_seed(seed)
    n_img = num_image_tokens(model)
    # (B, L) random text ids in [3, IMAGE_TOKEN_ID) around the image span
    before = torch.randint(3, IMAGE_TOKEN_ID, (batch, text_before), generator=g)
    after = torch.randint(3, IMAGE_TOKEN_ID, (batch, text_after), generator=g)
    image = torch.full((batch, n_img), IMAGE_TOKEN_ID)
    input_ids = torch.cat([before, image, after], dim=1)
    attention_mask = torch.ones_like(input_ids)
    if left_pad:
        # row i: drop its first left_pad[i] prompt tokens and put that many pads on the left instead
        if len(left_pad) != batch or max(left_pad) > text_before or min(left_pad) < 0:
            raise ValueError(f"left_pad must give 0..{text_before} (text_before) pads for each of {batch} rows, got {left_pad}")
        for i, n in enumerate(left_pad):
            input_ids[i] = torch.cat([torch.full((n,), PAD_TOKEN_ID), input_ids[i, n:]])
            attention_mask[i, :n] = 0
    pixel_values = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
    if isinstance(model, InstructBlipForConditionalGeneration):
        q = torch.randint(3, VOCAB - 1, (batch, 5), generator=g)
        inputs["qformer_input_ids"] = q
        inputs["qformer_attention_mask"] = torch.ones_like(q)
    if isinstance(model, LlavaNextForConditionalGeneration):
        inputs["image_sizes"] = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE]] * batch)
        inputs["pixel_values"] = pixel_values[:, None].repeat(1, LLAVA_NEXT_PATCHES, 1, 1, 1)  # (B, P, C, H, W)
    if model.config.is_encoder_decoder or getattr(model.config.text_config, "is_encoder_decoder", False):
        dec = torch.randint(3, IMAGE_TOKEN_ID, (batch, 5), generator=g)
        inputs["decoder_input_ids"] = torch.cat([torch.zeros(batch, 1, dtype=torch.long), dec], dim=1)
    return inputs


TINY_PROCESSOR_FAMILIES = ("llava", "blip2_opt", "blip2_t5", "instructblip_llama", "instructblip_t5")


def write_tiny_backbone(family: str, directory: str | Path, texts: Iterable[str], text_layers: int = 2,
                        vocab_size: int = 96, seed: int = 0) -> Path:
    """A complete tiny substitute for a hub backbone: random model, tokenizer trained on ``texts``, processor.

    ``directory`` then loads like ``llava-hf/llava-1.5-7b-hf`` or ``Salesforce/blip2-flan-t5-xl`` (model and
    processor through ``from_pretrained``): pass it as ``--model.init_args.backbone`` (the CLI gives
    ``data.processor`` the same directory) to run a cluster config end to end on a CPU.
    """
    from transformers import (
        Blip2Processor,
        InstructBlipProcessor,
        PreTrainedTokenizerFast,
    )
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from models.demo_backbone import TinyLlavaConfig, build_processor, train_tokenizer

    if family not in TINY_PROCESSOR_FAMILIES:
        raise ValueError(f"write_tiny_backbone: family must be one of {TINY_PROCESSOR_FAMILIES}, got {family!r}")
    tokenizer = train_tokenizer(texts, vocab_size)
    if family != "llava":  # BLIP processors add "<image>" themselves and expect no tokenizer.image_token
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=tokenizer.backend_tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
            unk_token="<unk>", padding_side="right", clean_up_tokenization_spaces=False,
        )
    if len(tokenizer) > VOCAB:
        raise ValueError(f"write_tiny_backbone: the tokenizer has {len(tokenizer)} tokens, the tiny models {VOCAB}")
    t5 = family.endswith("_t5")
    with torch.random.fork_rng(devices=[]):  # the caller's RNG is left as it was
        torch.manual_seed(seed)
        model = TINY_FACTORIES[family](layers=text_layers)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    model.config.image_token_id = image_token  # the trained tokenizer's placeholder, not the default VOCAB - 1
    for config in (model.config, model.config.get_text_config(), model.generation_config):
        config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        if not t5:
            config.bos_token_id = tokenizer.bos_token_id
    if t5:
        model.config.get_text_config().decoder_start_token_id = tokenizer.pad_token_id
        model.generation_config.decoder_start_token_id = tokenizer.pad_token_id
    if family == "llava":  # the demo backbone's processor, at the tiny models' image and patch size
        processor = build_processor(tokenizer, TinyLlavaConfig(image_size=IMAGE_SIZE, patch_size=PATCH))
    else:
        images = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        if family.startswith("blip2"):
            processor = Blip2Processor(image_processor=images, tokenizer=tokenizer, num_query_tokens=NUM_QUERY_TOKENS)
        else:
            processor = InstructBlipProcessor(image_processor=images, tokenizer=tokenizer, qformer_tokenizer=tokenizer,
                                              num_query_tokens=NUM_QUERY_TOKENS)
    directory = Path(directory)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
