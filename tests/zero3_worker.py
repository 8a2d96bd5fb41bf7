"""Run by tests/test_zero3.py in its own processes: GroundedVLM under real DeepSpeed ZeRO-3 on CPU (gloo).

``single`` (one rank) follows Lightning's order: ``setup`` loads the model (weights partitioned as they load),
``configure_model`` runs inside ``deepspeed.zero.Init``, then the DeepSpeed engine partitions the rest; it
compares with the same model loaded plainly. ``ranks`` (every rank of a 2-process group) trains one step on a
different batch per rank against an unsharded model stepped on both batches, exports, and generates with a
different length per rank (which only finishes if generation keeps the ranks in step). Each process prints
what it found as JSON on its last line.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch


def main(backbone: str, out: str) -> dict:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import DeepSpeedStrategy
    from safetensors.torch import load_file

    from models import GroundedVLM, GroundingConfig, LoraSettings
    from models.grounding import GroundingRecorder
    from models.tiny import tiny_inputs

    deepspeed.init_distributed(dist_backend="gloo")
    kwargs = {"backbone": backbone, "grounding": GroundingConfig(layers=[-2, -1]),
              "lora": LoraSettings(r=4, target_modules=".*language_model.*\\.(q_proj|v_proj|up_proj)")}
    torch.manual_seed(0)
    reference = GroundedVLM(**kwargs)
    reference.configure_model()
    reference.model.eval()

    found: dict = {}
    trainer = Trainer(accelerator="cpu", devices=1, strategy=DeepSpeedStrategy(stage=3), precision="bf16-mixed",
                      logger=False, enable_checkpointing=False)
    module = GroundedVLM(**kwargs)
    module.trainer = trainer
    found["zero3_config"] = module.zero3_config()
    config = {"zero_optimization": {"stage": 3}, "train_batch_size": 2, "train_micro_batch_size_per_gpu": 2,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}  # fp32: exact comparison
    torch.manual_seed(0)
    module.load_model(config)  # what setup() does under ZeRO-3
    with deepspeed.zero.Init(config_dict_or_path=config):  # Lightning's model_sharded_context
        module.configure_model()  # a no-op now
    module.model.eval()

    ours = dict(module.model.named_parameters())
    # frozen weights are partitioned as they load (peft's frozen copies of the new gates wait for the engine)
    found["frozen_unpartitioned"] = [n for n, p in ours.items()
                                     if not p.requires_grad and not hasattr(p, "ds_id") and "grounding_gate" not in n]
    mismatched = []
    for name, want in reference.model.named_parameters():
        with deepspeed.zero.GatheredParameters([ours[name]]):
            if not torch.equal(ours[name].data, want.data):
                mismatched.append(name)
    found["mismatched_at_load"] = [n for n in mismatched if "lora_A" not in n]  # LoRA A: random (B is 0)
    lora_b = [p for n, p in ours.items() if "lora_B" in n]
    with deepspeed.zero.GatheredParameters(lora_b):
        found["lora_b_zero_at_start"] = bool(lora_b) and all(float(p.abs().sum()) == 0 for p in lora_b)

    trainable = [p for p in module.model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=module.model, model_parameters=trainable, config=config)
    found["trainable_partitioned"] = all(hasattr(p, "ds_id") for p in trainable)
    inputs = tiny_inputs(reference._base(), batch=2)
    inputs["input_ids"][inputs["input_ids"] == 127] = reference._base().config.image_token_id
    labels = inputs["input_ids"].clone()
    rec_ref, rec = GroundingRecorder(), GroundingRecorder()
    with torch.no_grad():
        want = reference.model(**inputs, labels=labels, grounding_scores=rec_ref)
    got = engine(**inputs, labels=labels, grounding_scores=rec)
    found["loss"], found["reference_loss"] = got.loss.item(), want.loss.item()
    found["score_max_diff"] = max(
        float((rec.forward_scores(layer).detach() - rec_ref.forward_scores(layer)).nan_to_num(0).abs().max())
        for layer in rec.layers
    )
    engine.backward(got.loss)
    engine.step()

    run_dir = Path(out)
    module.export(run_dir)
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    gates = load_file(str(run_dir / "grounding" / "grounding.safetensors"))
    with deepspeed.zero.GatheredParameters(trainable):
        by_suffix = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    found["adapter_tensors"] = len(adapter)
    found["adapter_empty"] = [k for k, v in adapter.items() if v.numel() == 0]
    lora_b = [k for k in adapter if "lora_B" in k]
    found["lora_b_trained"] = bool(lora_b) and all(float(adapter[k].abs().sum()) > 0 for k in lora_b)
    found["adapter_matches_engine"] = all(
        any(name.endswith(k.replace(".weight", ".default.weight")) and torch.equal(v, value)
            for name, value in by_suffix.items())
        for k, v in adapter.items() if "lora_" in k
    )
    found["gate_shapes"] = sorted({tuple(v.shape) for v in gates.values()})

    # DeepSpeed's own checkpoint as the strategy files configure it (exclude_frozen_parameters: true), restored
    # into a freshly loaded model the way Lightning restores (load_module_strict = module.strict_loading)
    checkpoint = run_dir / "deepspeed"
    engine.save_checkpoint(str(checkpoint), tag="step1", exclude_frozen_parameters=True)
    found["checkpoint_bytes"] = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
    found["frozen_bytes"] = sum(p.ds_numel * 4 for p in ours.values() if not p.requires_grad and hasattr(p, "ds_numel"))
    restored = GroundedVLM(**kwargs)
    restored.load_model(config)
    restored.model.eval()
    found["strict_loading"] = restored.strict_loading
    engine2, *_ = deepspeed.initialize(model=restored.model, config=config,
                                       model_parameters=[p for p in restored.model.parameters() if p.requires_grad])
    engine2.load_checkpoint(str(checkpoint), tag="step1", load_module_strict=restored.strict_loading)

    def trained(model) -> dict[str, torch.Tensor]:
        params = [p for p in model.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(params):
            return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    found["restored_equal"] = all(torch.equal(a, b) for a, b in zip(trained(module.model).values(),
                                                                     trained(restored.model).values()))
    for run in (engine, engine2):  # one more step each: the optimizer moments were restored too
        loss = run(**inputs, labels=labels).loss
        run.backward(loss)
        run.step()
    found["second_step_equal"] = all(torch.equal(a, b) for a, b in zip(trained(module.model).values(),
                                                                        trained(restored.model).values()))
    return found


def ranks_main(backbone: str, out: str) -> dict:
    """One rank of a 2-process ZeRO-3 group (RANK, WORLD_SIZE, MASTER_* set by the caller)."""
    import deepspeed
    import torch.distributed as dist
    from safetensors.torch import load_file

    from models import GroundedVLM, GroundingConfig, LoraSettings
    from models.tiny import tiny_inputs

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    kwargs = {"backbone": backbone, "grounding": GroundingConfig(layers=[-1]),
              "lora": LoraSettings(r=4, dropout=0.0, target_modules=".*language_model.*\\.(q_proj|v_proj)")}
    lr = 1e-3
    config = {"zero_optimization": {"stage": 3}, "train_batch_size": 2 * world, "train_micro_batch_size_per_gpu": 2,
              "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.0, "torch_adam": True}}}
    torch.manual_seed(0)
    reference = GroundedVLM(**kwargs)
    reference.configure_model()
    reference.model.eval()
    torch.manual_seed(0)
    module = GroundedVLM(**kwargs)
    module.load_model(config)
    module.model.eval()
    with torch.no_grad():  # LoRA A is drawn on each rank: take rank 0's everywhere, as in the reference
        for p, q in zip(module.model.parameters(), reference.model.parameters()):
            if not hasattr(p, "ds_id"):  # the new, not yet partitioned parameters
                p.copy_(q)
    image_token = reference._base().config.image_token_id

    def batch(seed: int) -> tuple[dict, torch.Tensor]:
        inputs = tiny_inputs(reference._base(), batch=2, seed=seed)
        inputs["input_ids"][inputs["input_ids"] == 127] = image_token
        return inputs, inputs["input_ids"].masked_fill(inputs["input_ids"] == image_token, -100)

    trainable = [p for p in module.model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=module.model, model_parameters=trainable, config=config)
    inputs, labels = batch(seed=rank)
    got = engine(**inputs, labels=labels)
    engine.backward(got.loss)
    engine.step()

    # the unsharded model: mean of the per-rank losses, one AdamW step
    ref_params = [p for p in reference.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(ref_params, lr=lr, weight_decay=0.0)
    losses = [reference.model(**batch(seed=r)[0], labels=batch(seed=r)[1]).loss for r in range(world)]
    (torch.stack(losses).mean()).backward()
    optimizer.step()
    found = {"rank": rank, "loss": got.loss.item(), "reference_loss": losses[rank].item()}

    module.export(Path(out), writer=rank == 0)  # a collective: every rank gathers
    dist.barrier()
    adapter = load_file(str(Path(out) / "adapter" / "adapter_model.safetensors"))
    reference_state = {n: p.detach() for n, p in reference.model.named_parameters() if p.requires_grad}
    diffs = []
    for key, value in adapter.items():
        if "lora_" not in key:
            continue
        name = next(n for n in reference_state if n.endswith(key.replace(".weight", ".default.weight")))
        diffs.append(float((value - reference_state[name]).abs().max()))
    found["adapter_tensors"] = len(diffs)
    found["adapter_max_diff"] = max(diffs) if diffs else None
    found["lora_b_moved"] = min(float(v.abs().max()) for k, v in adapter.items() if "lora_B" in k)

    prompt = tiny_inputs(reference._base(), batch=1, seed=10 + rank)
    prompt["input_ids"][prompt["input_ids"] == 127] = image_token
    new_tokens = 2 if rank == 0 else 6  # rank 0 finishes first and must keep stepping with rank 1
    with torch.no_grad():
        out_ids = module.model.generate(**prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        want = reference.model.generate(**prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    found["generated"] = out_ids[0, prompt["input_ids"].shape[1]:].tolist()
    found["reference_generated"] = want[0, prompt["input_ids"].shape[1]:].tolist()
    return found


if __name__ == "__main__":
    mode, backbone = sys.argv[1], sys.argv[2]
    with tempfile.TemporaryDirectory() as tmp:
        out = sys.argv[3] if len(sys.argv) > 3 else tmp
        result = main(backbone, out) if mode == "single" else ranks_main(backbone, out)
    print(json.dumps(result))
