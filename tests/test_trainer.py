"""A real client with no code change: transformers' Trainer with gradient accumulation.

The same tiny training runs twice, each in a fresh interpreter: as installed (patched)
and with LIGER_DISABLE=1. Gradient accumulation makes Trainer pass
`num_items_in_batch`, and Trainer decides how to count tokens by checking
`LOSS_MAPPING.get(loss_type) is ForCausalLMLoss`, so a broken identity would change the
loss scale and show up here. TRITON_INTERPRET=1 sends the patched run through the kernels.
"""

from __future__ import annotations

import pytest

from tests._subprocess import run_python

pytest.importorskip("accelerate")

TRAIN = """
import json, tempfile
import torch, transformers
torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
model = transformers.LlamaForCausalLM(config)
micro_batch_losses = []
model.register_forward_hook(lambda module, args, output: micro_batch_losses.append(output.loss.item()))
rows = []
for i in range(16):
    ids = torch.randint(0, 384, (12,))
    labels = ids.clone()
    labels[: 2 + i % 5] = -100  # uneven label counts: num_items_in_batch matters
    rows.append({"input_ids": ids, "labels": labels})
with tempfile.TemporaryDirectory() as out:
    args = transformers.TrainingArguments(
        output_dir=out, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4,
        learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
        dataloader_num_workers=0, seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
import liger_autopatch
print(json.dumps({
    "losses": micro_batch_losses,
    "weights": [p.double().sum().item() for p in model.parameters()],
    "patched": sorted(row.target for row in liger_autopatch.status() if row.state == "patched"),
}))
"""


def test_trainer_with_gradient_accumulation_matches_unpatched():
    patched = run_python(TRAIN, env={"TRITON_INTERPRET": "1"})
    plain = run_python(TRAIN, env={"TRITON_INTERPRET": "1", "LIGER_DISABLE": "1"})
    assert "loss_utils.ForCausalLMLoss" in patched["patched"]
    assert plain["patched"] == []
    assert len(patched["losses"]) == 8  # 4 steps x 2 accumulated micro-batches
    assert patched["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    # The updates, hence the gradients and their num_items_in_batch scaling, agree too.
    assert patched["weights"] == pytest.approx(plain["weights"], rel=1e-4, abs=1e-4)
