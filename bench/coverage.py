"""Which causal LMs of the installed transformers take the fused linear cross-entropy path.

For every architecture in ``MODEL_FOR_CAUSAL_LM_MAPPING``: build a tiny random model from
its default config (hidden size, layers, heads, experts and vocabulary shrunk; where that
cannot be built or run, a second attempt keeps the hidden sizes and heads), run one
forward + backward with labels through the patched model (family "flce") and one through
the class's original forward (lm_head computes the logits; the ordinary loss path), and
compare the loss and every parameter gradient. Each architecture ends up:

* ``verified``: the loss came from the fused op and matches, gradients too;
* ``fell_back``: the ordinary path ran (with the reason the routing recorded) and matches;
* ``mismatch``: the results differ (a bug: the fused path must never change the loss);
* ``not_built``: the tiny config or the model could not be built or run (with the error).

Writes ``bench/results/coverage-<transformers version>.json`` and prints the summary.
Runs on CPU. Without ``TRITON_INTERPRET=1`` the fused op and the loss use their torch
paths (fast: this checks the routing); with it, the Triton cross-entropy runs in the
interpreter (slow). Usage::

    python bench/coverage.py [--jobs 2] [--only llama,gemma2] [--out FILE]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
TIMEOUT_S = 120  # per architecture
RTOL = 1e-4  # float32; both runs share weights and inputs

VOCAB = 512
# Config attributes shrunk (only where the default is larger), in every sub-config.
SHRINK = {
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "dim": 64, "embed_dim": 64, "n_embed": 64,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2, "num_decoder_layers": 2,
    "num_encoder_layers": 2, "decoder_layers": 2, "encoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "decoder_attention_heads": 4,
    "encoder_attention_heads": 4, "num_key_value_heads": 4, "n_kv_heads": 4, "num_kv_heads": 4,
    "rotary_dim": 16, "attention_hidden_size": 64,
    "head_dim": 16, "kv_channels": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16,
    "kv_lora_rank": 32, "q_lora_rank": 32,
    "intermediate_size": 128, "n_inner": 128, "ffn_dim": 128, "decoder_ffn_dim": 128, "encoder_ffn_dim": 128,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "expert_intermediate_size": 32,
    "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "top_k": 2, "n_shared_experts": 1,
    "vocab_size": VOCAB, "decoder_vocab_size": VOCAB, "unpadded_vocab_size": VOCAB, "image_size": 32, "patch_size": 8, "num_channels": 3,
}  # fmt: skip


# What a second attempt shrinks, for configs whose sizes depend on each other in ways the
# first breaks (state-space heads, per-layer widths): depth, feed-forward widths, experts
# and vocabulary; hidden sizes and heads stay as the default config has them.
SHRINK_KEEPING_WIDTHS = {
    name: small for name, small in SHRINK.items()
    if any(part in name for part in ("layer", "intermediate", "ffn", "inner", "expert", "vocab"))
    or name in ("moe_topk", "top_k")
}  # fmt: skip


def tiny_config(model_type: str, shrink: dict[str, int] = SHRINK) -> Any:
    """The default config of ``model_type``, shrunk; special token ids kept inside the vocabulary."""
    import transformers

    config = transformers.AutoConfig.for_model(model_type)
    _shrink(config, shrink, seen=set())
    return config


def _shrink(config: Any, shrink: dict[str, int], seen: set[int]) -> None:
    if id(config) in seen:
        return
    seen.add(id(config))
    for name, small in shrink.items():
        try:  # some configs refuse some attributes (per-layer values, derived sizes)
            value = getattr(config, name, small)
            # None: a size the default config leaves to the real checkpoints' configs.
            if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > small):
                setattr(config, name, small)
        except Exception:
            continue
    layers = getattr(config, "num_hidden_layers", None)
    for name in ("layer_types", "mlp_layer_types", "layers_block_type"):
        value = getattr(config, name, None)
        if isinstance(value, list) and isinstance(layers, int) and len(value) > layers:
            setattr(config, name, value[:layers])
    for name, value in list(vars(config).items()):
        if name.endswith("token_id") and isinstance(value, int) and value >= VOCAB:
            setattr(config, name, VOCAB - 1 - len(name) % 8)
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):  # a sub-config
            _shrink(value, shrink, seen)
    if getattr(config, "is_decoder", True) is False:  # an LM head needs a decoder (reformer's)
        config.is_decoder = True
    if hasattr(config, "attn_implementation") or hasattr(config, "_attn_implementation"):
        config._attn_implementation = "eager"


def _check_one(model_type: str, class_name: str) -> dict[str, Any]:
    result = _check_config(model_type, SHRINK)
    if result["state"] != "not_built":
        return result
    second = _check_config(model_type, SHRINK_KEEPING_WIDTHS)
    if second["state"] == "not_built":
        return result  # the first attempt's error
    return {**second, "detail": f"{second['detail']} (widths kept: {result['detail'][:120]})"}


def _check_config(model_type: str, shrink: dict[str, int]) -> dict[str, Any]:
    import torch
    import transformers

    from liger_autopatch._registry import original_of
    from liger_autopatch.targets import fused_linear

    try:
        torch.manual_seed(0)
        config = tiny_config(model_type, shrink)
        model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    except Exception as exc:
        return {"state": "not_built", "detail": f"build: {type(exc).__name__}: {exc}"[:300]}
    cls = type(model)
    target = f"flce.{cls.__name__}"
    vocab = (
        model.get_output_embeddings().weight.shape[0]
        if model.get_output_embeddings() is not None
        else VOCAB
    )
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, min(vocab, VOCAB) - 16, (2, 16), generator=generator)
    labels = input_ids.clone()
    labels[0, :4] = -100

    # Training-style calls: no cache (hybrid models' caches fail with few layers otherwise).
    no_cache = (
        {"use_cache": False} if "use_cache" in inspect.signature(cls.forward).parameters else {}
    )

    def run(forward: Any) -> tuple[Any, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            outputs = forward(model, input_ids=input_ids, labels=labels, **no_cache)
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
            if loss is None:
                raise LookupError("the model returned no loss for labels")
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads

    before = fused_linear.routing().get(target, fused_linear.RoutingRecord())
    try:
        patched_loss, patched_grads = run(cls.__call__)
        after = fused_linear.routing().get(target, fused_linear.RoutingRecord())
        original_loss, original_grads = run(original_of(cls.forward))
    except Exception as exc:
        return {"state": "not_built", "detail": f"run: {type(exc).__name__}: {exc}"[:300]}
    mismatch = _compare(patched_loss, patched_grads, original_loss, original_grads)
    if mismatch:
        return {"state": "mismatch", "detail": mismatch}
    if after.fused > before.fused:
        return {"state": "verified", "detail": f"loss {patched_loss.item():.6f}"}
    if after.fell_back > before.fell_back:
        return {"state": "fell_back", "detail": after.last_reason}
    if not getattr(cls.forward, "__liger_autopatch_original__", None):
        return {
            "state": "fell_back",
            "detail": "forward not wrapped (no labels parameter, or not a GenerationMixin)",
        }
    return {"state": "fell_back", "detail": "lm_head was never called with the loss pending"}


def _compare(loss: Any, grads: dict, expected_loss: Any, expected_grads: dict) -> str:
    import torch

    if not torch.allclose(loss, expected_loss, rtol=RTOL, atol=0, equal_nan=True):
        return f"loss {loss.item()!r} vs {expected_loss.item()!r}"
    if grads.keys() != expected_grads.keys():
        return f"gradients for different parameters: {sorted(grads.keys() ^ expected_grads.keys())[:4]}"
    scale = max((g.abs().max().item() for g in expected_grads.values()), default=0.0)
    for name, grad in grads.items():
        difference = (grad - expected_grads[name]).abs().max().item()
        if not difference <= RTOL * scale:
            return f"grad of {name} off by {difference:.3g} (largest gradient {scale:.3g})"
    return ""


class _Timeout(BaseException):
    """Not an Exception: the code under test must not catch it and carry on."""


def _worker(architectures: list[tuple[str, str]]) -> None:
    """Check each architecture; print one JSON line per result as soon as it is known."""
    import warnings

    import liger_autopatch

    warnings.filterwarnings("ignore")
    liger_autopatch.install()

    def on_alarm(signum: int, frame: Any) -> None:
        raise _Timeout(f"over {TIMEOUT_S} s")

    signal.signal(signal.SIGALRM, on_alarm)
    for model_type, class_name in architectures:
        started = time.perf_counter()
        signal.alarm(TIMEOUT_S)
        try:
            result = _check_one(model_type, class_name)
        except BaseException as exc:  # the harness survives any one model
            if isinstance(exc, KeyboardInterrupt):
                raise
            result = {"state": "not_built", "detail": f"{type(exc).__name__}: {exc}"[:300]}
            traceback.print_exc()
        finally:
            signal.alarm(0)
        result.update(class_name=class_name, seconds=round(time.perf_counter() - started, 2))
        print(json.dumps({model_type: result}), flush=True)
        print(
            f"{model_type:32s} {result['state']:10s} {result['detail'][:110]}",
            file=sys.stderr,
            flush=True,
        )


def _run_shard(shard: list[tuple[str, str]], results: dict[str, Any]) -> None:
    """Run ``shard`` in worker processes; a worker killed (out of memory) on an
    architecture records it as not built and a new worker takes the rest."""
    pending = list(shard)
    while pending:
        worker = subprocess.Popen(
            [sys.executable, __file__, "--worker", json.dumps(pending)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for line in worker.stdout:
            if line.startswith('{"'):
                try:
                    results.update(json.loads(line))
                except json.JSONDecodeError:
                    continue  # something the model code printed
        worker.wait()
        pending = [a for a in pending if a[0] not in results]
        if pending:  # the worker died on pending[0]
            model_type, class_name = pending.pop(0)
            results[model_type] = {
                "state": "not_built",
                "detail": f"the worker died (exit code {worker.returncode}, out of memory?)",
                "class_name": class_name,
            }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    parser.add_argument("--only", default="", help="comma-separated model types")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # JSON list, internal
    args = parser.parse_args()
    if args.worker is not None:
        _worker([tuple(a) for a in json.loads(args.worker)])
        return

    import torch
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items())
    if args.only:
        wanted = set(args.only.split(","))
        architectures = [a for a in architectures if a[0] in wanted]
    shards = [architectures[i :: args.jobs] for i in range(args.jobs)]
    started = time.perf_counter()
    results: dict[str, Any] = {}
    threads = [
        threading.Thread(target=_run_shard, args=(shard, results)) for shard in shards if shard
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results = dict(sorted(results.items()))

    counts = {state: 0 for state in ("verified", "fell_back", "mismatch", "not_built")}
    for result in results.values():
        counts[result["state"]] += 1
    built = len(results) - counts["not_built"]
    summary = {
        "architectures": len(results),
        **counts,
        "built": built,
        "verified_of_built": round(counts["verified"] / built, 4) if built else None,
    }
    report = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "cross_entropy": "triton interpreter"
        if os.environ.get("TRITON_INTERPRET") == "1"
        else "torch (no CUDA)",
        "seconds": round(time.perf_counter() - started, 1),
        "summary": summary,
        "fell_back": {k: v["detail"] for k, v in results.items() if v["state"] == "fell_back"},
        "mismatch": {k: v["detail"] for k, v in results.items() if v["state"] == "mismatch"},
        "not_built": {k: v["detail"] for k, v in results.items() if v["state"] == "not_built"},
        "results": results,
    }
    out = args.out or RESULTS / f"coverage-{transformers.__version__}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    for state in ("mismatch", "fell_back"):
        for model_type, detail in report[state].items():
            print(f"{state:9s} {model_type}: {detail}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
