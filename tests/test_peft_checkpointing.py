"""Grounding under peft LoRA and gradient checkpointing: equal gradients, trainable and saved gates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from models import GroundingConfig, GroundingRecorder, add_grounding, gate_modules
from models.tiny import IMAGE_TOKEN_ID, tiny_inputs, tiny_llava


def _peft_model(score: str):
    torch.manual_seed(0)
    model = tiny_llava()
    add_grounding(model, GroundingConfig(layers=[-2, -1], score=score))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["grounding_gate"])
    model = get_peft_model(model, lora)
    for name, p in model.named_parameters():  # LoRA B starts at 0; move it so LoRA gradients flow everywhere
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def _loss_and_grads(model, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor], GroundingRecorder]:
    model.zero_grad(set_to_none=True)
    rec = GroundingRecorder()
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN_ID, -100)
    out = model(**inputs, labels=labels, grounding_scores=rec)
    grounding = torch.stack([s.nanmean() for layer in rec.layers for s in rec[layer]]).mean()
    loss = out.loss - 0.5 * grounding
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, rec


@pytest.mark.parametrize("score", ["similarity", "learnable"])
def test_lora_gradient_checkpointing_gradients_equal(score: str) -> None:
    model = _peft_model(score)
    model.train()
    inputs = tiny_inputs(model.base_model.model, left_pad=[0, 1])
    loss_ref, grads_ref, _ = _loss_and_grads(model, inputs)
    model.base_model.model.activation_checkpointing_enable()
    assert model.base_model.model.model.language_model.gradient_checkpointing
    loss_gc, grads_gc, rec = _loss_and_grads(model, inputs)
    assert all(len(rec[layer]) == 1 for layer in rec.layers), "checkpoint recompute recorded scores twice"
    torch.testing.assert_close(loss_gc, loss_ref, atol=1e-6, rtol=0)
    assert grads_gc.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads_gc[name], grads_ref[name], atol=1e-6, rtol=0, msg=name)
    gate_grads = {n: g for n, g in grads_ref.items() if "grounding_gate" in n}
    assert gate_grads and all(g.abs().sum() > 0 for g in gate_grads.values())
    assert any("lora_A" in n for n in grads_ref)
    assert not any("embed_tokens" in n for n in grads_ref), "peft must keep base weights frozen"


def test_gates_trainable_and_saved_in_adapter(tmp_path: Path) -> None:
    model = _peft_model("learnable")
    gates = gate_modules(model)
    assert sorted(gates) == ["layer2", "layer3"]
    assert all(p.requires_grad for g in gates.values() for p in g.parameters())
    with torch.no_grad():
        for g in gates.values():
            g.bias.add_(1.0)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    gate_keys = [k for k in saved if "grounding_gate" in k]
    # scale, bias and the MLP (2 linear layers x weight/bias) per grounded layer
    assert len(gate_keys) == 2 * 6, gate_keys
    bias_keys = [k for k in gate_keys if k.endswith("grounding_gate.bias")]
    assert bias_keys and all(float(saved[k]) == pytest.approx(3.0 + 1.0) for k in bias_keys)


def test_checkpoints_keep_trainable_parameters_wherever_some_are_frozen(tmp_path: Path) -> None:
    from models import GroundedVLM, LoraSettings
    from models.tiny import write_tiny_backbone

    blip = write_tiny_backbone("blip2_opt", tmp_path / "blip2", ["a cat on a mat"])
    full = GroundedVLM(backbone=str(blip), grounding=GroundingConfig(layers=[-1]))
    full.configure_model()
    assert full.strict_loading  # nothing frozen: the whole state, loaded strictly
    checkpoint = {"state_dict": full.state_dict()}
    full.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == set(full.state_dict())

    for kwargs in ({"freeze_vision": True}, {"lora": LoraSettings(r=2, target_modules=["q_proj"])}):
        module = GroundedVLM(backbone=str(blip), grounding=GroundingConfig(layers=[-1]), **kwargs)
        module.configure_model()
        assert not module.strict_loading
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        checkpoint = {"state_dict": module.state_dict()}
        module.on_save_checkpoint(checkpoint)
        assert set(checkpoint["state_dict"]) == trainable
        module.on_load_checkpoint(checkpoint)  # complete: accepted
        dropped = sorted(trainable)[0]
        del checkpoint["state_dict"][dropped]
        with pytest.raises(ValueError, match=rf"lacks 1 of this model's {len(trainable)} trained parameters .*{dropped}"):
            module.on_load_checkpoint(checkpoint)
