"""Real clients with no code change: transformers' Trainer and TRL's SFTTrainer.

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
import json, sys, tempfile
import torch, transformers
shape, device = sys.argv[1], sys.argv[2]
sizes = {
    "tiny": dict(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
}[shape]
seq = 12 if shape == "tiny" else 1024
torch.manual_seed(0)
config = transformers.LlamaConfig(max_position_embeddings=seq, **sizes)
with torch.device(device):  # a 1B model initialises in seconds on the GPU, a minute on the CPU
    model = transformers.LlamaForCausalLM(config)
micro_batch_losses = []
recording = model.register_forward_hook(lambda module, args, output: micro_batch_losses.append(output.loss.item()))
rows = []
for i in range(16):
    ids = torch.randint(0, config.vocab_size, (seq,))
    labels = ids.clone()
    labels[: 2 + i % 5] = -100  # uneven label counts: num_items_in_batch matters
    rows.append({"input_ids": ids, "labels": labels})
with tempfile.TemporaryDirectory() as out:
    args = transformers.TrainingArguments(
        output_dir=out, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4,
        learning_rate=1e-3 if shape == "tiny" else 1e-4, logging_steps=1, report_to=[],
        use_cpu=device == "cpu", bf16=device == "cuda", save_strategy="no", dataloader_num_workers=0, seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    recording.remove()
    evaluation = {}
    if shape == "tiny":
        # Evaluation with metrics: Trainer detaches, pads, gathers and concatenates
        # outputs.logits (computed on demand by the fused path) and hands them to numpy.
        def metrics(prediction):
            logits = prediction.predictions.astype("float64")
            labels = prediction.label_ids[:, 1:]
            hits = logits[:, :-1].argmax(-1) == labels
            return {"logits_sum": logits.sum(), "logits_abs_sum": abs(logits).sum(),
                    "accuracy": hits[labels != -100].mean()}
        trainer.compute_metrics = metrics
        model.eval()
        evaluation = trainer.evaluate(eval_dataset=rows[:7])
        evaluation = {key: value for key, value in evaluation.items() if "runtime" not in key and "per_second" not in key}
import liger_autopatch
print(json.dumps({
    "losses": micro_batch_losses,
    "evaluation": evaluation,
    "weights": [p.double().sum().item() for p in model.parameters()],
    "patched": sorted(row.target for row in liger_autopatch.status() if row.state == "patched"),
}))
"""


def _train_both(shape: str, device: str) -> tuple[dict, dict]:
    env = {"TRITON_INTERPRET": "1"} if device == "cpu" else {}
    patched = run_python(TRAIN, env=env, argv=(shape, device))
    plain = run_python(TRAIN, env={**env, "LIGER_DISABLE": "1"}, argv=(shape, device))
    assert "loss_utils.ForCausalLMLoss" in patched["patched"]
    assert "flce.LlamaForCausalLM" in patched["patched"]
    assert plain["patched"] == []
    assert len(patched["losses"]) == 8  # 4 steps x 2 accumulated micro-batches
    return patched, plain


def test_trainer_with_gradient_accumulation_matches_unpatched():
    patched, plain = _train_both("tiny", "cpu")
    assert patched["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    # The updates, hence the gradients and their num_items_in_batch scaling, agree too.
    assert patched["weights"] == pytest.approx(plain["weights"], rel=1e-4, abs=1e-4)
    assert set(patched["evaluation"]) == {"eval_loss", "eval_logits_sum", "eval_logits_abs_sum", "eval_accuracy", "epoch"}
    assert patched["evaluation"] == pytest.approx(plain["evaluation"], rel=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["tiny", "llama-3.2-1b"])
def test_trainer_bf16_on_gpu_matches_unpatched(shape: str):
    """bf16 mixed precision (Trainer's bf16=True: float32 weights, bf16 autocast), so
    the losses agree within bf16 noise, which grows as the runs' weights drift apart."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    patched, plain = _train_both(shape, "cuda")
    assert patched["losses"] == pytest.approx(plain["losses"], rel=2e-3)


SFT_TRAIN = """
import json, sys, tempfile
import torch, transformers
device = sys.argv[1]
from datasets import Dataset
from tokenizers import Tokenizer, models
from trl import SFTConfig, SFTTrainer
torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
model = transformers.LlamaForCausalLM(config)
vocab = {f"t{i}": i for i in range(384)}
tokenizer = transformers.PreTrainedTokenizerFast(
    tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), unk_token="t0", pad_token="t1", eos_token="t2"
)
generator = torch.Generator().manual_seed(1)
dataset = Dataset.from_list([{"input_ids": torch.randint(0, 384, (12,), generator=generator).tolist()} for _ in range(16)])
logged = []

class KeepLogs(transformers.TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            logged.append({key: logs[key] for key in ("loss", "mean_token_accuracy", "grad_norm")})

with tempfile.TemporaryDirectory() as out:
    args = SFTConfig(output_dir=out, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
                     learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=device == "cpu",
                     bf16=device == "cuda", save_strategy="no", seed=0)
    SFTTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=dataset, callbacks=[KeepLogs()]).train()
print(json.dumps(logged))
"""


def test_trl_sft_trainer_losses_and_token_accuracy_match_unpatched():
    pytest.importorskip("trl")
    patched = run_python(SFT_TRAIN, env={"TRITON_INTERPRET": "1"}, argv=("cpu",))
    plain = run_python(SFT_TRAIN, env={"TRITON_INTERPRET": "1", "LIGER_DISABLE": "1"}, argv=("cpu",))
    assert len(patched) == 3
    for ours, theirs in zip(patched, plain):
        assert ours == pytest.approx(theirs, rel=1e-5)


@pytest.mark.gpu
def test_trl_sft_trainer_bf16_on_gpu_matches_unpatched():
    """bf16 on the GPU: losses within bf16 noise; the token accuracy (an argmax over the
    logits, which TRL reads from ``outputs.logits``, computed on demand by the fused
    path) within one token in twenty, as an argmax may flip on a near tie."""
    pytest.importorskip("trl")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    patched = run_python(SFT_TRAIN, argv=("cuda",))
    plain = run_python(SFT_TRAIN, env={"LIGER_DISABLE": "1"}, argv=("cuda",))
    assert len(patched) == 3
    for ours, theirs in zip(patched, plain):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=2e-3)
        assert ours["mean_token_accuracy"] == pytest.approx(theirs["mean_token_accuracy"], abs=0.05)
